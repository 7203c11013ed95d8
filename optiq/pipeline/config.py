"""What a conversion is asked to do: one frozen record, checked before any work.

`ConvertConfig` holds typed values (the command parses its strings into
it); `candidates` and `validate` turn it into the candidate set, refusing a
target the candidates cannot meet with a message that names the problem.
"""

from pathlib import Path
from typing import Optional

import attrs

from ..errors import OptiqError
from ..model_tree import candidates_for
from ..plan import layer_cost_bits, protected_paths
from ..records import FLOAT_BITS, FP_MODES, Candidate, candidate_from_key, sort_candidates
from ..rounding import QUANTIZERS
from ..speed import load_kernel_times

VALID_BITS = (1, 2, 3, 4, 5, 6, 8, 16)
VALID_GROUPS = (32, 64, 128)
DEFAULT_GROUPS = (64, 128)
MODES = ("affine", *FP_MODES)
MEASURES = ("anchors", "all", "proxy")
MODEL_TYPES = ("auto", "text", "whisper", "vlm", "yolo")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _ints(value) -> tuple:
    return tuple(int(x) for x in value)


def _optional_ints(value):
    return None if value is None else _ints(value)


@attrs.frozen
class ConvertConfig:
    """Everything `optiq.pipeline.convert` reads. `bits` None: near-uniform
    defaults from the target (widened only when no plan could meet it)."""

    model: Optional[str] = None  # folder, .gguf, Hub repo id; None: the embedded SmolLM2
    output: Optional[str] = None  # None: NAME-optiq-TARGETbpw
    target_bpw: float = 4.5
    bits: Optional[tuple] = attrs.field(default=None, converter=_optional_ints)
    group_sizes: tuple = attrs.field(default=DEFAULT_GROUPS, converter=_ints)
    modes: tuple = attrs.field(default=("affine",), converter=tuple)  # affine and/or MLX's mxfp4, nvfp4, mxfp8
    calibration: Optional[str] = None  # .txt/.jsonl file, dataset id, folder (Whisper, VLM); None: self-sampled
    n_calibration: int = 8
    seq_len: int = 128
    gram_samples: int = 64
    kl_stride: int = 4
    measure: str = "anchors"
    anchor_bits: tuple = attrs.field(default=(4,), converter=_ints)
    method: str = "exact"
    quantizer: str = "auto"  # auto: gptq, rtn for a model streamed from disk
    refine_rounds: int = 0
    refit_scales: bool = True  # GPTQ's scales and biases fitted to its codes by least squares (gptq.refit_affine)
    protect: tuple = attrs.field(default=(), converter=tuple)
    protect_bits: int = 8
    sensitivity: Optional[str] = None  # a sensitivity table (JSON) to reuse, or a converted model's folder
    dtype: Optional[str] = None  # float16 / bfloat16; None: the model's
    eval_data: Optional[str] = None
    n_eval: int = 8
    evaluate: bool = True
    seed: int = 0
    force: bool = False
    model_type: str = "auto"
    keep_unused_modalities: bool = False
    max_memory: Optional[float] = None  # GB; None: the machine's memory
    no_slower_than: Optional[str] = None  # a format key (4@64): decode matmul time held to that format's, uniform
    kernel_times: Optional[str] = None  # optiq.speed.KernelTimes JSON (or an optiq_metadata.json holding one); None: measured here
    decode_batch: int = 1  # the decode batch the kernel times are measured at

    @property
    def explicit_bits(self) -> bool:
        return self.bits is not None

    @property
    def model_name(self) -> str:
        return str(self.model or DEFAULT_MODEL_NAME)

    @property
    def out(self) -> Path:
        if self.output:
            return Path(self.output)
        name = Path(self.model).name.removesuffix(".gguf") if self.model else DEFAULT_MODEL_NAME
        return Path(f"{name}-optiq-{self.target_bpw:g}bpw")

    @property
    def anchors(self):
        """The probe set measure_weights takes: None all, set() none (proxy), else the anchor widths."""
        return {"all": None, "proxy": set()}.get(self.measure, set(self.anchor_bits))


def refits_scales(config: ConvertConfig, quantizer: str) -> bool:
    """Whether the written model's scales and biases were refit to GPTQ's codes
    (the metadata's `refit_scales`): only GPTQ refits, with `quantizer` resolved from auto."""
    return quantizer == "gptq" and config.refit_scales


def default_bits(target: float, groups) -> tuple:
    """Near-uniform candidates: the widest bit-width whose cheapest candidate
    fits the target, and every width above it. On SmolLM2 at 4.5 bpw, plans
    that may push layers to 2-3 bits measured worse (0.304 mean KL) than
    plans over 4-8 bits (0.256): single-layer KLs add up near uniform."""
    fits = [b for b in VALID_BITS[:-1] if b + 32 / max(groups) <= target + 1e-9]
    lowest = max(fits, default=VALID_BITS[0])
    return tuple(b for b in VALID_BITS[:-1] if b >= lowest)


