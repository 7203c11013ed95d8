"""The CUDA kernel sources compile (nvcc, Hopper), wrapped exactly as
mx.fast.cuda_kernel wraps them: a syntax or type error is caught on a
machine without a GPU, where the suite runs. Skipped without nvcc."""

import shutil
import subprocess

import pytest

from optiq import gptq
from optiq.kv import kernels

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

# What MLX puts before a custom kernel (mlx/backend/cuda/custom_kernel.cpp),
# with its device utilities reduced to the two types the signature uses.
PREAMBLE = """
#include <cooperative_groups.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cstdint>
#define inf cuda::std::numeric_limits<float>::infinity()
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 8>;
using Strides = cuda::std::array<int64_t, 8>;
}
"""
CUDA_TYPES = {"int32": "int32_t", "float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t", "uint8": "uint8_t"}


def wrapped(name, header, source, inputs, outputs, template) -> str:
    """inputs/outputs: [(name, dtype name, ndim)] as the kernel is called."""
    args = []
    for arg, dtype, ndim in inputs:
        args.append(f"const {CUDA_TYPES[dtype]}* {arg}")
        if ndim:
            for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
                if arg + suffix in source:
                    args.append(f"const __grid_constant__ {kind} {arg}{suffix}")
    args += [f"{CUDA_TYPES[dtype]}* {arg}" for arg, dtype, _ in outputs]
    consts = "".join(f"  using {k} = {CUDA_TYPES[v]};\n" if isinstance(v, str) else f"  constexpr {'bool' if isinstance(v, bool) else 'int'} {k} = {str(v).lower()};\n"
                     for k, v in template)
    return (PREAMBLE + header + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
            f"__global__ void {name}(\n    " + ",\n    ".join(args) + ") {\n" + consts + source + "\n}\n}\n")


def compiles(tmp_path, text):
    src = tmp_path / "k.cu"
    src.write_text(text)
    out = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("store", [0, 1])
def test_gptq_block_kernel_compiles(tmp_path, store):
    compiles(tmp_path, wrapped(
        "gptq", gptq.GPTQ_HEADER, gptq.GPTQ_BLOCK_SOURCE,
        [("w", "float32", 2), ("u", "float32", 2)],
        [("codes", "uint8", 2), ("scales", "float32", 2), ("biases", "float32", 2), ("errors", "float32", 2)],
        [("NB", 128), ("G", 64), ("BITS", 4), ("STORE", store), ("THREADS", gptq.GPTQ_THREADS)],
    ))


@pytest.mark.parametrize("bits, d, rows, length, qtype", [((4, 4), 128, 4, 1, "bfloat16"), ((8, 3), 64, 8, 2, "float16"), ((5, 6), 256, 2, 1, "float32")])
def test_decode_attention_kernels_compile(tmp_path, bits, d, rows, length, qtype):
    k_bits, v_bits = bits
    q = [("q", qtype, 4)]
    codes = [("kc", "uint32", 4), ("ks", "float16", 4), ("kb", "float16", 4), ("vc", "uint32", 4), ("vs", "float16", 4), ("vb", "float16", 4)]
    compiles(tmp_path, wrapped(
        "partial", kernels.HEADER, kernels.PARTIAL_SOURCE, q + codes + [("scale", "float32", 1), ("lp", "int32", 1)],
        [("part_m", "float32", 4), ("part_l", "float32", 4), ("part_o", "float32", 5)],
        [("KB", k_bits), ("VB", v_bits), ("D", d), ("G", 64), ("R", rows), ("L", length), ("CAUSAL", length > 1),
         ("THREADS", kernels.THREADS), ("EPL", 16 if rows <= 4 else 8), ("U", kernels.UNROLL), ("QT", qtype), ("ST", "float16")],
    ))
    compiles(tmp_path, wrapped(
        "combine", "", kernels.COMBINE_SOURCE, [("part_m", "float32", 4), ("part_l", "float32", 4), ("part_o", "float32", 5)],
        [("out", qtype, 4)], [("R", rows), ("L", length), ("D", d), ("QT", qtype)],
    ))
