"""MLX's Linux CPU wheel links a reference BLAS; OpenBLAS makes fp32 matmuls
about 30x faster. The command line re-executes itself once with OpenBLAS
preloaded when the library is installed, and says so once when it is not."""

import os
import sys
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
INSTALL_HINT = (
    "apt-get install -y libopenblas0-pthread, then run with "
    f"LD_PRELOAD={OPENBLAS}"
)


def openblas_loaded() -> bool:
    """Whether the BLAS that MLX calls is OpenBLAS. numpy and scipy bundle their
    own OpenBLAS (scipy_openblas), which MLX does not use: those do not count."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return True  # not Linux: nothing to say
    for line in maps:
        path = line.split()[-1].lower() if line.split() else ""
        if "openblas" in path and "numpy" not in path and "scipy" not in path:
            return True
    return False


def _command_line():
    """This process's command line, in a form that runs it again (None for -c)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name:  # python -m package[.module]
        return ["-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]]
    if not sys.argv or sys.argv[0] in ("-c", ""):
        return None
    return list(sys.argv)


def ensure_fast_blas(argv=None):
    """Re-exec with OpenBLAS preloaded when possible; otherwise warn once."""
    if not sys.platform.startswith("linux") or openblas_loaded():
        return
    if os.environ.get("OPTIQ_BLAS_CHECKED"):
        return
    os.environ["OPTIQ_BLAS_CHECKED"] = "1"
    args = list(argv) if argv is not None else _command_line()
    if OPENBLAS.exists() and args:
        env = dict(os.environ)
        env["LD_PRELOAD"] = ":".join(filter(None, [str(OPENBLAS), env.get("LD_PRELOAD")]))
        os.execve(sys.executable, [sys.executable, *args], env)
    print(
        "optiq: MLX is using the slow reference BLAS; fp32 work is ~30x faster with "
        f"OpenBLAS: {INSTALL_HINT}",
        file=sys.stderr,
    )
