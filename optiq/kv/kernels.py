"""A fused decode attention over packed affine KV codes, for MLX-CUDA.

Reading fewer bytes only buys speed if attention reads the codes
themselves: dequantizing the cache first writes and reads it again in fp16.
This is flash-decoding over MLX's affine layout (codes packed LSB-first in
uint32 words, an fp16 scale and bias per group along the head dimension):

- `partial`: the cached positions are split into chunks, one CUDA block per
  (chunk, KV head, batch row); D/8 lanes share a position, each lane owning
  8 elements. A lane unpacks its 8 key codes from a 64-bit window of two
  words (any width 2-8 bits), dots them with its slice of every query row
  of that KV head (GQA: the repeat axis is rows, never a broadcast), the
  lanes of a position reduce with warp shuffles, and an online softmax
  accumulates the values, dequantized the same way, in registers. The
  position groups of a block merge through shared memory into one
  (max, sum, output) per chunk and row.
- `combine`: the chunks merge into the output, in the queries' dtype.

Keys and values may have their own widths (split K/V plans). It serves up
to 8 query rows per KV head (decode: the repeat factor times the new
tokens), head dims 64, 128 and 256, no mask (decode) or the causal one.
Anything else falls back to dequantized attention. On Metal, MLX's own
quantized attention is the path (its quantized_matmul broadcasts the GQA
axis there).
"""

import functools

import mlx.core as mx

from .. import device

ENABLED = True  # benchmarks/gpu.py turns it off to time the dequantized path
MAX_ROWS = 8
HEAD_DIMS = (64, 128, 256)
THREADS = 128
UNROLL = 2  # positions per lane group in flight per step
EPL = None  # elements per lane (None: 16 up to 4 query rows, else 8); benchmarks/gpu.py tunes both
TARGET_BLOCKS = 512  # chunks x KV heads x batch: enough to fill an H200's 132 SMs several times
MIN_CHUNK = 256

HEADER = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define OPTIQ_NEG_INF (__int_as_float(0xff800000))

