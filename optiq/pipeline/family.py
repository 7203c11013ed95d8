"""The model-family protocol the conversion pipeline runs over, and what the
three families (text, Whisper, vision-language) share.

A family knows how to load its models, calibrate them, measure their
sensitivity, plan, write their layout and measure what it wrote; the
pipeline (optiq.pipeline.convert) runs those steps in one order for all.
"""

import re
import sys
from collections import Counter
from typing import Callable, Protocol

import attrs
from tqdm.auto import tqdm

from .. import __version__, distributed
from ..errors import OptiqError
from ..evaluate import simulated
from ..io import write_json
from ..plan import uniform_plan
from ..probe_hooks import with_progress
from ..records import Candidate, QuantizedWeights, SensitivityTable
from ..rounding import plan_codes
from .config import ConvertConfig, check_ceiling, refits_scales


@attrs.frozen
class Report:
    """How the pipeline talks to its edge: messages on stderr and tqdm bars,
    or (quiet) neither. Nothing here changes a result."""

    quiet: bool = False

    def log(self, *args):
        if not self.quiet:
            print(*args, file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str, unit: str = "probe"):
        return tqdm(total=total, desc=desc, unit=unit, disable=self.quiet or not distributed.is_writer())

    def probes(self, total: int, desc: str = "sensitivity", inner=None):
        """(on_probe that ticks a bar, the bar to close)."""
        bar = self.bar(total, desc)
        return (with_progress(bar, inner) if inner else with_progress(bar)), bar


@attrs.frozen(eq=False)
class Written:
    """What a family's writer reports back: bytes on disk and mlx-lm's bits per weight."""

    nbytes: int
    mlx_bpw: float


class Family(Protocol):
    """One model family's steps, in the order the pipeline runs them."""

    name: str

    def load(self, config: ConvertConfig, path, report: Report): ...

    def calibrate(self, config: ConvertConfig, loaded, candidates, report: Report): ...

    def measure(self, config: ConvertConfig, loaded, calibration, report: Report) -> tuple: ...  # (SensitivityTable, Rounding)

    def plan(self, config: ConvertConfig, loaded, calibration, table: SensitivityTable, report: Report, budget=None) -> tuple: ...  # (BitPlan, refinement history)

    def time_budget(self, config: ConvertConfig, loaded, candidates, report: Report): ...  # speed.TimeBudget (text only: the others refuse --no-slower-than)

    def held_out(self, config: ConvertConfig, loaded): ...  # None: the written model is not measured

    def baseline(self, config: ConvertConfig, loaded, table, candidates, held_out) -> tuple: ...  # (name, bpw, quality)

    def write(self, config: ConvertConfig, loaded, plan, table, rounding, calibration, out, report: Report) -> tuple: ...  # (Written, metadata)

    def measure_written(self, config: ConvertConfig, out, held_out) -> dict: ...


class ProbedFamily:
    """What the whole-model-probe families (Whisper, vision-language) share:
    the same early checks and refusals, their Rounding in the calibration,
    a one-line plan summary. A subclass names itself (`title`), its data
    folder check (`check_data`) and candidates it always has (`always`)."""

    title: str
    check_data: Callable  # folder -> None, raising OptiqError on what cannot be read
    always: tuple = ()

    def check(self, config: ConvertConfig, cands):
        """Refused before the model loads: the target's ceiling, the data folders."""
        check_ceiling(config, tuple(cands) + self.always)
        for folder in (config.calibration, config.eval_data):
            if folder is not None:
                self.check_data(folder)

    def refuse_text_only_options(self, config: ConvertConfig):
        if config.refine_rounds or config.max_memory or config.sensitivity or config.no_slower_than:
            raise OptiqError(f"{self.title} take neither --refine-rounds, --max-memory, --sensitivity nor --no-slower-than")
        if set(config.modes) != {"affine"}:  # their loaders (mlx-whisper, mlx-vlm) are not known to read a per-layer mode
            raise OptiqError(f"{self.title} are written in MLX's affine mode only; --modes {','.join(config.modes)} is for text models")

    def codes(self, config, loaded, calibration, plan):
        return plan_codes(calibration.rounding, loaded.model, plan)

    def summary(self, plan, report: Report):
        report.log(plan_summary(plan))


