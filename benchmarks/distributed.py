"""Beyond one machine's limits, measured: the sensitivity pass spread over
processes with mlx.launch, and a model streamed from disk under --max-memory.

    python benchmarks/distributed.py                 # SmolLM2-135M-Instruct
    python benchmarks/distributed.py --model PATH --processes 2

Rows (each a full `optiq convert --no-eval`, run as a subprocess in the same
environment): one process in memory; N processes under `mlx.launch --backend
ring` on this machine; one process with --max-memory below the model's fp32
size (streaming). Columns: wall time, the peak memory the command reports
(rank 0's for mlx.launch), and whether the plan equals the in-memory one.
A last run with every probe cached gives the part that does not split, and
from it the expected speed-up on N machines (Amdahl's law).
The table prints as markdown and goes to benchmarks/results/distributed.json.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env) -> tuple:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    out = done.stdout + done.stderr
    if done.returncode != 0 or "wrote" not in out:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    peak = re.findall(r"peak memory (\d+) MiB", out)
    return seconds, int(peak[-1]) if peak else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--max-memory", type=float, default=None, help="GB for the streaming row (default: half the fp32 model)")
    p.add_argument("--convert-args", default="--n-calibration 4 --seq-len 128 --no-eval --quantizer rtn --candidate-bits 2,3,4,5,6,8 --group-size 64", help="not --quiet: the run reports its peak memory in its last line")
    p.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = p.parse_args()

    from optiq.blas import ensure_fast_blas

    ensure_fast_blas()
    from optiq.source import resolve_model
    from optiq.stream import checkpoint_bytes_fp32

    folder = resolve_model(args.model)
    fp32_gb = checkpoint_bytes_fp32(folder) / 2**30
    budget = args.max_memory or fp32_gb / 2
    work = Path(tempfile.mkdtemp(prefix="optiq-distributed-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launch = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    convert = [sys.executable, str(ROOT / "scripts" / "convert.py"), str(folder), *args.convert_args.split()]
    rows = {}
    try:
        variants = [
            ("1 process, in memory", convert + ["-o", str(work / "one")], "one", "one"),
            (f"{args.processes} processes (mlx.launch, ring)", [launch, "-n", str(args.processes), "--backend", "ring", "--", *convert, "-o", str(work / "many")], "many", "many"),
            (f"1 process, streamed (--max-memory {budget:.3f} GB)", convert + ["-o", str(work / "streamed"), "--max-memory", f"{budget:.4f}"], "streamed", "streamed"),
            # the first run's probe cache: what is left is the part that does not split
            ("1 process, probes cached", convert + ["-o", str(work / "cached")], "cached", "one"),
        ]
        plans = {}
        for name, cmd, folder_name, cache in variants:
            print(f"running: {name}", flush=True)
            # each run its own probe cache (the model folder is resolved already)
            seconds, peak = run(cmd, dict(env, OPTIQ_CACHE_DIR=str(work / f"cache-{cache}")))
            meta = json.loads((work / folder_name / "optiq_metadata.json").read_text())
            plans[folder_name] = meta["plan"]["assignments"]
            rows[name] = dict(seconds=seconds, peak_mib=peak, same_plan=plans[folder_name] == plans["one"])
            print(f"  {seconds:.0f} s, peak {peak} MiB, same plan: {rows[name]['same_plan']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows["1 process, in memory"]["seconds"]
    serial = rows["1 process, probes cached"]["seconds"]  # load, calibration, reference pass, plan, write
    probes = base - serial
    paper = {n: base / (serial + probes / n) for n in (2, 4, 8)}
    print(f"\nmodel {folder} ({fp32_gb:.3f} GB in fp32); optiq convert {args.convert_args}; {os.cpu_count()} CPUs\n")
    print("| run | wall time (s) | speed-up | peak memory (MiB) | same plan |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.0f} | {base / r['seconds']:.2f}x | {r['peak_mib']} | {r['same_plan']} |")
    print(f"\nprobes {probes:.0f} s of {base:.0f} s; on paper, N machines each as fast as this one: "
          + ", ".join(f"{n}: {v:.2f}x" for n, v in paper.items()) + " (Amdahl: the unsplit part runs on every rank)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(model=str(folder), fp32_gb=fp32_gb, args=vars(args), cpus=os.cpu_count(), rows=rows,
                                              probe_seconds=probes, serial_seconds=serial, paper_speedup=paper), indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
