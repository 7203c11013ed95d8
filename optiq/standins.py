"""Stand-ins: running a model's own forward pass with some parts replaced.

Every measurement runs mlx-lm's (or mlx-whisper's, mlx-vlm's) model code
unchanged and swaps parts of the tree for the time of one pass:
- decoder blocks by a `Stand` that records its block's input and output,
  replays a cached output, or passes its input through (`blocks_replaced`,
  `replaying_from`);
- the final norm by one that keeps only the measured positions
  (`positions_only`), so the head runs on those alone;
- a layer's weight by its quantized copy (`weights_swapped`), or a whole
  module by another (`module_swapped`).
Each is a context manager that puts the originals back on the way out.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from .model_tree import container_of
from .rounding import dequantize_rows, row_slabs


class Stand:
    """Stands in a block list: records the block's input (and output), or
    replays a cached output, or (neither) passes its input through."""

    def __init__(self, block, inputs=None, outputs=None, replay=None, after=None):
        self._block, self._inputs, self._outputs, self._replay = block, inputs, outputs, replay
        self._after = after  # streaming: evaluate the output, then give the weights back

    def __getattr__(self, name):  # layer attributes the model reads (use_sliding, is_linear)
        return getattr(self._block, name)

    def __call__(self, x, *args, **kwargs):
        if self._replay is not None:
            return self._replay
        if self._inputs is None and self._after is None:
            return x
        # Recorded in the model's own dtype: fp32 on a CPU, bf16/fp16 on a GPU (device.py).
        if self._inputs is not None:
            self._inputs.append(x)
        out = self._block(x, *args, **kwargs)
        if self._outputs is not None:
            self._outputs.append(out)
        if self._after is not None:
            mx.eval(out, *(self._outputs or ())[-1:])  # what was just recorded, not the whole list again
            self._after()
        return out


class StopForward(Exception):
    """Ends a forward pass after the block of interest (streaming, Gram-only passes)."""


def stop_forward():
    raise StopForward


@contextmanager
def blocks_replaced(blocks: list, stands: dict):
    """Inside, blocks[i] is stands[i] for each i; yields the original blocks."""
    originals = list(blocks)
    try:
        for i, stand in stands.items():
            blocks[i] = stand
        yield originals
    finally:
        blocks[:] = originals


def replaying_from(originals: list, start: int, hidden) -> dict:
    """Stands that skip the blocks before `start`: block start-1 returns
    `hidden` (block start's recorded input), the ones before pass through
    unread, so only blocks from `start` on compute."""
    if start <= 0:
        return {}
    stands = {i: Stand(originals[i]) for i in range(start - 1)}
    stands[start - 1] = Stand(originals[start - 1], replay=hidden)
    return stands


def recording(originals: list, inputs: list, last_output: list | None = None) -> dict:
    """Stands that append every block's input to `inputs` (and the last
    block's output to `last_output`)."""
    n = len(originals)
    return {i: Stand(b, inputs=inputs, outputs=last_output if i == n - 1 else None) for i, b in enumerate(originals)}


def run_stopped(model, *args, **kwargs):
    """model(*args) for a pass that a Stand may end early with StopForward."""
    try:
        model(*args, **kwargs)
    except StopForward:
        pass


class Positions:
    """Stands in for the final norm: keeps only the positions whose KL is measured,
    so the head (the largest matmul and softmax of a small model) runs on those
    alone. Every position still sees its full causal context."""

    def __init__(self, norm, positions):
        self._norm, self._positions = norm, positions

    def __call__(self, h):
        return self._norm(h)[:, self._positions]


@contextmanager
def positions_only(owner, positions):
    """Inside, the logits of the model whose norm_owner is `owner` come out at
    `positions` only (see Positions)."""
    if owner is None or positions is None:
        yield
        return
    norm = owner["norm"]
    owner["norm"] = Positions(norm, positions)
    try:
        yield
    finally:
        owner["norm"] = norm


@contextmanager
def weights_swapped(pairs):
    """Inside, each (module, weight) pair's module holds that weight, in the
    module's own dtype (a quantized copy is made in fp32; a GPU model runs in
    bf16); the originals go back on exit, whatever happens inside."""
    saved = []
    try:
        for module, weight in pairs:
            saved.append((module, module.weight))
            module.weight = weight.astype(module.weight.dtype)
        yield [m for m, _ in saved]
    finally:
        for module, weight in reversed(saved):
            module.weight = weight


@contextmanager
def module_swapped(model, path: str, replacement):
    """Inside, the module at `path` is `replacement`."""
    container, key = container_of(model, path)
    original = container[key]
    container[key] = replacement
    try:
        yield original
    finally:
        container[key] = original


class SlabbedCodes:
    """A probe's quantized copy of a large resident layer (a 49k-row tied
    embedding) that never exists whole in fp32: a lookup dequantizes the rows
    it takes, a product dequantizes a slab of rows at a time. Streaming only;
    in memory the probe holds fake_quantize's full copy."""

    def __init__(self, inner, codes, candidate):
        self._inner, self._codes, self._candidate = inner, codes, candidate

    def __getattr__(self, name):  # attributes the model reads (e.g. bias)
        return getattr(self._inner, name)

    def __call__(self, x):
        if isinstance(self._inner, nn.Embedding):
            return dequantize_rows(tuple(None if p is None else p[x] for p in self._codes), self._candidate)
        y = self.as_linear(x)
        return y + self._inner.bias if "bias" in self._inner else y

    def as_linear(self, x):
        outs = []
        for rows in row_slabs((self._codes[0].shape[0], x.shape[-1])):
            w = dequantize_rows(tuple(None if p is None else p[rows] for p in self._codes), self._candidate)
            outs.append(x @ w.T)
        return mx.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
