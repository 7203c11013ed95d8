"""Finding things inside a model: its layers, its decoder blocks, its head.

mlx-lm, mlx-whisper and mlx-vlm models are trees of `nn.Module`s addressed
by dotted paths (`model.layers.3.mlp.down_proj`); these functions read that
tree and change nothing.
"""

import re

import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.switch_layers import SwitchLinear

from .errors import OptiqError
from .records import FLOAT_BITS

BLOCK_PATH = re.compile(r"layers\.(\d+)\.")


def container_of(model: nn.Module, path: str):
    """(container, key) such that container[key] is the module at `path`."""
    node = model
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    return node, (int(last) if isinstance(node, list) else last)


def module_at(model: nn.Module, path: str):
    container, key = container_of(model, path)
    return container[key]


def block_list(model: nn.Module):
    """The list of decoder blocks that the model's forward iterates over."""
    layers = model.layers
    first = layers[0]
    for _, module in model.named_modules():
        owned = module.get("layers") if isinstance(module, dict) else None
        if isinstance(owned, list) and any(x is first for x in owned):
            return owned
    raise OptiqError("cannot find the decoder blocks of this model")


# Layers whose weight is a stack of matrices (stack, out, in): a mixture-of-
# experts projection (one matrix per expert, each token routed to a few) and
# multi-head latent attention's per-head projections. mlx-lm quantizes each
# as one tensor, so each is one plan entry.
STACKED = (SwitchLinear, MultiLinear)


def is_experts(module) -> bool:
    """Whether `module` is a routed expert projection (mlx-lm's SwitchLinear)."""
    return isinstance(module, SwitchLinear)


def quantizable_layers(model: nn.Module) -> list:
    """[(path, module)] for every Linear, Embedding and stacked (expert,
    per-head) projection not yet quantized, in forward order."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, *STACKED)) and not isinstance(
            module, (nn.QuantizedLinear, nn.QuantizedEmbedding)
        ):
            out.append((path, module))
    return sorted(out, key=lambda pm: _order_key(pm[0]))


def _order_key(path: str):
    m = BLOCK_PATH.search(path)
    if "embed" in path and not m:
        return (-1, path)
    return (int(m.group(1)) if m else 1 << 30, path)


def in_block(path: str) -> bool:
    """Whether the layer at `path` sits inside a decoder block."""
    return BLOCK_PATH.search(path) is not None


def is_tied(model: nn.Module) -> bool:
    return not any(p.endswith("lm_head") for p, _ in model.named_modules())


def start_block(path: str, n_blocks: int) -> int:
    """The first block whose output a perturbation of `path` changes (n = only the head)."""
    m = BLOCK_PATH.search(path)
    if m:
        return int(m.group(1))
    if path.split(".")[-1] == "lm_head":
        return n_blocks
    return 0  # embeddings and anything before the blocks: the full forward


def swap_classes(model: nn.Module, swaps: dict) -> nn.Module:
    """Every module whose exact type is a key of `swaps` becomes that value's
    class (in place): the same state, another call path (optiq/cpu.py, optiq/cuda.py)."""
    for _, module in model.named_modules():
        cls = swaps.get(type(module))
        if cls is not None:
            module.__class__ = cls
    return model


def fits_input(in_dim: int, candidate) -> bool:
    """Whether a layer of `in_dim` inputs can be stored as `candidate` (its group size divides them; float always)."""
    return candidate.bits >= FLOAT_BITS or in_dim % candidate.group_size == 0


def candidates_for(module, candidates) -> tuple:
    """The candidates whose group size divides this layer's input dimension."""
    return tuple(c for c in candidates if fits_input(module.weight.shape[-1], c))


def norm_owner(model):
    """The module holding the blocks and the final norm (None if there is none)."""
    return next((m for _, m in model.named_modules() if "norm" in m and "layers" in m), None)
