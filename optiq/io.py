"""Atomic output folders: write into a temporary sibling, then rename.

A failed or interrupted run leaves no half-written output, and an existing
output is replaced only with `force` (and only once the new one is complete).
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OptiqError


def check_output(out: Path, force: bool):
    """Fail early, before any work, when the output cannot be written."""
    out = Path(out)
    if out.exists() and not force:
        raise OptiqError(f"{out} exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise OptiqError(f"{out} exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    try:  # os.access says yes to root everywhere; only trying tells
        os.rmdir(tempfile.mkdtemp(prefix=".optiq-probe-", dir=probe))
    except OSError as exc:
        raise OptiqError(f"cannot write {out}: {probe} is not a writable folder ({exc.strerror})")


@contextmanager
def atomic_output(out, force: bool = False):
    """Yield a temporary folder; on success it becomes `out`."""
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700: the output gets a folder's usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path, data):
    """Write JSON next to its final name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def copy_tokenizer_files(source, out):
    """Copy a model folder's tokenizer files (everything but its config and
    weights) from `source` into `out`."""
    for f in Path(source).iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model."):
            shutil.copy(f, Path(out) / f.name)
