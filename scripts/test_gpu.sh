#!/usr/bin/env bash
# The suite's GPU part, on a machine with MLX-CUDA (the lent H200): the
# kernels against their references (marked gpu), and the KV, GPTQ and probe
# tests that run there unchanged. Not the whole suite: MLX-CUDA compiles each
# new kernel shape at run time (~20 s for a fresh quantized-matmul shape), and
# the suite's tiny models make hundreds of them. Tests marked cpu_only
# (fp32 CPU paths, OpenBLAS, CPU memory peaks) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -p no:cacheprovider -m "not cpu_only" \
  tests/test_gptq.py tests/test_kv_decode.py tests/test_cuda_sources.py tests/test_sensitivity.py tests/test_kv.py "$@"
