"""GPTQ's two implementations agree: the MLX-array blocks a GPU runs (here
with the kernel's plain-MLX reference step) give numpy's codes, the factor
U (H^-1 = U^T U) from one flipped Cholesky equals numpy's, and MLX-array
packing equals numpy's. On MLX-CUDA the kernel itself is checked too."""

import mlx.core as mx
import numpy as np
import pytest

from optiq import gptq
from optiq.rounding import pack


def problem(n=256, rows=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2000, n)).astype(np.float32) * rng.uniform(0.2, 3, n).astype(np.float32)
    x[:, 7] = 0.0  # an input that never fires
    return rng.standard_normal((rows, n)).astype(np.float32) * 0.05, x.T @ x


def test_inverse_factor_is_the_upper_cholesky_of_the_inverse():
    _, gram = problem()
    u, dead = gptq.inverse_factor(mx.array(gram))
    h = gram.astype(np.float64)
    h[7, 7] = 1.0
    h[np.diag_indices(len(h))] += gptq.DAMP * np.mean(np.diag(gram))
    want = np.linalg.cholesky(np.linalg.inv(h)).T
    np.testing.assert_allclose(np.array(u), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.array(dead).tolist() == [i == 7 for i in range(len(h))]
    damped = mx.array(gram) + mx.diag(dead.astype(mx.float32) + gptq.DAMP * mx.mean(mx.diagonal(mx.array(gram))))
    np.testing.assert_allclose(np.array(gptq.host_factor(damped)), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())  # the LAPACK path


@pytest.mark.parametrize("bits, group", [(4, 64), (3, 128), (8, 64), (2, 32)])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_mlx_blocks_give_numpys_codes(bits, group, dtype):
    w, gram = problem()
    q1, s1, b1 = gptq.gptq_numpy(w, gram, bits, group, dtype)
    q2, s2, b2 = gptq.gptq_mlx(mx.array(w), gptq.inverse_factor(mx.array(gram)), bits, group, dtype)
    assert np.mean(q1 == np.array(q2)) > 0.999
    # A GPU's fp32 matmuls move the compensated weights by an ulp here and there: one stored-dtype step.
    tol = 1e-6 if mx.default_device() == mx.cpu else 2e-3
    np.testing.assert_allclose(np.array(s2), s1, rtol=tol)
    np.testing.assert_allclose(np.array(b2), b1, rtol=tol, atol=1e-7 if tol < 1e-3 else 1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_mlx_arrays_equals_numpy(bits):
    q = np.random.default_rng(bits).integers(0, 1 << bits, size=(9, 192 if bits != 3 else 96))
    assert np.array_equal(np.array(pack(mx.array(q.astype(np.uint32)), bits)), pack(q, bits))


@pytest.mark.gpu
@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX-CUDA")
@pytest.mark.parametrize("bits, group", [(4, 64), (4, 128), (8, 64), (3, 128)])
def test_the_cuda_block_kernel_equals_its_reference(bits, group):
    w, gram = problem(n=512, rows=300, seed=bits)
    factor = gptq.inverse_factor(mx.array(gram))
    ref = gptq.gptq_mlx(mx.array(w), factor, bits, group, mx.bfloat16)
    got = gptq.gptq_mlx(mx.array(w), factor, bits, group, mx.bfloat16, block_step=gptq.block_step_cuda)
    assert np.mean(np.array(ref[0]) == np.array(got[0])) > 0.999
    np.testing.assert_allclose(np.array(got[1]), np.array(ref[1]), rtol=1e-5)


def test_the_triangular_inverse_by_halves_is_exact(monkeypatch):
    """upper_inverse (MLX-CUDA lacks tri_inv): halves down to LEAF rows."""
    monkeypatch.setattr(gptq, "LEAF", 64)
    rng = np.random.default_rng(3)
    u = np.triu(rng.standard_normal((300, 300))).astype(np.float32) + 30 * np.eye(300, dtype=np.float32)
    got = np.array(gptq.upper_inverse(mx.array(u)))
    want = np.linalg.inv(u.astype(np.float64))
    tol = 1e-6 if mx.default_device() == mx.cpu else 1e-3  # H200 measured 1.4e-4 of the largest entry: its fp32 matmuls
    np.testing.assert_allclose(got, want, rtol=tol * 10, atol=tol * np.abs(want).max())
    assert not np.tril(got, -1).any()


@pytest.mark.parametrize("bits,group", [(3, 32), (4, 64)])
def test_refit_scales_are_the_least_squares_fit_to_the_codes(bits, group):
    """refit_affine's scales and biases are the weighted least-squares fit of
    each row to its fixed codes (checked against a generic solver on the
    same objective), so the layer's output error falls below GPTQ's own grid."""
    rng = np.random.default_rng(1)
    n_out, n_in = 24, 128
    x = rng.standard_normal((512, n_in)) @ rng.standard_normal((n_in, n_in)) * 0.3
    h = x.T @ x
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    q, scales, biases = gptq.gptq_numpy(w, h, bits, group, dtype=mx.float32)
    s2, b2 = gptq.refit_affine(w, h, q, group, dtype=mx.float32)
    q3, s3, b3 = gptq.gptq_numpy(w, h, bits, group, dtype=mx.float32, refit=True)
    assert np.array_equal(q3, q) and np.allclose(s3, s2) and np.allclose(b3, b2)  # the same codes, then the fit
    s4, b4 = gptq.refit_affine(w, h, q, group, dtype=mx.float32, rows=5)  # solved a few rows at a time: the same fit
    assert np.allclose(s4, s2) and np.allclose(b4, b2)
    damped = h + gptq.DAMP * np.mean(np.diag(h)) * np.eye(n_in)
    chol = np.linalg.cholesky(damped)
    for r in range(3):  # the same fit from lstsq on the whitened problem
        design = np.zeros((n_in, 2 * (n_in // group)))
        for g in range(n_in // group):
            design[g * group : (g + 1) * group, g] = q[r, g * group : (g + 1) * group]
            design[g * group : (g + 1) * group, n_in // group + g] = 1.0
        theta = np.linalg.lstsq(chol.T @ design, chol.T @ w[r].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(np.concatenate([s2[r], b2[r]]), theta, rtol=1e-4, atol=1e-6)
    dequant = lambda s, b: (q.reshape(n_out, -1, group) * s[..., None] + b[..., None]).reshape(n_out, n_in)  # noqa: E731
    assert gptq.output_error(w, h, dequant(s2, b2)) < gptq.output_error(w, h, dequant(scales, biases))
