"""Compile MLX-CUDA's kernels for one quantization format before the real run.

MLX-CUDA compiles each quantized-matmul kernel (per dtype, bits, group size,
layout) and each fused elementwise graph the first time it runs, ~20 s each;
a mixed plan needs many, and one process compiles them one after another.
This runs the same work as benchmarks/gsm8k.py's rows (batched greedy
generation, the KL forward, and for 4-bit g64 mlx-lm's DWQ steps and an
`optiq convert`) on a 2-layer random-weight model of the real config, so N
processes (one per format) fill N caches at once while the real model's
parts are still on their way; gsm8k.sh merges the caches.

    python benchmarks/gpu_jobs/warm_kernels.py --config DIR --bits 4 --group-size 64 --gsm8k test.jsonl --wikitext wiki.test.raw
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a directory with the real config.json and tokenizer files")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--gsm8k", required=True)
    p.add_argument("--wikitext", required=True)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=200, help="the real run's generation batch")
    p.add_argument("--also", default="", help="comma list of dwq,convert: the rows' own training and conversion")
    args = p.parse_args()

    import mlx.nn as nn
    import mlx_lm
    from gpu import build_from_config

    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.evaluate import quality, reference_batches
    from optiq.tasks import gsm8k, read_gsm8k

    t0 = time.perf_counter()
    stamp = lambda what: print(f"[{args.bits}@{args.group_size}] {what} {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads((Path(args.config) / "config.json").read_text())
        ref = build_from_config(dict(config, num_hidden_layers=args.layers), Path(tmp) / "ref", tokenizer_dir=Path(args.config))
        reference, tok = mlx_lm.load(str(ref))
        cal_text, eval_text = wikitext_split(Path(args.wikitext).read_text())
        ev = tokens_from_texts([eval_text], tok, 4, 512)
        refs = reference_batches(reference, ev, batch_size=4)
        model, _ = mlx_lm.load(str(ref))
        nn.quantize(model, group_size=args.group_size, bits=args.bits)
        quality(model, ev, refs, batch_size=4)
        stamp("KL forward")
        problems = read_gsm8k(Path(args.gsm8k))[: args.batch_size]
        gsm8k(model, tok, problems, [], max_tokens=3, batch_size=args.batch_size)
        stamp("batched generation")
        also = set(filter(None, args.also.split(",")))
        if "dwq" in also:
            from tune import mlx_lm_dwq

            cal = tokens_from_texts([cal_text], tok, 8, 512)
            dwq_args = argparse.Namespace(top_k=1024, lr=1e-6, batch_size=4, seq_len=512, seed=0)
            mlx_lm_dwq(ref, cal, dwq_args)
            stamp("DWQ steps")
        if "convert" in also:
            cal_file = Path(tmp) / "calibration.txt"
            cal_file.write_text(cal_text[:200_000])
            subprocess.run([sys.executable, "-m", "optiq", "convert", str(ref), "-o", str(Path(tmp) / "optiq"),
                            "--target-bpw", "4.5", "--calibration", str(cal_file), "--no-eval", "--force"], check=True)
            stamp("optiq convert")


if __name__ == "__main__":
    main()
