"""What runs around each probe, outside the measurement itself.

A measuring stage (probes.measure_weights, kv.measure_kv) calls
`on_probe(n, path, candidate, run)` for its n-th probe, where `run()` does
the probe and returns its KL; the callback returns the KL or None (the probe
is another process's). The default just runs it. The edges compose what
they need from the pieces here:

    on_probe = with_progress(bar, shared_by_ranks(cached(ProbeCache(path))))

none of which changes a number the stage computes.
"""

import json
from pathlib import Path

from . import distributed


def run_it(n, path, candidate, run):
    """The plain callback: every probe runs here."""
    return run()


class ProbeCache:
    """Probe results on disk, one JSON line each, so an interrupted pass resumes."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.values = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.values[(row["path"], row["candidate"])] = float(row["kl"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line cut short by an interruption

    def get(self, path, candidate):
        return self.values.get((path, candidate.key))

    def put(self, path, candidate, kl):
        self.values[(path, candidate.key)] = kl
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"path": path, "candidate": candidate.key, "kl": kl}) + "\n")


def cached(cache: ProbeCache, inner=run_it):
    """A probe found in `cache` is not run again; a new result is appended."""

    def on_probe(n, path, candidate, run):
        kl = cache.get(path, candidate)
        if kl is None:
            kl = inner(n, path, candidate, run)
            if kl is not None:
                cache.put(path, candidate, kl)
        return kl

    return on_probe


def shared_by_ranks(inner=run_it):
    """Under mlx.launch, probe n runs on rank n mod size only (distributed.py)."""

    def on_probe(n, path, candidate, run):
        return inner(n, path, candidate, run) if distributed.mine(n) else None

    return on_probe


def with_progress(bar, inner=run_it):
    """A tqdm bar ticks once per probe (run, cached or another rank's)."""

    def on_probe(n, path, candidate, run):
        bar.update(1)
        return inner(n, path, candidate, run)

    return on_probe
