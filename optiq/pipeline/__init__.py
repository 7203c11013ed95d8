"""The conversion pipeline as a library function:

    from optiq.pipeline import ConvertConfig, convert
    written = convert(ConvertConfig(model="path/to/model", target_bpw=4.5))

`convert` resolves the model, picks its family (text, Whisper or
vision-language), and runs the family's steps in one order: load,
calibrate, measure sensitivity, plan, the held-out baseline, quantize and
write atomically, measure what was written. It returns the QuantizedWeights
record; `optiq convert` is a thin front that builds the config from flags.
"""

import time
from pathlib import Path

from .. import distributed, whisper
from ..device import check_backend, describe
from ..errors import OptiqError
from ..io import check_output, write_json
from ..records import QuantizedWeights
from ..ct2_import import is_ct2_whisper
from ..source import resolve_model
from .config import ConvertConfig, candidates, validate
from .family import Report, not_written, record_measured
from .text_family import TextFamily
from .vlm_family import VisionLanguageFamily
from .whisper_family import WhisperFamily

__all__ = ["ConvertConfig", "Report", "candidates", "convert", "family_for", "validate"]

# Measured on yolo-mlx 0.4.0's YOLO26n: 126 Conv2d, 0 modules with to_quantized.
YOLO_REFUSAL = (
    "detection models (yolo-mlx) cannot be converted: their layers are convolutions, MLX quantizes only "
    "Linear and Embedding layers (there is no quantized convolution), and yolo-mlx's loader keeps only the "
    "float tensors its float layers name, so no mixed-precision YOLO would open in yolo-mlx"
)


def family_for(config: ConvertConfig, path):
    """The family that converts the model at `path`."""
    if config.model_type == "yolo":
        raise OptiqError(YOLO_REFUSAL)
    # a CTranslate2 (faster-whisper) folder is Whisper too, before its import
    if config.model_type == "whisper" or (config.model_type == "auto" and path is not None and (whisper.is_whisper(path) or is_ct2_whisper(path))):
        return WhisperFamily()
    if config.model_type == "vlm":
        return VisionLanguageFamily()
    return TextFamily()


def known_family(config: ConvertConfig):
    """The family, where it is known before the model is resolved (a GGUF
    import or a Hub download is the expensive part): the default model and
    GGUF files are text, local folders say what they are; None for a Hub id."""
    spec = config.model
    if config.model_type != "auto":
        return family_for(config, None)
    if spec is None or str(spec).endswith(".gguf"):
        return TextFamily()
    path = Path(spec).expanduser()
    return family_for(config, path) if path.is_dir() else None


def convert(config: ConvertConfig, report: Report | None = None) -> QuantizedWeights:
    """The whole pipeline; returns what was written (path "" on a process
    that does not write, under mlx.launch)."""
    report = report or Report()
    if config.model_type == "yolo":
        raise OptiqError(YOLO_REFUSAL)
    cands = validate(config)
    out = config.out
    check_output(out, config.force)
    started = time.time()
    check_backend()
    report.log(describe())
    family = known_family(config)
    if family is not None:  # bad targets and data are refused before any import or download
        family.check(config, cands)
    path = resolve_model(config.model)
    if family is None:
        family = family_for(config, path)
        family.check(config, cands)
    loaded = family.load(config, path, report)
    cands = family.candidates(config, loaded, cands, report)
    budget = family.time_budget(config, loaded, cands, report) if config.no_slower_than else None
    calibration = family.calibrate(config, loaded, report)
    table = family.measure(config, loaded, calibration, cands, report)
    plan, history = family.plan(config, loaded, calibration, table, report, budget)
    codes = family.codes(config, loaded, calibration, plan)
    family.summary(plan, report)
    if not distributed.is_writer():  # under mlx.launch rank 0 evaluates and writes
        return not_written(plan)
    held_out = family.held_out(config, loaded)
    rows = [family.baseline(config, loaded, table, cands, held_out)] if held_out is not None else []
    written, metadata = family.write(config, loaded, plan, table, codes, calibration, history, out)
    if budget is not None:  # reusable elsewhere: --kernel-times this folder
        metadata["kernel_times"] = budget.times.to_dict()
    metadata["convert_seconds"] = round(time.time() - started, 1)  # to the written model: the held-out check below is not counted
    del calibration, codes  # the reference pass and its Grams: no longer needed
    measured = {}
    if held_out is None:
        write_json(Path(out) / "optiq_metadata.json", metadata)  # else record_measured writes it once, with the measurement
    else:
        quality, label, extra = family.measure_written(config, out, held_out)
        measured = record_measured(out, metadata, rows, plan, quality, label, **extra)
    family.finish(out, written, started, report)
    return QuantizedWeights(path=str(out), plan=plan, bytes=written.nbytes, mlx_bits_per_weight=written.mlx_bpw, measured=measured)
