"""KV bit plans: the weight planner's exact knapsack over per-layer KV
sensitivity, under an average-bits budget counted nominally (code width, as
kv_bits counts it) or effectively (scales and biases included)."""

import json
from pathlib import Path

from ..errors import OptiqError
from ..io import write_json
from ..plan import layer_cost_bits, nominal_cost_bits, plan_bits
from ..records import KVEntry, KVPlan, SensitivityTable


def plan_kv(table: SensitivityTable, target_bits: float, n_layers: int, nominal: bool = True, sliding=()) -> KVPlan:
    """The least-KL plan whose cache holds at most `target_bits` per entry on
    average at every context length. A sliding-window layer (index in
    `sliding`) keeps at most its window while a full-attention layer keeps the
    whole context, so the bytes-weighted mean moves from the plain per-layer
    mean (context within the window) to the full layers' mean (long context):
    both must meet the target, a knapsack with a nested budget."""
    cost = nominal_cost_bits if nominal else layer_cost_bits
    sliding = set(sliding)
    full = [l.path for l in table.layers if _layer_idx(l.path) not in sliding]
    nested = full if sliding and full else ()
    plan = plan_bits(table, target_bits, cost=cost, nested=nested)
    n = {l.path: l.n_params for l in table.layers}
    total = sum(n.values())
    chosen = dict(plan.assignments)
    long_bits = sum(nominal_cost_bits(n[p], chosen[p]) for p in full) / sum(n[p] for p in full) if full else None
    entries = [KVEntry(_layer_idx(p), c.bits, c.group_size, c.mode, c.v_bits) for p, c in plan.assignments]
    planned = {e.layer_idx for e in entries}
    return KVPlan(
        layers=sorted(entries, key=lambda e: e.layer_idx),
        target_bits=float(target_bits),
        average_bits=sum(nominal_cost_bits(n[p], c) for p, c in plan.assignments) / total,
        effective_bits=sum(layer_cost_bits(n[p], c) for p, c in plan.assignments) / total,
        predicted_kl=plan.predicted_kl,
        skipped_layers=tuple(i for i in range(n_layers) if i not in planned),
        long_context_bits=long_bits,
    )


def _layer_idx(path: str) -> int:
    return int(path.split(".")[1])


def write_kv_config(plan: KVPlan, folder) -> Path:
    """kv_config.json (the seed's list format) and kv_plan.json (the record)."""
    folder = Path(folder)
    write_json(folder / "kv_config.json", [e.to_dict() for e in plan.layers])
    write_json(folder / "kv_plan.json", plan.to_dict())
    return folder / "kv_config.json"


def read_kv_config(path) -> KVPlan:
    """A plan from kv_config.json (a list, or the record from kv_plan.json)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OptiqError(f"cannot read KV config {path}: {exc}")
    if isinstance(data, dict):
        try:
            return KVPlan.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise OptiqError(f"{path}: {exc}")
    if not isinstance(data, list) or not all(isinstance(e, dict) and {"layer_idx", "bits", "group_size"} <= set(e) for e in data):
        raise OptiqError(f"{path}: expected a list of {{layer_idx, bits, group_size}}")
    for e in data:
        problem = entry_problem(e)
        if problem:
            raise OptiqError(f"{path}: layer {e.get('layer_idx')}: {problem}")
    entries = [KVEntry.from_dict(e) for e in data]
    bits = [(e.bits + e.value_bits) / 2 for e in entries]
    avg = sum(bits) / len(bits) if bits else 16.0
    return KVPlan(layers=entries, target_bits=avg, average_bits=avg, effective_bits=avg)


def entry_problem(e: dict) -> str | None:
    """What is wrong with one kv_config entry, or None."""
    if e.get("mode", "affine") == "turbo":
        return None if e["bits"] in (1, 2, 3, 4) else f"TurboQuant bits must be 1-4, got {e['bits']}"
    if e.get("mode", "affine") != "affine":
        return f"unknown mode {e['mode']!r} (affine or turbo)"
    for key in ("bits", "v_bits"):
        if key in e and e[key] not in (2, 3, 4, 5, 6, 8, 16):
            return f"{key} must be one of 2, 3, 4, 5, 6, 8 (16: unquantized), got {e[key]}"
    if e["group_size"] not in (32, 64, 128):
        return f"group_size must be 32, 64 or 128, got {e['group_size']}"
    return None
