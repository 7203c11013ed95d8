"""Where MLX runs and what optiq does with it: fp32 measurements on a CPU,
the model's own dtype on a GPU; a CUDA wheel shadowed by the CPU wheel's
libmlx.so is refused with the fix."""

import importlib.metadata

import mlx.core as mx
import pytest

from optiq import device
from optiq.errors import OptiqError


def test_the_cpu_measures_in_fp32_and_says_so():
    assert not device.on_gpu() or mx.cuda.is_available() or mx.metal.is_available()
    if not device.on_gpu():
        assert device.measuring_dtype(mx.bfloat16) == mx.float32
        assert "CPU" in device.describe() and "fp32" in device.describe()
        assert device.row_slab() == 1 << 20
    else:
        assert device.measuring_dtype(mx.bfloat16) == mx.bfloat16


def test_a_cuda_wheel_under_the_cpu_build_is_refused_with_the_fix(monkeypatch):
    installed = {"mlx-cuda-13": "0.32.4", "mlx-cpu": "0.32.4"}

    def version(name):
        if name in installed:
            return installed[name]
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    with pytest.raises(OptiqError, match="pip uninstall -y mlx-cpu && pip install --force-reinstall --no-deps mlx-cuda-13"):
        device.check_backend()
    del installed["mlx-cpu"]  # a CUDA wheel alone on a machine without a GPU: MLX's own message, not ours
    device.check_backend()
