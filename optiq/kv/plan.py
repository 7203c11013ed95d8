"""KV bit plans: the weight planner's exact knapsack over per-layer KV
sensitivity, under an average-bits budget counted nominally (code width, as
kv_bits counts it) or effectively (scales and biases included)."""

import json
from pathlib import Path

import attrs

from ..plan import layer_cost_bits, nominal_cost_bits, plan_bits
from ..records import SensitivityTable


@attrs.frozen
class KVPlan:
    layers: tuple = attrs.field(converter=lambda v: tuple(dict(x) for x in v))  # kv_config entries
    target_bits: float
    average_bits: float  # nominal
    effective_bits: float  # with fp16 scales and biases per group
    predicted_kl: float
    skipped_layers: tuple = attrs.field(default=(), converter=tuple)  # layers with no KV cache

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["layers"] = [dict(x) for x in self.layers]
        d["skipped_layers"] = list(self.skipped_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KVPlan":
        return cls(**{k: d[k] for k in d if k in attrs.fields_dict(cls)})


def plan_kv(table: SensitivityTable, target_bits: float, n_layers: int, nominal: bool = True) -> KVPlan:
    cost = nominal_cost_bits if nominal else layer_cost_bits
    plan = plan_bits(table, target_bits, cost=cost)
    n = {l.path: l.n_params for l in table.layers}
    total = sum(n.values())
    entries = [
        {"layer_idx": int(p.split(".")[1]), "bits": c.bits, "group_size": c.group_size, **({"mode": c.mode} if c.mode != "affine" else {})}
        for p, c in plan.assignments
    ]
    planned = {e["layer_idx"] for e in entries}
    return KVPlan(
        layers=sorted(entries, key=lambda e: e["layer_idx"]),
        target_bits=float(target_bits),
        average_bits=sum(nominal_cost_bits(n[p], c) for p, c in plan.assignments) / total,
        effective_bits=sum(layer_cost_bits(n[p], c) for p, c in plan.assignments) / total,
        predicted_kl=plan.predicted_kl,
        skipped_layers=tuple(i for i in range(n_layers) if i not in planned),
    )


def write_kv_config(plan: KVPlan, folder) -> Path:
    """kv_config.json (the seed's list format) and kv_plan.json (the record)."""
    from ..io import write_json

    folder = Path(folder)
    write_json(folder / "kv_config.json", [dict(e) for e in plan.layers])
    write_json(folder / "kv_plan.json", plan.to_dict())
    return folder / "kv_config.json"


def read_kv_config(path) -> KVPlan:
    """A plan from kv_config.json (a list, or the record from kv_plan.json)."""
    from ..errors import OptiqError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OptiqError(f"cannot read KV config {path}: {exc}")
    if isinstance(data, dict):
        return KVPlan.from_dict(data)
    if not isinstance(data, list) or not all(isinstance(e, dict) and {"layer_idx", "bits", "group_size"} <= set(e) for e in data):
        raise OptiqError(f"{path}: expected a list of {{layer_idx, bits, group_size}}")
    bits = [e["bits"] for e in data]
    avg = sum(bits) / len(bits) if bits else 16.0
    return KVPlan(layers=data, target_bits=avg, average_bits=avg, effective_bits=avg, predicted_kl=float("nan"))
