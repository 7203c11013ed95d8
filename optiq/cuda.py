"""Batched decode of quantized models fast on MLX-CUDA, without touching model code.

A batched decode step feeds every layer a (batch, 1, in) input. Measured on
an H200 (MLX 0.32.4, bf16 activations, `benchmarks/gpu.py --sections
kernels --kernel-batch 16`), MLX-CUDA's `quantized_matmul` is far slower on
that input than on the same rows as one (batch, in) matrix: a 4-bit g64
4096x14336 layer took 421 us per call at 16 rows (the bf16 matmul 83 us),
against 60 us for a (16, in) input, and 5- and 6-bit layers 2.5x more again.
So the quantized layers here fold the leading dimensions into rows before
the product and restore them after: the same products, one matrix.
"""

import mlx.core as mx
import mlx.nn as nn

from .model_tree import swap_classes


def _as_rows(x):
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


class RowsQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = super().__call__(_as_rows(x))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class RowsQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x):
        y = super().as_linear(_as_rows(x))
        return y.reshape(*x.shape[:-1], y.shape[-1])


_SWAPS = {nn.QuantizedLinear: RowsQuantizedLinear, nn.QuantizedEmbedding: RowsQuantizedEmbedding}


def fold_rows(model: nn.Module) -> nn.Module:
    """Quantized layers that multiply one matrix of rows (in place; weights
    and config untouched: the model saves and loads as before)."""
    return swap_classes(model, _SWAPS)


def adapt_for_cuda(model: nn.Module) -> nn.Module:
    """What `optiq serve` does to a model it serves on MLX-CUDA."""
    return fold_rows(model) if mx.cuda.is_available() else model
