"""Decode attention over packed KV codes: the GQA repeat axis folded into
rows gives mlx-lm's broadcast result (MLX-CUDA has no kernel for the
broadcast shape); planned caches merged into a batch decode as each alone;
and on MLX-CUDA the fused kernel equals attention over the dequantized codes."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from optiq.kv import kernels
from optiq.kv.affine_cache import BatchPlannedKVCache, PlannedKVCache, quantize_kv
from optiq.kv.attention import dequantized_attention, split_quantized_attention


def qkv(B=2, n_q=8, n_kv=2, L=1, T=96, D=64, seed=0, dtype=mx.float32):
    mx.random.seed(seed)
    q = mx.random.normal((B, n_q, L, D)).astype(dtype)
    k = mx.random.normal((B, n_kv, T, D)).astype(dtype)
    v = mx.random.normal((B, n_kv, T, D)).astype(dtype)
    return q, k, v


@pytest.mark.cpu_only  # mlx-lm's broadcast shape is the one MLX-CUDA cannot run
@pytest.mark.parametrize("L, mask", [(1, None), (3, "causal")])
def test_folded_rows_equal_mlx_lms_broadcast(L, mask):
    q, k, v = qkv(L=L)
    qk, qv = quantize_kv(k, 32, 4), quantize_kv(v, 32, 4)
    ours = split_quantized_attention(q, qk, qv, 0.125, mask, 32, 4, 4)
    theirs = quantized_scaled_dot_product_attention(q, qk, qv, scale=0.125, mask=mask, group_size=32, bits=4)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-5)


def test_the_kernel_is_not_taken_without_cuda():
    q, k, _ = qkv()
    assert mx.cuda.is_available() or not kernels.supported(q, quantize_kv(k, 32, 4), None, 4, 4)


def test_planned_caches_of_two_lengths_decode_in_a_batch_as_alone():
    """Two sequences of 40 and 25 cached tokens, merged (left padding),
    one decode step: each sequence's attention output equals its own."""
    mx.random.seed(1)
    lengths, n_kv, D = (40, 25), 2, 64
    alone, caches = [], []
    for n in lengths:
        c = PlannedKVCache(8, 32, v_bits=4)
        c.update_and_fetch(mx.random.normal((1, n_kv, n, D)), mx.random.normal((1, n_kv, n, D)))
        caches.append(c)
    step_k, step_v, q = (mx.random.normal((2, n_kv, 1, D)) for _ in range(3))
    q = mx.random.normal((2, 4, 1, D))
    for i, c in enumerate(caches):
        solo = copy.deepcopy(c)
        keys, values = solo.update_and_fetch(step_k[i : i + 1], step_v[i : i + 1])
        alone.append(solo._attention(q[i : i + 1], keys, values, 0.125, None))
    merged = PlannedKVCache.merge(caches)
    assert isinstance(merged, BatchPlannedKVCache) and merged.left_padding.tolist() == [0, 15]
    mask = merged.make_mask(1, return_array=True)  # as the model makes it: before the update
    keys, values = merged.update_and_fetch(step_k, step_v)
    got = merged.attention(q, keys, values, 0.125, mask)
    for i in range(2):
        np.testing.assert_allclose(np.array(got[i : i + 1]), np.array(alone[i]), rtol=1e-4, atol=1e-5)
    back = merged.extract(1)  # the prompt cache keeps a sequence's own codes
    assert isinstance(back, PlannedKVCache) and back.offset == 26


def test_caches_that_cannot_merge_say_so():
    with pytest.raises(ValueError):
        PlannedKVCache.merge([PlannedKVCache(4, 32, start=16), PlannedKVCache(4, 32, start=16)])
    assert not PlannedKVCache(4, 32, max_size=64).batchable


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX-CUDA")
@pytest.mark.parametrize("bits, D, n_q, n_kv, L, T", [((4, 4), 128, 32, 8, 1, 5000), ((8, 4), 64, 8, 2, 1, 300),
                                                      ((3, 6), 256, 8, 4, 2, 777), ((2, 8), 128, 16, 2, 1, 64)])
def test_the_fused_kernel_equals_attention_over_dequantized_codes(bits, D, n_q, n_kv, L, T):
    q, k, v = qkv(B=2, n_q=n_q, n_kv=n_kv, L=L, T=T, D=D, dtype=mx.bfloat16)
    qk, qv = quantize_kv(k, 64, bits[0]), quantize_kv(v, 64, bits[1])
    mask = "causal" if L > 1 else None
    assert kernels.supported(q, qk, mask, *bits)
    got = kernels.decode_attention(q, qk, qv, D ** -0.5, mask, 64, *bits)
    want = dequantized_attention(q.astype(mx.float32), qk, qv, D ** -0.5, mask, 64, *bits)
    err = float(mx.max(mx.abs(got.astype(mx.float32) - want)))
    assert err < 2e-2 * float(mx.max(mx.abs(want))), err