def candidates(config: ConvertConfig) -> tuple:
    """Every way the plan may store a layer: each (bits, group) pair in MLX's
    affine mode, and each microscaling format in --modes whose width is among
    the bits (mxfp4 and nvfp4 with 4, mxfp8 with 8); 16 bits: keep float."""
    groups = config.group_sizes
    bits = config.bits if config.explicit_bits else default_bits(config.target_bpw, groups or (64,))
    bad = [b for b in bits if b not in VALID_BITS]
    if bad or not bits:
        raise OptiqError(f"--candidate-bits {','.join(map(str, bits))!r}: MLX supports {VALID_BITS[:-1]} (16 = float)")
    badg = [g for g in groups if g not in VALID_GROUPS]
    if badg or not groups:
        raise OptiqError(f"group size {badg or list(groups)}: MLX supports {VALID_GROUPS}")
    badm = [m for m in config.modes if m not in MODES]
    if badm or not config.modes:
        raise OptiqError(f"--modes {','.join(config.modes)!r}: choose from {', '.join(MODES)}")
    cands = {Candidate(b, 64 if b >= FLOAT_BITS else g) for b in bits for g in groups if "affine" in config.modes or b >= FLOAT_BITS}
    for mode in config.modes:
        if mode in FP_MODES:
            width, group = FP_MODES[mode]
            if width not in bits:
                raise OptiqError(f"--modes {mode} stores {width}-bit codes: add {width} to --candidate-bits")
            cands.add(Candidate(width, group, mode))
    return sort_candidates(cands)


def validate(config: ConvertConfig) -> tuple:
    """The candidates, once every option is known to be usable."""
    if not config.target_bpw > 0:
        raise OptiqError(f"--target-bpw must be positive, got {config.target_bpw}")
    if config.kl_stride < 1 or config.n_eval < 1:
        raise OptiqError("--kl-stride and --n-eval must be >= 1")
    if config.gram_samples < 0:
        raise OptiqError(f"--gram-samples must be >= 0, got {config.gram_samples}")
    if config.kl_stride >= config.seq_len:
        raise OptiqError(f"--kl-stride {config.kl_stride} must be below --seq-len {config.seq_len}")
    if config.sensitivity and not (Path(config.sensitivity).is_file() or (Path(config.sensitivity) / "optiq_metadata.json").is_file()):
        raise OptiqError(f"--sensitivity {config.sensitivity}: no such file (a table JSON, or a converted model's folder)")
    for name, value, allowed in (("--measure", config.measure, MEASURES), ("--quantizer", config.quantizer, ("auto", *QUANTIZERS)),
                                 ("--method", config.method, ("exact", "greedy")), ("--model-type", config.model_type, MODEL_TYPES)):
        if value not in allowed:
            raise OptiqError(f"{name} {value!r}: choose from {', '.join(allowed)}")
    speed_limit(config)
    cands = candidates(config)
    cheapest = min(cands, key=lambda c: c.effective_bits)
    if config.target_bpw < cheapest.effective_bits:
        raise OptiqError(
            f"--target-bpw {config.target_bpw} is below the cheapest candidate "
            f"({cheapest.key} = {cheapest.effective_bits:g} effective bpw)"
        )
    return cands


def speed_limit(config: ConvertConfig):
    """The format --no-slower-than names (None: no time budget), once the
    speed options are known to fit together; --kernel-times is read here."""
    if config.no_slower_than is None:
        if config.kernel_times:
            raise OptiqError("--kernel-times is read only with --no-slower-than")
        return None
    try:
        limit = candidate_from_key(config.no_slower_than)
    except ValueError as exc:
        raise OptiqError(f"--no-slower-than {exc}") from None
    if config.refine_rounds or config.method != "exact":
        raise OptiqError("--no-slower-than plans with the exact method and without --refine-rounds")
    if config.decode_batch < 1:
        raise OptiqError(f"--decode-batch must be >= 1, got {config.decode_batch}")
    if config.kernel_times:
        load_kernel_times(config.kernel_times)
    return limit


def check_ceiling(config: ConvertConfig, cands):
    """A target the largest candidate (float, where the family always adds it) can use."""
    largest = max(cands, key=lambda c: c.effective_bits)
    if config.target_bpw > largest.effective_bits + 1e-9:
        raise OptiqError(
            f"--target-bpw {config.target_bpw} is above the largest candidate ({largest.key} = {largest.effective_bits:g} "
            "effective bpw), which every layer would get" + ("" if largest.bits >= FLOAT_BITS else "; add 16 to --candidate-bits to keep layers float")
        )


def smallest_plan_bpw(layers, cands, protect=(), protect_bits: int = 8) -> float:
    """The least effective bpw any plan over these candidates can reach, with
    protected layers held at protect_bits or more (as plan_bits holds them)."""
    guarded = protected_paths([p for p, _ in layers], protect)
    spent = total = 0
    for path, module in layers:
        fits = candidates_for(module, cands)
        if not fits:
            continue
        if path in guarded:
            fits = [c for c in fits if c.bits >= protect_bits] or [max(fits, key=lambda c: c.effective_bits)]
        spent += min(layer_cost_bits(int(module.weight.size), c) for c in fits)
        total += int(module.weight.size)
    return spent / total if total else 0.0


def widen_defaults(config: ConvertConfig, cands, layers) -> tuple:
    """Default candidates reach down one bit-width at a time until a plan can
    meet the target (protected layers held high need cheaper layers elsewhere);
    explicit bits are left as given (plan_bits then names the floor)."""
    if config.explicit_bits:
        return cands
    groups = sorted({c.group_size for c in cands if c.bits < FLOAT_BITS and c.mode == "affine"}) or [64]
    while smallest_plan_bpw(layers, cands, config.protect, config.protect_bits) > config.target_bpw:
        lower = [b for b in VALID_BITS[:-1] if b < min(c.bits for c in cands)]
        if not lower:
            break
        cands = sort_candidates(set(cands) | {Candidate(lower[-1], g) for g in groups})
    return cands
