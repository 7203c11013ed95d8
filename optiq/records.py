"""The immutable records that flow between optiq's stages, with one JSON form.

    LayerSensitivity -> SensitivityTable -> BitPlan -> QuantizedWeights
                                              KVEntry -> KVPlan
                                            LoRAModule -> LoRAPlan

Every record is a frozen attrs class built from tuples, scalars and other
records, so it is hashable and no later stage can change it. One cattrs
converter gives every record its JSON form (`to_dict`/`from_dict`, `to_json`/
`from_json`): the same shapes optiq has always written (a candidate omits its
default mode and value width, a KV entry is the seed's `{layer_idx, bits,
group_size}`), and unknown keys in a file are ignored.
"""

import json
import math
from pathlib import Path
from typing import Optional

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

FLOAT_BITS = 16  # an unquantized weight, stored as fp16/bf16
# MLX's microscaling weight formats: mode -> (code bits, group size), fixed by the format.
FP_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


class Record:
    """`to_dict`/`from_dict` through the one converter below."""

    def to_dict(self) -> dict:
        return CONVERTER.unstructure(self)

    @classmethod
    def from_dict(cls, d: dict):
        try:
            return CONVERTER.structure(d, cls)
        except cattrs.BaseValidationError as exc:  # a message that names the field, not an exception group
            raise ValueError(f"not a {cls.__name__}: {'; '.join(cattrs.transform_error(exc))}") from None


def _floats(v) -> tuple:
    return tuple(float(x) for x in v)


def _bools(v) -> tuple:
    return tuple(bool(x) for x in v)


