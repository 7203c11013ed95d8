"""optiq kv-cache: per-layer KV sensitivity -> kv_config.json for per-layer quantized caches."""

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from tqdm.auto import tqdm

from . import announce_device, int_list, run_command, script_entry
from .. import distributed
from ..calibration import check_source, load_calibration
from ..errors import OptiqError
from ..io import atomic_output, check_output
from ..kv import cache_layers, measure_kv, plan_kv, write_kv_config
from ..kv.sensitivity import kv_probes, sliding_window
from ..probe_hooks import shared_by_ranks, with_progress
from ..records import Candidate
from ..source import resolve_model
from ..stream import load_within


@dataclass
class KVOptions:
    model: Optional[str] = field(default=None, metadata=dict(args=["model"], nargs="?", help="folder, .gguf or repo id (default: embedded SmolLM2)"))
    output: str = field(default="kv-plan", metadata=dict(args=["-o", "--output"], help="output folder for kv_config.json"))
    target_bits: float = field(default=4.5, metadata=dict(help="average bits per cached element (nominal unless --effective)"))
    candidate_bits: str = field(default="2,3,4,6,8", metadata=dict(help="affine candidates (mlx-lm's quantized cache)"))
    split_bits: str = field(default="8:4,4:2", metadata=dict(help="K:V pairs, keys and values at their own bits ('' for none)"))
    turbo_bits: str = field(default="", metadata=dict(help="TurboQuant candidates, e.g. 2,3,4 (the planner picks the family per layer)"))
    group_size: int = 64
    effective: bool = field(default=False, metadata=dict(help="budget effective bits (scales and biases counted)"))
    calibration: Optional[str] = None
    n_calibration: int = 4
    seq_len: int = 256
    prefill: Optional[int] = field(default=None, metadata=dict(help="run N tokens as a prefill, then decode the rest one token at a time (default: one prefill, replayed from each probed layer: the same logits, faster)"))
    kl_stride: int = field(default=1, metadata=dict(help="measure KL at every Nth position (all see their whole context): the head's cost, large with a big vocabulary, divides by N"))
    seed: int = 0
    max_memory: Optional[float] = field(default=None, metadata=dict(help="GB the pass may hold (default: the machine's memory); a model that does not fit in fp32 streams its blocks from disk"))
    force: bool = False
    quiet: bool = False


def run(opts: KVOptions):
    bits = int_list(opts.candidate_bits)
    if any(b not in (2, 3, 4, 5, 6, 8) for b in bits):
        raise OptiqError(f"--candidate-bits {opts.candidate_bits!r}: choose from 2,3,4,5,6,8")
    turbo = int_list(opts.turbo_bits)
    if any(b not in (1, 2, 3, 4) for b in turbo):
        raise OptiqError(f"--turbo-bits {opts.turbo_bits!r}: choose from 1,2,3,4")
    split = split_pairs(opts.split_bits)
    if not bits and not turbo:
        raise OptiqError("no candidates: give --candidate-bits and/or --turbo-bits")
    if opts.group_size not in (32, 64, 128):
        raise OptiqError(f"--group-size {opts.group_size}: MLX supports 32, 64, 128")
    if not 1 <= opts.kl_stride < opts.seq_len:
        raise OptiqError(f"--kl-stride {opts.kl_stride}: between 1 and --seq-len - 1")
    if opts.prefill is not None and not 1 <= opts.prefill < opts.seq_len:
        raise OptiqError("--prefill must be between 1 and --seq-len - 1")
    check_target(opts.target_bits, bits, split, turbo, opts.group_size, opts.effective)
    check_source(opts.calibration)
    check_output(Path(opts.output), opts.force)
    announce_device(opts.quiet)
    loaded, streamed = load_within(resolve_model(opts.model), opts.max_memory)
    kinds = cache_layers(loaded.model)
    if not kinds:
        raise OptiqError(f"{loaded.config.get('model_type')} has no KV-cache layers to plan")
    window = sliding_window(loaded.model)
    if window and opts.seq_len <= window and not opts.quiet:
        print(f"note: --seq-len {opts.seq_len} stays within the {window}-token sliding window: full-attention layers are measured "
              f"as if they were sliding ones (their long-context cost goes unseen); a --seq-len above {window} measures it", file=sys.stderr)
    with streamed.forwarding() if streamed else contextlib.nullcontext():  # every forward streams its blocks
        table = measure_kv_table(opts, loaded, bits, split, turbo)
    sliding = [i for i, kind in kinds if kind == "sliding"]
    plan = plan_kv(table, opts.target_bits, n_layers=len(loaded.model.layers), nominal=not opts.effective, sliding=sliding)
    if not distributed.is_writer():  # under mlx.launch rank 0 writes
        return plan
    with atomic_output(opts.output, force=opts.force) as tmp:
        write_kv_config(plan, tmp)
    print(
        f"wrote {opts.output}/kv_config.json: {len(plan.layers)} cached layers at {plan.average_bits:.3f} average bits "
        f"({plan.effective_bits:.3f} effective), predicted KL {plan.predicted_kl:.4f}; "
        + " ".join(f"{e.layer_idx}:{'t' if e.mode == 'turbo' else ''}{e.bits}{'/' + str(e.v_bits) if e.v_bits else ''}" for e in plan.layers)
        + (f"; no KV cache: layers {list(plan.skipped_layers)}" if plan.skipped_layers else "")
        + (f"; {plan.long_context_bits:.3f} average bits over the full-attention layers (long context)" if sliding else "")
        + f"; peak memory {mx.get_peak_memory() / 2**20:.0f} MiB"
    )
    return plan


