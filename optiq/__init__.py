"""optiq: measured per-layer bit budgets for MLX language models.

The stages are plain functions over immutable records and compose in your own
pipeline:

    loaded = load_reference(resolve_model(None))          # fp32 reference
    tokens = load_calibration(None, loaded.tokenizer, loaded.model, 8, 128)
    table = measure_weights(loaded.model, tokens, candidates)  # SensitivityTable
    plan = plan_bits(table, target_bpw=4.5)                # BitPlan (pure)
    model, config = quantize(loaded.model, loaded.config, plan)
    save_model_folder("out", model, loaded.tokenizer, config, loaded.path, {...})

or run the whole conversion: `convert(ConvertConfig(model=..., target_bpw=4.5))`.
"""

__version__ = "0.1.0"

from .calibration import load_calibration
from .errors import OptiqError
from .pipeline import ConvertConfig, convert
from .plan import effective_bpw, layer_cost_bits, plan_bits, uniform_plan
from .probes import measure_weights
from .quantize import quantize, save_model_folder
from .records import BitPlan, Candidate, KVEntry, KVPlan, LayerSensitivity, LoRAModule, LoRAPlan, QuantizedWeights, SensitivityTable
from .reference import reference_pass
from .rounding import Rounding
from .source import load_reference, resolve_model

__all__ = [
    "BitPlan",
    "Candidate",
    "ConvertConfig",
    "KVEntry",
    "KVPlan",
    "LayerSensitivity",
    "LoRAModule",
    "LoRAPlan",
    "OptiqError",
    "QuantizedWeights",
    "Rounding",
    "SensitivityTable",
    "convert",
    "effective_bpw",
    "layer_cost_bits",
    "load_calibration",
    "load_reference",
    "measure_weights",
    "plan_bits",
    "quantize",
    "reference_pass",
    "resolve_model",
    "save_model_folder",
    "uniform_plan",
]