// 8 codes of BITS bits starting at element e0 of a row of packed uint32 words.
template <int BITS>
__device__ __forceinline__ void optiq_unpack8(const uint32_t* row, int e0, float out[8]) {
  const int bit = e0 * BITS;
  const int word = bit >> 5, off = bit & 31;
  unsigned long long win = row[word];
  if (off + 8 * BITS > 32) win |= (unsigned long long)row[word + 1] << 32;
  win >>= off;
  #pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = (float)((win >> (j * BITS)) & ((1u << BITS) - 1u));
}
"""

PARTIAL_SOURCE = """
  constexpr int LP = D / EPL;                // lanes per position
  constexpr int PW = 32 / LP;                // positions per warp per unrolled step
  constexpr int NGROUPS = (THREADS / 32) * PW;
  constexpr int REP = R / L;
  __shared__ float sm_m[NGROUPS][R];
  __shared__ float sm_l[NGROUPS][R];
  __shared__ float sm_o[NGROUPS][R][D];

  const int split = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
  const int S = gridDim.x, H = gridDim.y;
  const int T = kc_shape[2];
  const int chunk = (T + S - 1) / S;
  const int t0 = split * chunk;
  const int t1 = min(T, t0 + chunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / LP, li = lane % LP, e0 = li * EPL;
  const int group = warp * PW + sub;
  const float qscale = scale[0];
  const int first = lp[bi];  // a batch's left padding: positions before it are not this sequence's
  const int gk = e0 / G;     // EPL elements never straddle a group (G is a multiple of 16)

  float qv[R][EPL], qsum[R], m[R], lsum[R], acc[R][EPL];
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    const int hq = h * REP + r / L, l = r % L;
    const QT* qrow = q + bi * q_strides[0] + hq * q_strides[1] + l * q_strides[2];
    qsum[r] = 0.0f;
    #pragma unroll
    for (int j = 0; j < EPL; ++j) {
      qv[r][j] = (float)qrow[(e0 + j) * q_strides[3]] * qscale;
      qsum[r] += qv[r][j];
      acc[r][j] = 0.0f;
    }
    m[r] = OPTIQ_NEG_INF;
    lsum[r] = 0.0f;
  }

  const uint32_t* kbase = kc + bi * kc_strides[0] + h * kc_strides[1];
  const uint32_t* vbase = vc + bi * vc_strides[0] + h * vc_strides[1];
  const ST* ksb = ks + bi * ks_strides[0] + h * ks_strides[1] + gk;
  const ST* kbb = kb + bi * kb_strides[0] + h * kb_strides[1] + gk;
  const ST* vsb = vs + bi * vs_strides[0] + h * vs_strides[1] + gk;
  const ST* vbb = vb + bi * vb_strides[0] + h * vb_strides[1] + gk;

  // U positions per lane group per step, their loads issued together; every
  // lane of a warp takes the same number of steps (the shuffles need all 32).
  for (int tb = t0 + warp * PW * U; tb < t1; tb += NGROUPS * U) {
    float score[U][R], val[U][EPL];
    bool valid[U];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = tb + u * PW + sub;
      valid[u] = t < t1 && t >= first;
      const long tt = valid[u] ? t : t0;
      float c[EPL];
      #pragma unroll
      for (int k = 0; k < EPL; k += 8) optiq_unpack8<KB>(kbase + tt * kc_strides[2], e0 + k, c + k);
      const float ksc = (float)ksb[tt * ks_strides[2]], kbi = (float)kbb[tt * kb_strides[2]];
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        float dot = 0.0f;
        #pragma unroll
        for (int j = 0; j < EPL; ++j) dot += qv[r][j] * c[j];
        score[u][r] = ksc * dot + kbi * qsum[r];
      }
      #pragma unroll
      for (int k = 0; k < EPL; k += 8) optiq_unpack8<VB>(vbase + tt * vc_strides[2], e0 + k, val[u] + k);
      const float vsc = (float)vsb[tt * vs_strides[2]], vbi = (float)vbb[tt * vb_strides[2]];
      #pragma unroll
      for (int j = 0; j < EPL; ++j) val[u][j] = vsc * val[u][j] + vbi;
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int off = LP / 2; off > 0; off >>= 1) score[u][r] += __shfl_xor_sync(0xffffffffu, score[u][r], off);
      }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!valid[u]) continue;
      const int t = tb + u * PW + sub;
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        if (CAUSAL && t > T - L + (r % L)) continue;
        const float mn = fmaxf(m[r], score[u][r]);
        const float corr = exp2f(m[r] - mn), p = exp2f(score[u][r] - mn);
        lsum[r] = lsum[r] * corr + p;
        #pragma unroll
        for (int j = 0; j < EPL; ++j) acc[r][j] = acc[r][j] * corr + p * val[u][j];
        m[r] = mn;
      }
    }
  }

  #pragma unroll
  for (int r = 0; r < R; ++r) {
    if (li == 0) {
      sm_m[group][r] = m[r];
      sm_l[group][r] = lsum[r];
    }
    #pragma unroll
    for (int j = 0; j < EPL; ++j) sm_o[group][r][e0 + j] = acc[r][j];
  }
  __syncthreads();
  const long base = ((long)(bi * H + h) * S + split) * R;
  for (int idx = threadIdx.x; idx < R * D; idx += THREADS) {
    const int r = idx / D, d = idx % D;
    float mx_ = OPTIQ_NEG_INF;
    for (int g = 0; g < NGROUPS; ++g) mx_ = fmaxf(mx_, sm_m[g][r]);
    float num = 0.0f, den = 0.0f;
    if (mx_ != OPTIQ_NEG_INF) {
      for (int g = 0; g < NGROUPS; ++g) {
        if (sm_m[g][r] == OPTIQ_NEG_INF) continue;
        const float w = exp2f(sm_m[g][r] - mx_);
        num += w * sm_o[g][r][d];
        den += w * sm_l[g][r];
      }
    }
    part_o[(base + r) * D + d] = num;
    if (d == 0) {
      part_m[base + r] = mx_;
      part_l[base + r] = den;
    }
  }
