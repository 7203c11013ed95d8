"""The vision-language family (mlx-vlm), vision tower included: probes on the
next-token logits after each calibration image, the exact mixed plan
(mlx-vlm reads mlx-lm's per-layer entries), written in mlx-vlm's layout and
measured as stock mlx_vlm.load opens it."""

import time

import attrs
import mlx.core as mx
from mlx_lm.utils import compute_bits_per_weight

from .. import vlm
from ..plan import plan_bits
from ..probes import count_probes, with_twins
from ..quantize import model_bytes, output_dtype, quantize
from ..rounding import DTYPES
from ..source import as_measured, read_config
from .config import ConvertConfig, widen_defaults
from .family import ProbedFamily, Report, Written, family_metadata, uniform_row


@attrs.frozen(eq=False)
class VisionLanguageModel:
    model: object
    processor: object
    config: dict
    path: object
    dtype: str
    quantizer: str
    layers: list  # [(path, module)] planned, twins left out
    twins: dict  # {kept path: [(twin path, module)]}

    @property
    def tied(self) -> dict:
        return {p: [t for t, _ in ts] for p, ts in self.twins.items()}


@attrs.frozen(eq=False)
class VisionLanguageCalibration:
    samples: list  # [vlm.Sample]
    rounding: object


class VisionLanguageFamily(ProbedFamily):
    name = "vlm"
    title = "vision-language models"
    check_data = staticmethod(vlm.check_images)

    def load(self, config: ConvertConfig, path, report: Report) -> VisionLanguageModel:
        self.refuse_text_only_options(config)
        model, processor = vlm.load(path)
        model_config = read_config(path)
        layers, twins = vlm.quantizable(model)
        loaded = VisionLanguageModel(model, processor, model_config, path, output_dtype(model_config, config.dtype),
                                     "gptq" if config.quantizer == "auto" else config.quantizer, layers, twins)
        tied = loaded.tied
        report.log(f"model: {path} ({model.config.model_type}, vision-language, {len(layers)} quantizable layers{f', tied: {tied}' if tied else ''}, reference fp32)")
        return loaded

    def candidates(self, config: ConvertConfig, loaded: VisionLanguageModel, cands, report: Report):
        return widen_defaults(config, cands, loaded.layers + [t for ts in loaded.twins.values() for t in ts])

    def calibrate(self, config: ConvertConfig, loaded: VisionLanguageModel, report: Report) -> VisionLanguageCalibration:
        samples = vlm.calibration(loaded.model, loaded.processor, config.calibration, config.n_calibration, config.seed)
        return VisionLanguageCalibration(samples, vlm.rounding(loaded.model, samples, loaded.quantizer, DTYPES[loaded.dtype], config.refit_scales))

    def measure(self, config: ConvertConfig, loaded: VisionLanguageModel, calibration, candidates, report: Report):
        on_probe, bar = report.probes(count_probes(loaded.layers, candidates))
        try:
            return vlm.measure(loaded.model, calibration.samples, candidates, model_id=str(config.model), rounding=calibration.rounding, on_probe=on_probe)
        finally:
            bar.close()

    def plan(self, config: ConvertConfig, loaded, calibration, table, report: Report, budget=None):
        return plan_bits(table, config.target_bpw, method=config.method, protect=list(config.protect), protect_bits=config.protect_bits), []

    def held_out(self, config: ConvertConfig, loaded: VisionLanguageModel):
        if not config.evaluate:
            return None
        return vlm.Calibrated(loaded.model, vlm.calibration(loaded.model, loaded.processor, config.eval_data, config.n_eval, config.seed + 1))

    def baseline(self, config: ConvertConfig, loaded: VisionLanguageModel, table, candidates, held_out) -> tuple:
        # mlx's own rounding, every layer
        return uniform_row(loaded.model, table, candidates, config.target_bpw, held_out.kl, assignments=lambda a: with_twins(a, loaded.twins))

    def write(self, config: ConvertConfig, loaded: VisionLanguageModel, plan, table, codes, calibration, history, out):
        whole = attrs.evolve(plan, assignments=with_twins(plan.assignments, loaded.twins))
        qmodel, qconfig = quantize(loaded.model, loaded.config, whole, dtype=loaded.dtype, codes=codes)
        source = {"source": config.calibration or "drawn scenes", "n_samples": len(calibration.samples), "seed": config.seed}
        metadata = family_metadata(attrs.evolve(config, quantizer=loaded.quantizer), "vlm", source, plan, table, tied=loaded.tied)
        written = Written(model_bytes(qmodel), float(compute_bits_per_weight(qmodel)))
        vlm.save(out, qmodel, qconfig, loaded.path, metadata, force=config.force)
        return written, metadata

    def measure_written(self, config: ConvertConfig, out, held_out) -> tuple:
        """What was written, opened by stock mlx-vlm."""
        written, _ = vlm.load(out, fp32=False)
        return held_out.kl(model=as_measured(written)), config.eval_data or "drawn scenes (seed + 1)", {}

    def finish(self, out, written: Written, started: float, report: Report):
        mx.clear_cache()
        report.log(f"wrote {out} ({written.nbytes / 2**20:.1f} MiB, mlx bits/weight {written.mlx_bpw:.3f}) in {time.time() - started:.0f}s")
