"""Models larger than memory: decoder blocks whose weights stay on disk
between uses.

`mx.load` reads safetensors lazily: an array is read from disk when it is
evaluated, and freed when nothing holds it. A streamed model keeps its
embedding, final norm and head resident (in fp32) and leaves every block's
weights as lazy loads. Whoever runs a block evaluates its output and then
calls `unload(j)`, which swaps the block's now-evaluated weights for fresh
lazy loads of the same tensors, so the memory goes back. Peak memory is then
the resident parts, one block in fp32 and the activations being pushed
through it.
"""

import glob
import os
import weakref
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model, load_tokenizer

from .errors import OptiqError
from .model_tree import block_list
from .source import Loaded, load_reference
from .standins import Stand, blocks_replaced

FP32 = 4  # bytes per weight once cast to fp32, as the sensitivity pass runs


def checkpoint_bytes_fp32(path) -> int:
    """What the model's weights take in fp32 (from the safetensors headers)."""
    total = 0
    for f in glob.glob(str(Path(path) / "model*.safetensors")):
        total += sum(a.size for a in mx.load(f).values()) * FP32  # lazy: headers only
    return total


def block_prefixes(model) -> list:
    """The parameter-path prefix of every decoder block, in order."""
    blocks = block_list(model)
    paths = {id(m): p for p, m in model.named_modules()}
    return [paths[id(b)] + "." for b in blocks]


class Streamed:
    """A model whose blocks are re-read from its safetensors files on demand."""

    def __init__(self, path, model):
        self.files = sorted(glob.glob(str(Path(path) / "model*.safetensors")))
        self.model = model
        self.prefixes = block_prefixes(model)
        self.blocks = list(block_list(model))  # the modules themselves, whatever stands in the list
        self.installed = {}

    def _lazy(self) -> dict:
        weights = {}
        for f in self.files:
            weights.update(mx.load(f))  # lazy: nothing is read until evaluated
        return self.model.sanitize(weights) if hasattr(self.model, "sanitize") else weights

    def unload(self, j: int, lazy: dict | None = None):
        """Block j's weights back to lazy loads (its evaluated arrays are freed).
        `lazy`: one `_lazy()` read shared by several blocks."""
        prefix = self.prefixes[j]
        for k, v in (lazy or self._lazy()).items():
            if not k.startswith(prefix):
                continue
            node, leaf = leaf_owner(self.blocks[j], k[len(prefix) :])
            # A weight someone swapped in (a probe's quantized copy) stays until
            # they put ours back: only arrays this streamer installed are
            # replaced. Weak references, so that holding them keeps nothing alive.
            if k in self.installed and node[leaf] is not self.installed[k]():
                continue
            node[leaf] = as_fp32(v)
            self.installed[k] = weakref.ref(node[leaf])

    def lazy_weight(self, path: str):
        """A resident (non-block) layer's weight as a lazy fp32 load from disk,
        or None (a tied head has no weight of its own there)."""
        lazy = self._lazy().get(path + ".weight")
        return None if lazy is None else as_fp32(lazy)

    @contextmanager
    def forwarding(self):
        """Any forward pass inside streams: each block runs, is evaluated, and
        gives its weights back (slow for generation, but within memory)."""
        live = block_list(self.model)
        with blocks_replaced(live, {j: Stand(b, after=lambda j=j: self.unload(j)) for j, b in enumerate(list(live))}):
            yield self.model

    def unload_all(self):
        lazy = self._lazy()  # one read of the headers, not one per block
        for j in range(len(self.prefixes)):
            self.unload(j, lazy)


def leaf_owner(module, dotted: str):
    """(node, name) with node[name] the array at `dotted`, looking through
    wrappers that hold the real module as `.inner` (the Gram taps)."""
    *parents, leaf = dotted.split(".")
    node = module
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
        while hasattr(node, "inner") and not hasattr(node, "weight"):
            node = node.inner
    return node, leaf


def as_fp32(x):
    return x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x


def least_streaming_bytes(model, in_blocks: tuple) -> int:
    """The resident (non-block) weights in fp32 plus the largest block twice
    (its fp32 weights and the checkpoint read they are cast from)."""
    sizes = [(k, v.size * FP32) for k, v in tree_flatten(model.parameters())]
    blocks = [sum(n for k, n in sizes if k.startswith(p)) for p in in_blocks]
    resident = sum(n for k, n in sizes if not k.startswith(in_blocks))
    return resident + 2 * max(blocks, default=0)


def load_streamed(path, budget: int | None = None):
    """(Loaded, Streamed): the model with resident non-block weights in fp32 and
    lazy blocks; unquantized checkpoints only. A `budget` (bytes) below
    least_streaming_bytes is refused."""
    try:
        model, config = load_model(Path(path), lazy=True)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise OptiqError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise OptiqError(f"{path} is quantized: streaming (--max-memory) needs a full-precision checkpoint")
    streamed = Streamed(path, model)
    in_blocks = tuple(streamed.prefixes)
    if budget is not None and budget < (least := least_streaming_bytes(model, in_blocks)):
        raise OptiqError(
            f"--max-memory {budget / 2**30:.3f} GB is below what streaming {path} holds at least: its embedding, "
            f"norms and head stay resident in fp32 and one block is read beside them ({least / 2**30:.3f} GB, "
            "calibration activations on top)"
        )
    streamed.unload_all()  # every block lazy and fp32
    resident = [(k, as_fp32(v)) for k, v in tree_flatten(model.parameters()) if not k.startswith(in_blocks)]
    model.update(tree_unflatten(resident))
    mx.eval([v for _, v in resident])
    tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    return Loaded(model, tokenizer, config, Path(path), "fp32"), streamed


def machine_memory() -> int:
    """Physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(max_memory_gb=None) -> int:
    """--max-memory in bytes (default: the machine's memory)."""
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise OptiqError(f"--max-memory {max_memory_gb}: give a positive number of GB")
    return int((max_memory_gb or 0) * 2**30) or machine_memory()


def load_within(path, max_memory_gb=None):
    """(Loaded, Streamed or None): the model in memory when its fp32 weights fit
    in `max_memory_gb` (default: the machine's memory), streamed otherwise."""
    budget = budget_bytes(max_memory_gb)
    if checkpoint_bytes_fp32(path) > budget:
        return load_streamed(path, budget)
    return load_reference(path), None
