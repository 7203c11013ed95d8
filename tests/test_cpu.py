"""The CPU serving path computes what the quantized model computes."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from optiq.cpu import RowAdaptiveQuantizedEmbedding, RowAdaptiveQuantizedLinear, adapt_for_cpu


@pytest.mark.parametrize("rows", [1, 2, 37])
def test_row_adaptive_layers_match_quantized_matmul_in_fp32(rows):
    mx.random.seed(0)
    linear = nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=True), group_size=32, bits=4)
    embed = nn.QuantizedEmbedding.from_embedding(nn.Embedding(50, 128), group_size=64, bits=3)
    model = nn.Sequential(linear, embed)
    expected_lin_x = mx.random.normal((rows, 128))
    want_linear, want_head = linear(expected_lin_x), embed.as_linear(expected_lin_x)
    adapt_for_cpu(model)
    assert type(linear) is RowAdaptiveQuantizedLinear and type(embed) is RowAdaptiveQuantizedEmbedding
    assert isinstance(linear, nn.QuantizedLinear)  # mlx-lm and LoRA mounting still see a quantized layer
    assert mx.allclose(linear(expected_lin_x), want_linear, atol=1e-4).item()
    assert mx.allclose(embed.as_linear(expected_lin_x), want_head, atol=1e-4).item()
    assert linear.scales.dtype == mx.float32 and linear.weight.dtype == mx.uint32
