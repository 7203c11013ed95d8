"""Writing LoRA adapters in other tools' formats.

PEFT: adapter_config.json (peft_type LORA, r, lora_alpha, target_modules,
rank_pattern, alpha_pattern, layers_to_transform, base_model_name_or_path,
task_type) and adapter_model.safetensors with PEFT's names,
base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r).
Beside them, optiq_lora_config.json carries the LoRAPlan.

mlx-lm: adapters.safetensors and adapter_config.json. mlx-lm gives every
module one rank and one scale, so mixed ranks are zero-padded to the largest
(extra columns of a and rows of b are zero: the product is unchanged) and each
module's own scale is folded into its b.
"""

import collections
import json
import re
from pathlib import Path

import attrs
import mlx.core as mx
import numpy as np

from ..errors import OptiqError
from ..io import write_json
from ..records import LoRAPlan

PLAN_FILE = "optiq_lora_config.json"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _layer_index(path: str) -> int | None:
    m = _LAYER.search("." + path)
    return int(m.group(1)) if m else None


def peft_config(plan: LoRAPlan, n_layers: int) -> dict:
    ranks = collections.Counter(m.rank for m in plan.modules)
    r = ranks.most_common(1)[0][0]
    alpha = plan.alpha_ratio * r
    layers = sorted({i for i in (_layer_index(m.path) for m in plan.modules) if i is not None})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": plan.base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": sorted({m.path.rsplit(".", 1)[-1] for m in plan.modules}),
        "rank_pattern": {m.path: m.rank for m in plan.modules if m.rank != r},
        "alpha_pattern": {m.path: m.alpha for m in plan.modules if m.alpha != alpha},
    }
    if layers and len(layers) < n_layers:
        config["layers_to_transform"] = layers
        config["layers_pattern"] = "layers"
    return config


def write_peft(folder, plan: LoRAPlan, weights: dict, n_layers: int):
    """weights: {path: (a (in, r), b (r, out))} in mlx-lm's orientation."""
    folder = Path(folder)
    tensors = {}
    for m in plan.modules:
        a, b = weights[m.path]
        tensors[f"base_model.model.{m.path}.lora_A.weight"] = mx.array(np.ascontiguousarray(np.array(a.astype(mx.float32)).T))
        tensors[f"base_model.model.{m.path}.lora_B.weight"] = mx.array(np.ascontiguousarray(np.array(b.astype(mx.float32)).T))
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", peft_config(plan, n_layers))
    write_json(folder / PLAN_FILE, attrs.evolve(plan, n_layers=n_layers).to_dict())


def write_mlx_lm(folder, plan: LoRAPlan, weights: dict, n_layers: int):
    """mlx-lm adapts the last `num_layers` blocks, so the plan's layers must be those."""
    folder = Path(folder)
    rmax = max(m.rank for m in plan.modules)
    scale = plan.alpha_ratio  # alpha / r, the same for every module by construction
    tensors = {}
    for m in plan.modules:
        a, b = weights[m.path]
        fold = (m.alpha / m.rank) / scale
        tensors[f"{m.path}.lora_a"] = mx.pad(a.astype(mx.float32), [(0, 0), (0, rmax - m.rank)])
        tensors[f"{m.path}.lora_b"] = mx.pad(b.astype(mx.float32) * fold, [(0, rmax - m.rank), (0, 0)])
    mx.save_safetensors(str(folder / "adapters.safetensors"), tensors)
    layers = sorted({_layer_index(m.path) for m in plan.modules})
    if layers != list(range(n_layers - len(layers), n_layers)):
        raise ValueError("mlx-lm adapters cover the last N layers; this plan's layers are not contiguous at the end")
    keys = sorted({m.path.split(f".layers.{_layer_index(m.path)}.", 1)[1] for m in plan.modules})
    write_json(folder / "adapter_config.json", {
        "fine_tune_type": "lora",
        "num_layers": len(layers),
        "lora_parameters": {"rank": rmax, "scale": scale, "dropout": 0.0, "keys": keys},
        "model": plan.base_model,
    })


def read_plan(folder) -> LoRAPlan:
    try:
        return LoRAPlan.from_dict(json.loads((Path(folder) / PLAN_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OptiqError(f"{folder}: cannot read {PLAN_FILE} (written by optiq lora train): {exc}")
