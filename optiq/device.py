"""Which device MLX runs on, and what that means for optiq's numbers.

On a CPU, optiq measures and serves with fp32 activations: bf16/fp16
matmuls there are slow and `quantized_matmul` in bf16 accumulates with 4-7%
error. On a GPU (MLX's CUDA or Metal backend) the model runs in its own
dtype (bf16/fp16 activations), as every GPU runtime serves it, and the
kernels accumulate in fp32.
"""

import importlib.metadata

import mlx.core as mx

from .errors import OptiqError

CUDA_WHEELS = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def on_cuda() -> bool:
    """Whether MLX computes on an NVIDIA GPU: where optiq's CUDA kernels run."""
    return on_gpu() and mx.cuda.is_available()


def backend() -> str:
    """'cuda', 'metal' or 'cpu': what MLX computes with by default."""
    if not on_gpu():
        return "cpu"
    return "cuda" if mx.cuda.is_available() else "metal"


def describe() -> str:
    """One line for a command's log: the device and the activation dtype policy."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or info.get("architecture") or ""
    if on_gpu():
        return f"device: GPU ({backend()}{', ' + name if name else ''}), the model's own dtype for activations"
    return f"device: CPU{' (' + name + ')' if name else ''}, fp32 activations"


def installed_cuda_wheel() -> str | None:
    for name in CUDA_WHEELS:
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_backend():
    """Refuse the one broken install that looks fine: MLX's CUDA wheel beside
    its CPU wheel, where the CPU build's libmlx.so won (both ship
    mlx/lib/libmlx.so, and pip does not say which it kept)."""
    wheel = installed_cuda_wheel()
    if wheel is not None and not mx.cuda.is_available():
        try:
            importlib.metadata.version("mlx-cpu")
        except importlib.metadata.PackageNotFoundError:
            return  # a CUDA wheel without a usable GPU: MLX itself says so
        raise OptiqError(
            f"{wheel} and mlx-cpu are both installed and the CPU build's libmlx.so is the one in use: "
            f"pip uninstall -y mlx-cpu && pip install --force-reinstall --no-deps {wheel}"
        )


def measuring_dtype(model_dtype):
    """The activation dtype measurements run in: fp32 on CPU, the model's own on a GPU."""
    return model_dtype if on_gpu() else mx.float32


def row_slab() -> int:
    """Weights per slab of rows when a large layer is taken a slab at a time:
    a few MB on a CPU (memory, cache), whole layers on a GPU (parallelism;
    a GPU's memory holds them)."""
    return 1 << 20 if not on_gpu() else 1 << 30
