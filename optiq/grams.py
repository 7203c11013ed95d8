"""Gram matrices X^T X of each Linear's inputs over the calibration passes:
GPTQ's Hessian, and the weighting of every weight-space error estimate.

A `GramTap` wraps a Linear for the time of the calibration forwards and adds
its input's X^T X into a mapping; `grams_tapped` puts taps in and takes them
out. A routed expert projection (SwitchLinear) gets an `ExpertGramTap`: one
Gram per expert over the tokens the reference routed to it, kept as
{expert: X_e^T X_e} (experts that saw no token have none), and the count of
tokens each expert saw. Streamed models keep complete Grams on disk
(`DiskGrams`): a Gram of an 11008-wide input is 484 MB.
"""

import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model_tree import container_of, is_experts


class GramTap(nn.Module):
    """Stands in for a Linear: adds X^T X of its input to grams[path]."""

    def __init__(self, inner, grams, path):
        super().__init__()
        self.inner = inner  # stream.leaf_owner looks through `.inner`
        self._grams, self._path = grams, path

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self._grams[self._path] = self._grams.get(self._path, 0) + flat.T @ flat
        mx.eval(self._grams[self._path])
        return self.inner(x)


class ExpertGramTap(nn.Module):
    """Stands in for a SwitchLinear: adds each expert's X_e^T X_e (the rows
    routed to expert e) to grams[path][e] and its token count to counts[path].
    Sibling taps (`last`, shared by the projections of one SwitchGLU) that
    receive the very same input (gate_proj and up_proj) share one Gram
    mapping: an expert Gram of a 2048-wide input over 128 experts is 2 GiB."""

    def __init__(self, inner, grams, path, counts, last):
        super().__init__()
        self.inner = inner
        self._grams, self._path, self._counts, self._last = grams, path, counts, last

    def __call__(self, x, indices, sorted_indices=False):
        seen_by = self._last.get("path")
        if seen_by is not None and seen_by != self._path and self._last["x"] is x and self._last["indices"] is indices:
            self._grams[self._path] = self._grams[seen_by]  # the same inputs: the same Grams, held once
            self._counts[self._path] = self._counts[seen_by]
            return self.inner(x, indices, sorted_indices=sorted_indices)
        self._last.update(path=self._path, x=x, indices=indices)
        rows, experts = routed_rows(x, indices)
        n_experts = self.inner.weight.shape[0]
        seen = np.bincount(experts, minlength=n_experts)
        self._counts[self._path] = self._counts.get(self._path, 0) + seen
        order = np.argsort(experts, kind="stable")
        ends = np.cumsum(seen)
        by_expert = rows[mx.array(order)]
        grams = self._grams.setdefault(self._path, {})
        for e in np.nonzero(seen)[0]:
            xe = by_expert[int(ends[e] - seen[e]) : int(ends[e])]
            grams[int(e)] = grams.get(int(e), 0) + xe.T @ xe
        mx.eval(list(grams.values()))
        return self.inner(x, indices, sorted_indices=sorted_indices)


def routed_rows(x, indices) -> tuple:
    """(rows (n, in) in fp32, expert of each row (n,) as numpy) of a
    SwitchLinear call: gather_mm broadcasts x's batch dimensions against the
    indices, and each of x's M rows goes to every index of its token."""
    m, width = x.shape[-2], x.shape[-1]
    batch = mx.broadcast_to(x, indices.shape + (m, width))
    rows = batch.reshape(-1, width).astype(mx.float32)
    experts = np.repeat(np.asarray(indices.reshape(-1)), m)
    return rows, experts


@contextmanager
def grams_tapped(model, layers, grams, counts=None):
    """Inside, every Linear among `layers` ([(path, module)]) adds its inputs'
    X^T X to `grams`, every expert projection its per-expert Grams (and, into
    `counts`, its tokens per expert); yields the tapped paths."""
    linears = [(p, m) for p, m in layers if isinstance(m, nn.Linear) or is_experts(m)]
    counts = {} if counts is None else counts
    last_input = {}  # per expert block: the latest input its taps saw
    try:
        for path, module in linears:
            container, key = container_of(model, path)
            if is_experts(module):
                container[key] = ExpertGramTap(module, grams, path, counts, last_input.setdefault(path.rpartition(".")[0], {}))
            else:
                container[key] = GramTap(module, grams, path)
        yield [p for p, _ in linears]
    finally:
        for path, module in linears:
            container, key = container_of(model, path)
            container[key] = module


def record_grams(model, layers, forward_each) -> dict:
    """{path: X^T X} of every Linear's inputs over the forward passes that
    iterating forward_each() runs (Whisper, vision-language models)."""
    grams = {}
    with grams_tapped(model, layers, grams):
        for _ in forward_each():
            pass
    return grams


def head_gram(norm, finals):
    """X^T X of a tied head's input: the final norm of the last block's outputs."""
    total = 0
    for final in finals:
        x = norm(final).astype(mx.float32)
        flat = x.reshape(-1, x.shape[-1])
        total = total + flat.T @ flat
    mx.eval(total)
    return total


class DiskGrams(dict):
    """Gram matrices that go to disk once complete (`flush`); every read of a
    stored one is a fresh lazy load, freed when its reader is done with it.
    The folder lives as long as this mapping."""

    def __init__(self):
        super().__init__()
        self._folder = tempfile.TemporaryDirectory(prefix="optiq-grams-")
        self.files = {}

    def flush(self, paths):
        for path in paths:
            if dict.__contains__(self, path):
                file = Path(self._folder.name) / f"{len(self.files)}.safetensors"
                gram = dict.__getitem__(self, path)
                arrays = {f"expert.{e}": g for e, g in gram.items()} if isinstance(gram, dict) else {"gram": gram}
                if not arrays:  # an expert layer no token reached: nothing to store
                    continue
                mx.save_safetensors(str(file), arrays)
                self.files[path] = file
                dict.__delitem__(self, path)

    def get(self, path, default=None):
        if path in self.files:
            arrays = mx.load(str(self.files[path]))
            return arrays["gram"] if "gram" in arrays else {int(k.split(".")[1]): v for k, v in arrays.items()}
        return dict.get(self, path, default)

    def __getitem__(self, path):
        value = self.get(path)
        if value is None:
            raise KeyError(path)
        return value

    def __contains__(self, path):
        return path in self.files or dict.__contains__(self, path)

    def __iter__(self):
        yield from self.files
        yield from dict.__iter__(self)