def _optional_float(v):
    """None stays None, and so does NaN (an old kv_plan.json's 'unknown'): a
    record must equal itself, which a NaN field does not."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@attrs.frozen(order=True)
class Candidate(Record):
    """One way to store a layer: affine `bits` with `group_size` (bits=16: unquantized),
    one of MLX's microscaling formats (mode "mxfp4", "nvfp4", "mxfp8": float
    codes sharing an 8-bit scale per group, no bias), or, for KV caches, mode
    "turbo": TurboQuant codes with one fp16 norm per vector of `group_size`
    (the head dimension) elements. A KV candidate may give values their own
    width (`v_bits`; 0: the same as the keys' `bits`)."""

    bits: int = attrs.field(converter=int)
    group_size: int = attrs.field(default=64, converter=int)
    mode: str = "affine"
    v_bits: int = attrs.field(default=0, converter=int)

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
        if self.mode in FP_MODES:  # one 8-bit scale per group (E8M0 for mx, E4M3 for nv)
            return self.code_bits + 8.0 / self.group_size
        # One fp16 scale and one fp16 bias per group, as MLX's affine mode stores them.
        return self.code_bits + 32.0 / self.group_size

    @property
    def key(self) -> str:
        v = f"/{self.v_bits}" if self.v_bits else ""
        if self.mode in FP_MODES:
            return f"{self.mode}@{self.group_size}"
        return f"{'turbo' if self.mode == 'turbo' else ''}{self.bits}{v}@{self.group_size}"


def candidate_from_key(key: str) -> Candidate:
    """The candidate a `Candidate.key` names: "4@64", "8@128", "mxfp4@32", "16"."""
    text = key.strip()
    head, _, group = text.partition("@")
    try:
        if head in FP_MODES:
            bits, size = FP_MODES[head]
            if group and int(group) != size:
                raise ValueError
            return Candidate(bits, size, head)
        bits = int(head)
        if bits >= FLOAT_BITS and not group:
            return Candidate(FLOAT_BITS, 64)  # as the planners hold a float layer
        if not group or bits < 1:
            raise ValueError
        return Candidate(bits, int(group))
    except ValueError:
        raise ValueError(f"{key!r} is not a format: write BITS@GROUP (e.g. 4@64) or {'/'.join(f'{m}@{g}' for m, (_, g) in FP_MODES.items())}") from None


def sort_candidates(cands) -> tuple:
    """Candidates in one fixed order (width, group, mode): mxfp4@32 and 4@32 share width and group."""
    return tuple(sorted(set(cands), key=lambda c: (c.bits, c.group_size, c.mode)))


def _candidates(value) -> tuple:
    return tuple(c if isinstance(c, Candidate) else Candidate.from_dict(c) for c in value)


@attrs.frozen
class LayerSensitivity(Record):
    """KL(reference || model with only this layer quantized), per candidate.

    `measured[i]` says whether `kl[i]` was measured by a probe or predicted from
    the layer's weight-space output error `error[i]`.
    """

    path: str
    n_params: int
    candidates: tuple[Candidate, ...] = attrs.field(converter=_candidates)
    kl: tuple[float, ...] = attrs.field(converter=_floats)
    measured: tuple[bool, ...] = attrs.field(converter=_bools)
    error: tuple[float, ...] = attrs.field(converter=_floats)
    calibration_digest: str = ""
    reference: str = "fp32"
    roles: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @kl.validator
    def _check(self, _, value):
        n = len(self.candidates)
        if not (len(value) == len(self.measured) == len(self.error) == n):
            raise ValueError(f"{self.path}: kl/measured/error must have {n} entries")

    def kl_of(self, candidate: Candidate) -> float:
        return self.kl[self.candidates.index(candidate)]


def _layers(value) -> tuple:
    return tuple(x if isinstance(x, LayerSensitivity) else LayerSensitivity.from_dict(x) for x in value)


@attrs.frozen
class SensitivityTable(Record):
    """Per-layer sensitivity of one model on one calibration set."""

    model: str
    layers: tuple[LayerSensitivity, ...] = attrs.field(converter=_layers)
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


def _assignments(value) -> tuple:
    return tuple((str(path), cand if isinstance(cand, Candidate) else Candidate.from_dict(cand)) for path, cand in value)


@attrs.frozen
class BitPlan(Record):
    """A candidate for every planned layer and what the planner expects of it."""

    assignments: tuple[tuple[str, Candidate], ...] = attrs.field(converter=_assignments)
    target_bpw: float
    effective_bpw: float
    predicted_kl: float
    method: str
    optimality_gap: float = 0.0  # proven upper bound on (plan KL - optimal KL)
    # Planned under a time budget (optiq.speed): the plan's summed layer time and that budget, in seconds.
    predicted_seconds: Optional[float] = attrs.field(default=None, converter=_optional_float)
    seconds_budget: Optional[float] = attrs.field(default=None, converter=_optional_float)

    def as_dict(self) -> dict:
        return dict(self.assignments)


def _sorted_pairs(value) -> tuple:
    """A mapping as sorted (name, float) pairs: hashable, and order-free like JSON."""
    items = value.items() if isinstance(value, dict) else value
    return tuple(sorted((str(k), float(x)) for k, x in items))


def _plan(value) -> BitPlan:
    return value if isinstance(value, BitPlan) else BitPlan.from_dict(value)


@attrs.frozen
class QuantizedWeights(Record):
    """What `optiq convert` wrote: where, by which plan, how big, how good."""

    path: str
    plan: BitPlan = attrs.field(converter=_plan)
    bytes: int
    mlx_bits_per_weight: float  # mlx_lm.utils.compute_bits_per_weight (norms included)
    measured: tuple[tuple[str, float], ...] = attrs.field(default=(), converter=_sorted_pairs)


@attrs.frozen
class KVEntry(Record):
    """One cached layer's storage in kv_config.json: keys at `bits` (values at
    `v_bits`, 0: the same), affine groups of `group_size` along the head
    dimension, or mode "turbo" (TurboQuant, `seed` for its rotations)."""

    layer_idx: int = attrs.field(converter=int)
    bits: int = attrs.field(converter=int)
    group_size: int = attrs.field(default=64, converter=int)
    mode: str = "affine"
    v_bits: int = attrs.field(default=0, converter=int)
    seed: int = attrs.field(default=0, converter=int)

    @property
    def value_bits(self) -> int:
        return self.v_bits or self.bits

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.bits, self.group_size, self.mode, self.v_bits if self.v_bits != self.bits else 0)