"""

COMBINE_SOURCE = """
#ifndef OPTIQ_NEG_INF
#define OPTIQ_NEG_INF (__int_as_float(0xff800000))
#endif
  constexpr int REP = R / L;
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  const int B = part_m_shape[0], H = part_m_shape[1], S = part_m_shape[2];
  if (idx >= (long)B * H * R * D) return;
  const int d = idx % D;
  const int r = (idx / D) % R;
  const int h = (idx / ((long)D * R)) % H;
  const int bi = idx / ((long)D * R * H);
  const long row = (long)(bi * H + h) * S;
  float mx_ = OPTIQ_NEG_INF;
  for (int s = 0; s < S; ++s) mx_ = fmaxf(mx_, part_m[(row + s) * R + r]);
  float num = 0.0f, den = 0.0f;
  for (int s = 0; s < S; ++s) {
    const float ms = part_m[(row + s) * R + r];
    if (ms == OPTIQ_NEG_INF) continue;
    const float w = exp2f(ms - mx_);
    num += w * part_o[((row + s) * R + r) * D + d];
    den += w * part_l[(row + s) * R + r];
  }
  const int hq = h * REP + r / L, l = r % L;
  out[(((long)bi * H * REP + hq) * L + l) * D + d] = (QT)(num / den);
"""

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def _kernels():
    partial = mx.fast.cuda_kernel(
        name="optiq_kv_decode_partial", input_names=["q", "kc", "ks", "kb", "vc", "vs", "vb", "scale", "lp"],
        output_names=["part_m", "part_l", "part_o"], source=PARTIAL_SOURCE, header=HEADER, ensure_row_contiguous=False,
    )
    combine = mx.fast.cuda_kernel(
        name="optiq_kv_decode_combine", input_names=["part_m", "part_l", "part_o"], output_names=["out"], source=COMBINE_SOURCE,
    )
    return partial, combine


@functools.lru_cache(maxsize=64)
def _scale(value: float) -> mx.array:
    a = mx.array([value * LOG2E], dtype=mx.float32)
    mx.eval(a)
    return a


def supported(queries, keys, mask, k_bits: int, v_bits: int) -> bool:
    """Whether the fused kernel serves this call (else: dequantized attention)."""
    if not (ENABLED and device.on_cuda()):
        return False
    B, n_q, L, D = queries.shape
    n_kv = keys[0].shape[1]
    rows = (n_q // n_kv) * L
    causal_ok = mask is None or (isinstance(mask, str) and mask == "causal")
    return (D in HEAD_DIMS and n_q % n_kv == 0 and rows <= MAX_ROWS and causal_ok and k_bits in (2, 3, 4, 5, 6, 8)
            and v_bits in (2, 3, 4, 5, 6, 8) and keys[1].dtype in (mx.float16, mx.bfloat16, mx.float32))


def splits(T: int, B: int, H: int) -> int:
    return max(1, min(-(-TARGET_BLOCKS // (B * H)), -(-T // MIN_CHUNK)))


@functools.lru_cache(maxsize=16)
def _no_padding(batch: int) -> mx.array:
    a = mx.zeros((batch,), dtype=mx.int32)
    mx.eval(a)
    return a


def decode_attention(queries, q_keys, q_values, scale: float, mask, group_size: int, k_bits: int, v_bits: int, left_padding=None) -> mx.array:
    """softmax(q k^T * scale) v over affine codes (B, H_kv, T, ...), as (B,
    H_q, L, D); `left_padding` (B,) int32: a batch's padded positions."""
    B, n_q, L, D = queries.shape
    H, T = q_keys[0].shape[1], q_keys[0].shape[2]
    R = (n_q // H) * L
    S = splits(T, B, H)
    partial, combine = _kernels()
    template = [("KB", k_bits), ("VB", v_bits), ("D", D), ("G", group_size), ("R", R), ("L", L),
                ("CAUSAL", mask is not None and L > 1), ("THREADS", THREADS), ("EPL", (EPL or 16) if R <= 4 else 8), ("U", UNROLL),
                ("QT", queries.dtype), ("ST", q_keys[1].dtype)]
    lp = _no_padding(B) if left_padding is None else left_padding.astype(mx.int32)
    part_m, part_l, part_o = partial(
        inputs=[queries, *q_keys, *q_values, _scale(scale), lp], template=template,
        grid=(S * THREADS, H, B), threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, H, S, R), (B, H, S, R), (B, H, S, R, D)], output_dtypes=[mx.float32] * 3,
    )
    total = B * H * R * D
    (out,) = combine(
        inputs=[part_m, part_l, part_o], template=[("R", R), ("L", L), ("D", D), ("QT", queries.dtype)],
        grid=(-(-total // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(B, n_q, L, D)], output_dtypes=[queries.dtype],
    )
    return out
