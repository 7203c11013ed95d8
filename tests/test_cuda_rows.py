"""optiq/cuda.py: quantized layers that multiply a batched decode step's rows as one matrix."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from optiq.cuda import RowsQuantizedEmbedding, RowsQuantizedLinear, adapt_for_cuda, fold_rows


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # tied and untied output heads
def test_folded_rows_compute_the_same_logits_with_the_same_weights(model_factory, arch):
    model, _ = load(str(model_factory(arch)))
    nn.quantize(model, group_size=32, bits=4)
    tokens = mx.array(np.random.default_rng(0).integers(0, 200, (3, 5)))
    # a prompt, and one decode step of a batch of 3: the (batch, 1, in) input folding is for
    before, before_step = model(tokens), model(tokens[:, :1])
    weights = dict(tree_flatten(model.parameters()))
    fold_rows(model)
    kinds = {type(m) for _, m in model.named_modules()}
    assert RowsQuantizedLinear in kinds and nn.QuantizedLinear not in kinds
    assert RowsQuantizedEmbedding in kinds and nn.QuantizedEmbedding not in kinds
    after, after_step = model(tokens), model(tokens[:, :1])
    assert after.shape == before.shape and after_step.shape == before_step.shape == (3, 1, before.shape[-1])
    assert mx.array_equal(after, before).item() and mx.array_equal(after_step, before_step).item()
    # the same state: what is saved is what was loaded
    assert dict(tree_flatten(model.parameters())).keys() == weights.keys()
    assert all(mx.array_equal(v, weights[k]).item() for k, v in tree_flatten(model.parameters()))


def test_adapt_for_cuda_leaves_a_model_alone_without_cuda(tiny_llama):
    if mx.cuda.is_available():
        pytest.skip("MLX sees a CUDA GPU here")
    model, _ = load(str(tiny_llama))
    nn.quantize(model, group_size=32, bits=4)
    adapt_for_cuda(model)
    assert not any(isinstance(m, (RowsQuantizedLinear, RowsQuantizedEmbedding)) for _, m in model.named_modules())