def _entries(value) -> tuple:
    return tuple(e if isinstance(e, KVEntry) else KVEntry.from_dict(e) for e in value)


@attrs.frozen
class KVPlan(Record):
    """A KV-cache bit plan: an entry per cached layer and what it costs and predicts."""

    layers: tuple[KVEntry, ...] = attrs.field(converter=_entries)
    target_bits: float
    average_bits: float  # nominal
    effective_bits: float  # with fp16 scales and biases per group
    predicted_kl: Optional[float] = attrs.field(default=None, converter=_optional_float)  # None: not predicted (a hand-written config)
    skipped_layers: tuple[int, ...] = attrs.field(default=(), converter=tuple)  # layers with no KV cache
    # nominal mean over the full-attention layers alone: what the cache averages
    # once the context is long (sliding-window layers stop growing at their window)
    long_context_bits: Optional[float] = attrs.field(default=None, converter=_optional_float)


@attrs.frozen
class LoRAModule(Record):
    path: str
    rank: int
    alpha: float
    in_dims: int
    out_dims: int

    @property
    def params(self) -> int:
        return self.rank * (self.in_dims + self.out_dims)


def _modules(value) -> tuple:
    return tuple(m if isinstance(m, LoRAModule) else LoRAModule.from_dict(m) for m in value)


@attrs.frozen
class LoRAPlan(Record):
    """A rank and alpha per adapted module."""

    modules: tuple[LoRAModule, ...] = attrs.field(converter=_modules)
    scaling: str = "constant"
    base_rank: int = 8
    alpha_ratio: float = 2.0
    base_model: str = ""
    n_layers: int = 0  # the base model's blocks (0: unknown); mlx-lm export needs it
    init: str = "zero"  # how adapters started: b = 0, or "residual" (LoftQ: fitted to W_ref - dequant(Q(W)))

    @property
    def trainable_params(self) -> int:
        return sum(m.params for m in self.modules)


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    omit = override(omit_if_default=True)
    conv.register_unstructure_hook(Candidate, make_dict_unstructure_fn(Candidate, conv, mode=omit, v_bits=omit))
    conv.register_unstructure_hook(BitPlan, make_dict_unstructure_fn(BitPlan, conv, predicted_seconds=omit, seconds_budget=omit))
    conv.register_unstructure_hook(KVEntry, make_dict_unstructure_fn(KVEntry, conv, mode=omit, v_bits=omit, seed=omit))
    # Measured quality is a name -> number mapping in JSON, sorted pairs in the record.
    pairs = override(unstruct_hook=dict, struct_hook=lambda v, _: _sorted_pairs(v))
    conv.register_unstructure_hook(QuantizedWeights, make_dict_unstructure_fn(QuantizedWeights, conv, measured=pairs))
    conv.register_structure_hook(QuantizedWeights, make_dict_structure_fn(QuantizedWeights, conv, measured=pairs))
    return conv


CONVERTER = _converter()


def to_json(record) -> str:
    return json.dumps(record.to_dict(), indent=2, sort_keys=True)


def from_json(cls, text: str):
    return cls.from_dict(json.loads(text))


def load_record(cls, path):
    return from_json(cls, Path(path).read_text())


def load_kept(cls, path, key: str):
    """A `cls` record from its own JSON file, or the one a converted model's
    optiq_metadata.json (the file, or its folder) keeps under `key`."""
    path = Path(path)
    data = json.loads((path / "optiq_metadata.json" if path.is_dir() else path).read_text())
    return cls.from_dict(data.get(key, data))


def load_sensitivity(path) -> SensitivityTable:
    """A SensitivityTable JSON, or the table a converted model was planned from."""
    return load_kept(SensitivityTable, path, "sensitivity")
