"""Decode speed as a second planning budget: each layer's matmul time per format.

Where the quantized kernels are not bandwidth-bound (MLX-CUDA 0.32 on an
H200: 5- and 6-bit layers decode slower than 4-bit, 8-bit g128 faster), fewer
bits are not less time, and a plan that is smaller than uniform 4-bit can be
slower. `measure_kernel_times` times one decode step's matmul for every
(layer shape, candidate) on the device at hand; `layer_seconds` turns those
times into per-layer option costs that `optiq.plan.plan_bits` budgets next to
the bits, so a plan can be held to "no slower than uniform 4-bit g64".

The model: a decode step's matmul time is the sum of its layers' kernel
times, each measured alone with its input in the model's dtype. Attention,
norms and the KV cache are the same for every plan, so they drop out of the
comparison. An input embedding is a row gather at decode, not a matmul: it
costs nothing here unless the model ties it to the output head.
"""

import math
import statistics
import time

import attrs
import mlx.core as mx

from .errors import OptiqError
from .model_tree import fits_input, is_experts, is_tied, quantizable_layers
from .records import (
    FLOAT_BITS,
    Candidate,
    Record,
    SensitivityTable,
    _candidates,
    load_kept,
)

# Weights timed per call, at least: one layer's 4-bit weights can sit in a
# GPU's L2 cache, which a real decode step (every layer once) would not.
MIN_TIMED_BYTES = 256 << 20
MAX_COPIES = 64


def _shape(value) -> tuple:
    return tuple(int(x) for x in value)


@attrs.frozen
class KernelTime(Record):
    """Seconds of one matmul of a decode step's input by an (out, in) weight stored as `candidate`."""

    shape: tuple[int, int] = attrs.field(converter=_shape)
    candidate: Candidate = attrs.field(converter=lambda c: _candidates([c])[0])
    seconds: float = attrs.field(converter=float)


def _times(value) -> tuple:
    return tuple(t if isinstance(t, KernelTime) else KernelTime.from_dict(t) for t in value)


@attrs.frozen
class KernelTimes(Record):
    """Kernel times measured on one device, for one batch size and input dtype.
    rows_folded: the input was (batch, in), as optiq serve multiplies a
    batched decode step (optiq/cuda.py); else (batch, 1, in), as stock
    mlx-lm feeds it (MLX-CUDA multiplies that several times slower at batch > 1)."""

    device: str
    batch: int
    dtype: str
    times: tuple[KernelTime, ...] = attrs.field(converter=_times)
    rows_folded: bool = True

    def seconds(self, shape, candidate: Candidate) -> float:
        shape = _shape(shape)
        for t in self.times:
            if t.shape == shape and t.candidate == candidate:
                return t.seconds
        raise KeyError((shape, candidate.key))


def load_kernel_times(path) -> KernelTimes:
    """A KernelTimes JSON file, or the `kernel_times` an optiq_metadata.json holds."""
    try:
        return load_kept(KernelTimes, path, "kernel_times")
    except FileNotFoundError:
        raise OptiqError(f"--kernel-times {path}: no such file") from None
    except (ValueError, AttributeError, TypeError) as exc:
        raise OptiqError(f"--kernel-times {path}: not kernel times ({exc})") from None


@attrs.frozen(eq=False)
class TimeBudget:
    """What holds a plan to a format's decode time: the kernel times, the
    model's layer shapes as a decode step multiplies them, and the format."""

    times: KernelTimes
    shapes: dict  # path -> (out, in), or None: not multiplied at decode
    limit: Candidate

    def plan_args(self, table: SensitivityTable) -> dict:
        """`plan_bits`' seconds and seconds_budget over this table's layers."""
        seconds = layer_seconds(self.times, self.shapes, table)
        return {"seconds": seconds, "seconds_budget": uniform_seconds(self.times, self.shapes, seconds, self.limit)}


def layer_shapes(model) -> dict:
    """{path: (out, in)} of every plannable layer as its decode step multiplies
    it, or None where it is not multiplied (an untied input embedding)."""
    tied = is_tied(model)
    shapes = {}
    for path, module in quantizable_layers(model):
        if is_experts(module) or module.weight.ndim != 2:
            raise OptiqError(f"{path}: decode time is planned for dense layers only (this layer stacks {module.weight.shape[0]} weights)")
        is_embedding = "embed" in path and not path.endswith("lm_head")
        shapes[path] = tuple(module.weight.shape) if (tied or not is_embedding) else None
    return shapes


def timed_pairs(shapes, candidates) -> list:
    """Every (shape, candidate) a plan over layers of these shapes may use, in
    one order: a candidate whose group size does not divide a layer is never
    planned there. Shapes of None (not multiplied at decode) need none."""
    return [(s, c) for s in sorted({_shape(s) for s in shapes if s is not None}) for c in candidates if fits_input(s[1], c)]


