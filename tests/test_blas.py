import os
import subprocess
import sys

import pytest

from optiq.blas import OPENBLAS

pytestmark = pytest.mark.cpu_only  # OpenBLAS is the CPU backend's BLAS

CHECK = "from optiq.blas import openblas_loaded; import numpy, scipy.linalg; print(openblas_loaded())"


def run(env):
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True).stdout.strip()


def test_numpy_bundled_openblas_does_not_count():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert run(env) == "False"


@pytest.mark.skipif(not OPENBLAS.exists(), reason="system OpenBLAS not installed")
def test_preloaded_openblas_is_seen():
    assert run(dict(os.environ, LD_PRELOAD=str(OPENBLAS))) == "True"


@pytest.mark.skipif(not OPENBLAS.exists(), reason="system OpenBLAS not installed")
def test_cli_reexecs_itself_with_openblas():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPTIQ_BLAS_CHECKED")}
    code = "import sys; sys.argv=['-c']; from optiq.blas import ensure_fast_blas, openblas_loaded; ensure_fast_blas(['-c', 'from optiq.blas import openblas_loaded; print(openblas_loaded())'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
    assert out == "True"
