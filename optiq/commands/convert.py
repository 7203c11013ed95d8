"""optiq convert: sensitivity -> exact bit plan -> a mixed-precision MLX model."""

from dataclasses import dataclass, field
from typing import Optional

from . import int_list, run_command, script_entry
from ..pipeline import ConvertConfig, Report, convert as run_pipeline
from ..pipeline.config import DEFAULT_GROUPS, MEASURES, MODEL_TYPES
from ..records import QuantizedWeights


@dataclass
class ConvertOptions:
    model: Optional[str] = field(
        default=None,
        metadata=dict(args=["model"], nargs="?", help="folder, .gguf file or Hub repo id (default: embedded SmolLM2-135M-Instruct)"),
    )
    output: Optional[str] = field(default=None, metadata=dict(args=["-o", "--output"], help="output folder"))
    target_bpw: float = field(default=4.5, metadata=dict(help="effective bits per weight, scales and biases counted"))
    candidate_bits: Optional[str] = field(default=None, metadata=dict(help="bit-widths to choose from, e.g. 2,3,4,5,6,8 (16 = keep float); default: from the target, the widest width whose cheapest candidate fits it and every width above (4,5,6,8 at 4.5 bpw)"))
    group_size: Optional[int] = field(default=None, metadata=dict(help="one group size for every candidate"))
    group_sizes: Optional[str] = field(default=None, metadata=dict(help="e.g. 32,64,128: each (bits, group) pair is a candidate (default: 64,128)"))
    modes: str = field(default="affine", metadata=dict(help="storage formats to choose from per layer: affine (scale and bias per group) and MLX's microscaling mxfp4 (4-bit, group 32), nvfp4 (4-bit, group 16), mxfp8 (8-bit, group 32); e.g. affine,mxfp4,nvfp4"))
    calibration: Optional[str] = field(default=None, metadata=dict(help=".txt/.jsonl file or dataset id (default: self-sampled text)"))
    n_calibration: int = field(default=8, metadata=dict(help="calibration sequences"))
    seq_len: int = field(default=128, metadata=dict(help="tokens per calibration sequence"))
    gram_samples: int = field(default=64, metadata=dict(help="calibration sequences whose layer inputs feed the Gram matrices (GPTQ's Hessian, the error estimates); the probes run on --n-calibration of them"))
    kl_stride: int = field(default=4, metadata=dict(help="measure KL at every Nth position (all see full context)"))
    measure: str = field(default="anchors", metadata=dict(choices=list(MEASURES), help="probe every candidate; only --anchor-bits and predict the rest; or no probes (fast output-error estimator)"))
    anchor_bits: str = field(default="4", metadata=dict(help="bit-widths probed with --measure anchors"))
    method: str = field(default="exact", metadata=dict(choices=["exact", "greedy"]))
    quantizer: str = field(default="auto", metadata=dict(choices=["auto", "rtn", "gptq"], help="round-to-nearest, or GPTQ error compensation, measured and written with the same rounding (auto: gptq; rtn for a model streamed from disk)"))
    refit_scales: bool = field(default=True, metadata=dict(help="after GPTQ, each group's scale and bias fitted to its codes by least squares under the layer's input Gram, probed and written alike (--no-refit-scales: GPTQ's min/max grid)"))
    refine_rounds: int = field(default=0, metadata=dict(help="measure the plan and re-allocate around it, up to N rounds, while it helps"))
    protect: str = field(default="", metadata=dict(help="comma list of embed,lm_head,first,last or regexes kept at >= --protect-bits"))
    protect_bits: int = 8
    sensitivity: Optional[str] = field(default=None, metadata=dict(help="reuse a sensitivity table (JSON, or a converted model's folder: the table it was planned from) instead of measuring"))
    dtype: Optional[str] = field(default=None, metadata=dict(choices=["float16", "bfloat16"], help="dtype of scales and unquantized weights (default: the model's)"))
    eval_data: Optional[str] = field(default=None, metadata=dict(help="held-out text for the measured KL (default: self-sampled, another seed)"))
    n_eval: int = field(default=8, metadata=dict(help="held-out sequences"))
    no_eval: bool = field(default=False, metadata=dict(help="skip measuring the written model"))
    seed: int = 0
    force: bool = field(default=False, metadata=dict(help="replace an existing output"))
    model_type: str = field(default="auto", metadata=dict(choices=list(MODEL_TYPES), help="model family (auto: whisper when the checkpoint is one, else text, stripping a multimodal checkpoint's towers). yolo is refused with the reason (no quantized convolution in MLX). whisper needs optiq[whisper], with --calibration/--eval-data folders of .wav files with .txt transcripts (default: espeak-ng speech); vlm needs optiq[vlm], keeps and plans the vision tower, with folders of images with .txt prompts (default: drawn scenes)"))
    keep_unused_modalities: bool = field(default=False, metadata=dict(help="keep vision/audio towers of a multimodal checkpoint (default: strip them)"))
    max_memory: Optional[float] = field(default=None, metadata=dict(help="GB the pass may hold (default: the machine's memory); a model that does not fit in fp32 streams its blocks from disk"))
    no_slower_than: Optional[str] = field(default=None, metadata=dict(help="a format, e.g. 4@64: hold the plan's decode matmul time to every layer's at that format, by each layer's kernel time per candidate measured on this device at the model's shapes (or --kernel-times); for kernels that are not bandwidth-bound, where fewer bits are not less time"))
    kernel_times: Optional[str] = field(default=None, metadata=dict(help="kernel times measured elsewhere (the device the model will run on): a converted model's folder or optiq_metadata.json, or a KernelTimes JSON"))
    decode_batch: int = field(default=1, metadata=dict(help="sequences per decode step the kernel times are measured at (their rows as one matrix, as optiq serve multiplies them)"))
    quiet: bool = False



def config_from(opts: ConvertOptions) -> ConvertConfig:
    """The library's frozen config for these flags (strings parsed, nothing checked yet)."""
    groups = int_list(opts.group_sizes) if opts.group_sizes else (opts.group_size,) if opts.group_size else DEFAULT_GROUPS
    return ConvertConfig(
        model=opts.model, output=opts.output, target_bpw=opts.target_bpw,
        bits=int_list(opts.candidate_bits) if opts.candidate_bits is not None else None, group_sizes=groups,
        modes=tuple(m.strip() for m in opts.modes.split(",") if m.strip()),
        calibration=opts.calibration, n_calibration=opts.n_calibration, seq_len=opts.seq_len, gram_samples=opts.gram_samples,
        kl_stride=opts.kl_stride, measure=opts.measure, anchor_bits=int_list(opts.anchor_bits), method=opts.method,
        quantizer=opts.quantizer, refine_rounds=opts.refine_rounds, refit_scales=opts.refit_scales, protect=tuple(p for p in opts.protect.split(",") if p.strip()),
        protect_bits=opts.protect_bits, sensitivity=opts.sensitivity, dtype=opts.dtype, eval_data=opts.eval_data, n_eval=opts.n_eval,
        evaluate=not opts.no_eval, seed=opts.seed, force=opts.force, model_type=opts.model_type,
        keep_unused_modalities=opts.keep_unused_modalities, max_memory=opts.max_memory,
        no_slower_than=opts.no_slower_than, kernel_times=opts.kernel_times, decode_batch=opts.decode_batch,
    )


def convert(opts: ConvertOptions) -> QuantizedWeights:
    return run_pipeline(config_from(opts), Report(quiet=opts.quiet))


def main(argv=None, prog="optiq convert") -> int:
    return run_command(ConvertOptions, convert, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
