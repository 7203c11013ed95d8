#!/usr/bin/env bash
# Run the whole suite (tests/ and properties/) with OpenBLAS preloaded when present.
set -euo pipefail
cd "$(dirname "$0")/.."
BLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [ -e "$BLAS" ]; then export LD_PRELOAD="$BLAS${LD_PRELOAD:+:$LD_PRELOAD}"; fi
exec .venv/bin/python -m pytest "$@"
