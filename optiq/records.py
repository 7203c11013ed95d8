"""The immutable records that flow between optiq's stages, with a JSON form.

Every record is a frozen attrs class built from tuples and scalars, so it is
hashable, cannot be changed by a later stage, and `to_dict`/`from_dict` round
trip it through JSON exactly.
"""

import json
from pathlib import Path

import attrs

FLOAT_BITS = 16  # an unquantized weight, stored as fp16/bf16


@attrs.frozen(order=True)
class Candidate:
    """One way to store a layer: affine `bits` with `group_size` (bits=16: unquantized),
    or, for KV caches, mode "turbo": TurboQuant codes with one fp16 norm per
    vector of `group_size` (the head dimension) elements. A KV candidate may
    give values their own width (`v_bits`; 0: the same as the keys' `bits`)."""

    bits: int
    group_size: int = 64
    mode: str = "affine"
    v_bits: int = 0

    @property
    def code_bits(self) -> float:
        """Mean code width over the layer (keys and values hold equal counts)."""
        return (self.bits + self.v_bits) / 2 if self.v_bits else float(self.bits)

    @property
    def effective_bits(self) -> float:
        if self.bits >= FLOAT_BITS:
            return float(FLOAT_BITS)
        if self.mode == "turbo":
            return self.code_bits + 16.0 / self.group_size
        # One fp16 scale and one fp16 bias per group, as MLX's affine mode stores them.
        return self.code_bits + 32.0 / self.group_size

    @property
    def key(self) -> str:
        v = f"/{self.v_bits}" if self.v_bits else ""
        return f"{'turbo' if self.mode == 'turbo' else ''}{self.bits}{v}@{self.group_size}"

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size}
        if self.mode != "affine":
            d["mode"] = self.mode
        if self.v_bits:
            d["v_bits"] = self.v_bits
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        return cls(int(d["bits"]), int(d["group_size"]), str(d.get("mode", "affine")), int(d.get("v_bits", 0)))


def _candidates(value) -> tuple:
    return tuple(c if isinstance(c, Candidate) else Candidate.from_dict(c) for c in value)


@attrs.frozen
class LayerSensitivity:
    """KL(reference || model with only this layer quantized), per candidate.

    `measured[i]` says whether `kl[i]` was measured by a probe or predicted from
    the layer's weight-space output error `error[i]`.
    """

    path: str
    n_params: int
    candidates: tuple = attrs.field(converter=_candidates)
    kl: tuple = attrs.field(converter=lambda v: tuple(float(x) for x in v))
    measured: tuple = attrs.field(converter=lambda v: tuple(bool(x) for x in v))
    error: tuple = attrs.field(converter=lambda v: tuple(float(x) for x in v))
    calibration_digest: str = ""
    reference: str = "fp32"
    roles: tuple = attrs.field(default=(), converter=tuple)

    @kl.validator
    def _check(self, _, value):
        n = len(self.candidates)
        if not (len(value) == len(self.measured) == len(self.error) == n):
            raise ValueError(f"{self.path}: kl/measured/error must have {n} entries")

    def kl_of(self, candidate: Candidate) -> float:
        return self.kl[self.candidates.index(candidate)]

    def to_dict(self) -> dict:
        d = attrs.asdict(self, recurse=False)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        for k in ("kl", "measured", "error", "roles"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSensitivity":
        return cls(**{k: d[k] for k in d if k in attrs.fields_dict(cls)})


@attrs.frozen
class SensitivityTable:
    """Per-layer sensitivity of one model on one calibration set."""

    model: str
    layers: tuple = attrs.field(
        converter=lambda v: tuple(
            x if isinstance(x, LayerSensitivity) else LayerSensitivity.from_dict(x) for x in v
        )
    )
    calibration_digest: str = ""
    n_tokens: int = 0
    reference: str = "fp32"
    method: str = "probe"

    def restricted(self, keep) -> "SensitivityTable":
        """The same table with only the candidates `keep(candidate)` accepts
        (unquantized always stays): plan over a subset without re-measuring."""

        def one(layer):
            idx = [i for i, c in enumerate(layer.candidates) if c.bits >= FLOAT_BITS or keep(c)]
            pick = lambda v: [v[i] for i in idx]  # noqa: E731
            return attrs.evolve(layer, candidates=pick(layer.candidates), kl=pick(layer.kl), measured=pick(layer.measured), error=pick(layer.error))

        return attrs.evolve(self, layers=[one(layer) for layer in self.layers])

    def layer(self, path: str) -> LayerSensitivity:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(path)

    def to_dict(self) -> dict:
        d = attrs.asdict(self, recurse=False)
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        return cls(**{k: d[k] for k in d if k in attrs.fields_dict(cls)})


def _assignments(value) -> tuple:
    out = []
    for path, cand in value:
        out.append((str(path), cand if isinstance(cand, Candidate) else Candidate.from_dict(cand)))
    return tuple(out)


@attrs.frozen
class BitPlan:
    """A candidate for every planned layer and what the planner expects of it."""

    assignments: tuple = attrs.field(converter=_assignments)  # ((path, Candidate), ...)
    target_bpw: float
    effective_bpw: float
    predicted_kl: float
    method: str
    optimality_gap: float = 0.0  # proven upper bound on (plan KL - optimal KL)

    def as_dict(self) -> dict:
        return dict(self.assignments)

    def to_dict(self) -> dict:
        d = attrs.asdict(self, recurse=False)
        d["assignments"] = [[p, c.to_dict()] for p, c in self.assignments]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BitPlan":
        return cls(**{k: d[k] for k in d if k in attrs.fields_dict(cls)})


def _sorted_pairs(value) -> tuple:
    """A mapping as sorted (name, float) pairs: hashable, and order-free like JSON."""
    items = value.items() if isinstance(value, dict) else value
    return tuple(sorted((str(k), float(x)) for k, x in items))


@attrs.frozen
class QuantizedWeights:
    """What `optiq convert` wrote: where, by which plan, how big, how good."""

    path: str
    plan: BitPlan = attrs.field(
        converter=lambda v: v if isinstance(v, BitPlan) else BitPlan.from_dict(v)
    )
    bytes: int
    mlx_bits_per_weight: float  # mlx_lm.utils.compute_bits_per_weight (norms included)
    measured: tuple = attrs.field(default=(), converter=lambda v: _sorted_pairs(v))

    def to_dict(self) -> dict:
        d = attrs.asdict(self, recurse=False)
        d["plan"] = self.plan.to_dict()
        d["measured"] = dict(self.measured)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantizedWeights":
        return cls(**{k: d[k] for k in d if k in attrs.fields_dict(cls)})


def to_json(record) -> str:
    return json.dumps(record.to_dict(), indent=2, sort_keys=True)


def from_json(cls, text: str):
    return cls.from_dict(json.loads(text))


def load_record(cls, path):
    return from_json(cls, Path(path).read_text())