def check_target(target: float, bits, split, turbo, group_size: int, effective: bool):
    """A target the candidates can meet, checked before any probe: between the
    cheapest candidate's bits per entry and 16 (every layer unquantized)."""
    extra = 32 / group_size if effective else 0.0  # fp16 scale and bias per group
    costs = [b + extra for b in bits] + [(k + v) / 2 + extra for k, v in split] + [float(b) for b in turbo]  # TurboQuant: its norms on top
    cheapest = min(costs)
    if target < cheapest:
        raise OptiqError(f"--target-bits {target:g} is below the cheapest candidate ({cheapest:g} {'effective' if effective else 'nominal'} bits per entry)")
    if target > 16:
        raise OptiqError(f"--target-bits {target:g} is above 16, an unquantized cache")


def measure_kv_table(opts, loaded, bits, split, turbo):
    tokens = load_calibration(opts.calibration, loaded.tokenizer, loaded.model, opts.n_calibration, opts.seq_len, seed=opts.seed)
    candidates = [Candidate(b, opts.group_size) for b in bits] + [Candidate(k, opts.group_size, v_bits=v) for k, v in split] + [Candidate(b, 0, "turbo") for b in turbo]
    bar = tqdm(total=len(kv_probes(loaded.model, candidates)), desc="kv sensitivity", unit="probe", disable=opts.quiet or not distributed.is_writer())
    try:
        return measure_kv(loaded.model, tokens, candidates, prefill=opts.prefill, kl_stride=opts.kl_stride,
                          on_probe=with_progress(bar, shared_by_ranks()), gather=distributed.gather)
    finally:
        bar.close()


def split_pairs(text: str) -> list:
    """'8:4,4:2' -> [(8, 4), (4, 2)]: key bits, value bits."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            k, v = (int(x) for x in item.split(":"))
        except ValueError:
            raise OptiqError(f"--split-bits {text!r}: expected K:V pairs such as 8:4,4:2")
        if k not in (2, 3, 4, 5, 6, 8) or v not in (2, 3, 4, 5, 6, 8) or k == v:
            raise OptiqError(f"--split-bits {item!r}: K and V bits differ, each one of 2,3,4,5,6,8")
        pairs.append((k, v))
    return pairs


def main(argv=None, prog="optiq kv-cache") -> int:
    return run_command(KVOptions, run, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
