"""scripts/*.py run the same code as the `optiq` commands."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_script_help(script):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"usage: scripts/{script}" in result.stdout


def test_optiq_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "optiq", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "convert" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "optiq", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