def _timed_call(weights, x, candidate: Candidate):
    """A function running one matmul per copy of the weights (all of them, one eval)."""
    if candidate.bits >= FLOAT_BITS:
        return lambda: [x @ w.T for w in weights]
    return lambda: [
        mx.quantized_matmul(x, *w, transpose=True, group_size=candidate.group_size, bits=candidate.bits, mode=candidate.mode)
        for w in weights
    ]


def _stored(w, candidate: Candidate):
    if candidate.bits >= FLOAT_BITS:
        return w
    parts = mx.quantize(w, group_size=candidate.group_size, bits=candidate.bits, mode=candidate.mode)
    return tuple(p for p in parts if p is not None)


def time_kernel(shape, candidate: Candidate, batch: int = 1, dtype=mx.bfloat16, repeats: int = 15, rows_folded: bool = True) -> float:
    """Median seconds of one (batch, in) x (out, in)^T matmul (an input of
    (batch, 1, in) unless `rows_folded`) with the weight stored as
    `candidate`, over enough distinct copies of random weights that they do
    not fit in a cache."""
    out_dim, in_dim = _shape(shape)
    nbytes = out_dim * in_dim * candidate.effective_bits / 8  # effective_bits is 16 for a float weight
    copies = max(2, min(MAX_COPIES, math.ceil(MIN_TIMED_BYTES / max(nbytes, 1))))
    weights = [_stored(mx.random.normal((out_dim, in_dim), key=mx.random.key(i)).astype(dtype) * 0.02, candidate) for i in range(copies)]
    x = mx.random.normal((batch, in_dim) if rows_folded else (batch, 1, in_dim), key=mx.random.key(copies)).astype(dtype)
    mx.eval(weights, x)
    call = _timed_call(weights, x, candidate)
    for _ in range(3):  # compile and warm
        mx.eval(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(call())
        samples.append((time.perf_counter() - start) / copies)
    del weights
    mx.clear_cache()
    return statistics.median(samples)


def measure_kernel_times(shapes, candidates, batch: int = 1, dtype=mx.bfloat16, repeats: int = 15, device: str = "", on_time=None,
                         rows_folded: bool = True) -> KernelTimes:
    """Every pair of `timed_pairs` timed by `time_kernel`; `on_time()` after each."""
    if batch < 1:
        raise OptiqError(f"the decode batch must be >= 1, got {batch}")
    times = []
    for shape, candidate in timed_pairs(shapes, candidates):
        times.append(KernelTime(shape, candidate, time_kernel(shape, candidate, batch, dtype, repeats, rows_folded)))
        if on_time is not None:
            on_time()
    return KernelTimes(device=device, batch=batch, dtype=str(dtype).split(".")[-1], times=times, rows_folded=rows_folded)


def missing_times(times: KernelTimes, shapes: dict, candidates) -> list:
    """(shape, candidate key) pairs a plan over these layers and candidates would need and `times` lacks."""
    have = {(t.shape, t.candidate) for t in times.times}
    return [(s, c.key) for s, c in timed_pairs(shapes.values(), candidates) if (s, c) not in have]


def layer_seconds(times: KernelTimes, shapes: dict, table: SensitivityTable) -> dict:
    """{path: seconds per candidate, in the order of the table's layer}: what
    `plan_bits(seconds=...)` takes. A layer without a shape costs 0."""
    out = {}
    for layer in table.layers:
        if layer.path not in shapes:
            raise OptiqError(f"no shape for {layer.path}: the kernel times are for another model")
        shape = shapes[layer.path]
        try:
            out[layer.path] = tuple(0.0 if shape is None else times.seconds(shape, c) for c in layer.candidates)
        except KeyError as exc:
            shape, key = exc.args[0]
            raise OptiqError(f"the kernel times have no {key} at shape {shape[0]}x{shape[1]} ({layer.path}): measure them for this model") from None
    return out


def uniform_seconds(times: KernelTimes, shapes: dict, seconds: dict, candidate: Candidate) -> float:
    """A decode step's matmul time with every layer of `seconds` at `candidate`;
    a layer it does not fit counts its fastest option, so a budget from it is
    no looser than the uniform model."""
    total = 0.0
    for path, options in seconds.items():
        shape = shapes[path]
        if shape is None:
            continue
        try:
            total += times.seconds(shape, candidate)
        except KeyError:
            if fits_input(shape[1], candidate):
                raise OptiqError(f"the kernel times have no {candidate.key} at shape {shape[0]}x{shape[1]} ({path}): measure them with it") from None
            total += min(options)
    return total


def plan_seconds(seconds: dict, table: SensitivityTable, plan) -> float:
    """A plan's decode-step matmul time under the same kernel times."""
    return float(sum(seconds[path][table.layer(path).candidates.index(c)] for path, c in plan.assignments))
