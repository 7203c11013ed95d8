"""The Whisper family: probes on the decoder's logits over calibration speech,
the exact plan mlx-whisper's loader can hold (one quantized width, float
elsewhere), written in mlx-whisper's layout and measured as stock
mlx-whisper opens it."""

import time

import attrs
from mlx_lm.utils import compute_bits_per_weight

from .. import whisper
from ..probes import count_probes
from ..quantize import output_dtype
from ..records import Candidate
from ..rounding import DTYPES
from .config import ConvertConfig
from .family import ProbedFamily, Report, Written, family_metadata, uniform_row


@attrs.frozen(eq=False)
class WhisperModel:
    model: object
    path: object
    dtype: object  # mx dtype scales and float layers are stored in
    quantizer: str


@attrs.frozen(eq=False)
class WhisperCalibration:
    batches: list  # [(log-mel, decoder tokens)] of the calibration speech
    rounding: object  # the Rounding (GPTQ's Grams recorded over these batches)


class WhisperFamily(ProbedFamily):
    name = "whisper"
    title = "Whisper models"
    always = (Candidate(16),)  # float is always a candidate here
    check_data = staticmethod(whisper.check_speech)

    def load(self, config: ConvertConfig, path, report: Report) -> WhisperModel:
        self.refuse_text_only_options(config)
        model = whisper.load(path)
        report.log(f"model: {path} (whisper, {model.dims.n_audio_layer} encoder + {model.dims.n_text_layer} decoder blocks, reference fp32)")
        # mlx-whisper's config names no dtype: fp16 unless --dtype.
        return WhisperModel(model, path, DTYPES[output_dtype({}, config.dtype)], "gptq" if config.quantizer == "auto" else config.quantizer)

    def candidates(self, config, loaded, cands, report):
        return cands

    def calibrate(self, config: ConvertConfig, loaded: WhisperModel, report: Report) -> WhisperCalibration:
        batches = whisper.features(loaded.model, whisper.speech(config.calibration, whisper.CALIBRATION_SENTENCES))
        return WhisperCalibration(batches, whisper.rounding(loaded.model, batches, loaded.quantizer, loaded.dtype, config.refit_scales))

    def measure(self, config: ConvertConfig, loaded: WhisperModel, calibration: WhisperCalibration, candidates, report: Report):
        cands = tuple(candidates) + (Candidate(16),)
        on_probe, bar = report.probes(count_probes(whisper.quantizable(loaded.model), cands))
        try:
            return whisper.measure(loaded.model, calibration.batches, cands, model_id=str(config.model), rounding=calibration.rounding, on_probe=on_probe)
        finally:
            bar.close()

    def plan(self, config: ConvertConfig, loaded, calibration, table, report: Report, budget=None):
        return whisper.best_plan(table, config.target_bpw, method=config.method), []

    def held_out(self, config: ConvertConfig, loaded: WhisperModel):
        if not config.evaluate:
            return None
        return whisper.Calibrated(loaded.model, whisper.features(loaded.model, whisper.speech(config.eval_data, whisper.EVAL_SENTENCES)))

    def baseline(self, config: ConvertConfig, loaded: WhisperModel, table, candidates, held_out) -> tuple:
        return uniform_row(loaded.model, table, candidates, config.target_bpw, held_out.kl)  # mlx's own rounding, every layer

    def write(self, config: ConvertConfig, loaded: WhisperModel, plan, table, codes, calibration: WhisperCalibration, history, out):
        quantization = whisper.quantize(loaded.model, plan, dtype=loaded.dtype, codes=codes)
        source = {"source": config.calibration or "espeak-ng sentences", "n_samples": len(calibration.batches)}
        metadata = family_metadata(attrs.evolve(config, quantizer=loaded.quantizer), "whisper", source, plan, table)
        whisper.save(out, loaded.model, loaded.path, quantization, metadata, force=config.force)
        nbytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        return Written(nbytes, float(compute_bits_per_weight(loaded.model))), metadata  # every parameter, convolutions and norms included

    def measure_written(self, config: ConvertConfig, out, held_out) -> tuple:
        """What was written, opened by stock mlx-whisper."""
        return held_out.kl(model=whisper.load(out)), config.eval_data or "espeak-ng sentences", {}

    def finish(self, out, written: Written, started: float, report: Report):
        report.log(f"wrote {out} ({written.nbytes / 2**20:.1f} MiB, mlx bits/weight {written.mlx_bpw:.3f}) in {time.time() - started:.0f}s")