def baseline_candidate(cands, target: float) -> Candidate:
    """The uniform candidate to compare against: the largest that fits the target."""
    fitting = [c for c in cands if c.effective_bits <= target + 1e-9 and c.bits < 16]
    return max(fitting or cands, key=lambda c: (c.effective_bits, c.mode == "affine", -c.group_size))


def uniform_row(model, table, cands, target: float, measure_quality, rounding=None, assignments=None) -> tuple:
    """(name, bpw, quality) of every layer at the baseline candidate, by MLX's
    own rounding through the stored dtype: what uniform quantization gives."""
    base = uniform_plan(table, baseline_candidate(cands, target))
    with simulated(model, assignments(base.assignments) if assignments else base.assignments, rounding):
        return (f"uniform {base.method.split()[-1]}", base.effective_bpw, measure_quality())


def plan_summary(plan) -> str:
    counts = Counter(c.key for _, c in plan.assignments)
    by_key = {c.key: c for _, c in plan.assignments}
    mix = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: by_key[kv[0]].effective_bits))
    return (
        f"plan ({plan.method}): {len(plan.assignments)} layers at {plan.effective_bpw:.4f} effective bpw "
        f"(target {plan.target_bpw:g}); predicted KL {plan.predicted_kl:.4f}; bits@group: {mix}"
    )


def per_block_bits(plan) -> str:
    """One line per block: each layer's bits, in a compact form."""
    named = {}
    for path, c in plan.assignments:
        m = re.search(r"layers\.(\d+)\.(.+)$", path)
        block, name = (int(m.group(1)), m.group(2)) if m else (-1, path)
        named.setdefault(block, []).append((name, c.bits))
    rows = {}
    for block, layers in named.items():
        last = [n.split(".")[-1] for n, _ in layers]
        # a name two layers of the block share (an MoE block's routed and shared
        # experts' down_proj) keeps its parent: switch_mlp.down_proj
        rows[block] = [f"{'.'.join(n.split('.')[-2:]) if last.count(n.split('.')[-1]) > 1 else n.split('.')[-1]}={b}" for n, b in layers]
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


def record_measured(out, metadata: dict, rows: list, plan, measured: dict, eval_label: str, **extra) -> dict:
    """The written model's held-out quality beside the baseline row: appended
    to `rows`, kept in the metadata (rewritten in `out`), the table printed."""
    rows.append((f"optiq {plan.method}", plan.effective_bpw, measured))
    base_name, base_bpw, base_q = rows[0]
    metadata["measured"] = {"eval": eval_label, **extra, **measured, "baseline": {"name": base_name, "effective_bpw": base_bpw, **base_q}}
    write_json(out / "optiq_metadata.json", metadata)
    print(results_table(rows))
    return measured


def family_metadata(config: ConvertConfig, model_type: str, calibration: dict, plan, table, **extra) -> dict:
    """optiq_metadata.json of a Whisper or vision-language conversion."""
    return {
        "optiq_version": __version__, "source": str(config.model), "model_type": model_type, "quantizer": config.quantizer,
        "refit_scales": refits_scales(config, config.quantizer), **extra,
        "calibration": calibration, "plan": plan.to_dict(), "sensitivity": table.to_dict(),
        "effective_bpw": plan.effective_bpw, "predicted_kl": plan.predicted_kl,
    }


def not_written(plan) -> QuantizedWeights:
    """Another process's result under mlx.launch: rank 0 writes."""
    return QuantizedWeights(path="", plan=plan, bytes=0, mlx_bits_per_weight=0.0, measured={})
