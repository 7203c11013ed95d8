"""Gram matrices X^T X of each Linear's inputs over the calibration passes:
GPTQ's Hessian, and the weighting of every weight-space error estimate.

A `GramTap` wraps a Linear for the time of the calibration forwards and adds
its input's X^T X into a mapping; `grams_tapped` puts taps in and takes them
out. Streamed models keep complete Grams on disk (`DiskGrams`): a Gram of an
11008-wide input is 484 MB.
"""

import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .model_tree import container_of


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


@contextmanager
def grams_tapped(model, layers, grams):
    """Inside, every Linear among `layers` ([(path, module)]) adds its inputs'
    X^T X to `grams`; yields the tapped paths."""
    linears = [(p, m) for p, m in layers if isinstance(m, nn.Linear)]
    try:
        for path, module in linears:
            container, key = container_of(model, path)
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
                mx.save_safetensors(str(file), {"gram": dict.__getitem__(self, path)})
                self.files[path] = file
                dict.__delitem__(self, path)

    def get(self, path, default=None):
        if path in self.files:
            return mx.load(str(self.files[path]))["gram"]
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
