"""Compile MLX-CUDA's kernels for one quantization format before the real run.

MLX-CUDA compiles each quantized-matmul kernel (per dtype, bits, group size,
layout) and each fused elementwise graph the first time it runs, ~20 s each;
a mixed plan needs many, and one process compiles them one after another.
This runs the same work as benchmarks/gsm8k.py's rows (`--work`: the KL
forward, batched greedy generation, mlx-lm's DWQ steps, an `optiq convert`)
and benchmarks/gpu.py's plans section (`speed`: decode and prefill) on a
2-layer random-weight model of the real config, so N processes (one per
format) fill N caches at once while the real model's parts are still on
their way; gsm8k.sh merges the caches.

    python benchmarks/gpu_jobs/warm_kernels.py --config DIR --bits 4 --group-size 64 --work kl,generate,speed --gsm8k test.jsonl --wikitext wiki.test.raw
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
    p.add_argument("--work", default="kl,generate", help="comma list of kl,generate,speed,dwq,convert")
    p.add_argument("--gsm8k", help="GSM8K test.jsonl (generate)")
    p.add_argument("--wikitext", help="wiki.test.raw (kl, dwq, convert)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=200, help="the real run's generation batch")
    p.add_argument("--decode-context", type=int, default=1024, help="speed: as gpu.py's plans section")
    p.add_argument("--decode-batches", default="1,16")
    p.add_argument("--prefill", type=int, default=2048)
    args = p.parse_args()
    work = set(filter(None, args.work.split(",")))
    for needs, what in (({"kl", "dwq", "convert"}, "wikitext"), ({"generate"}, "gsm8k")):
        if work & needs and not getattr(args, what):
            p.error(f"--work {','.join(sorted(work & needs))} needs --{what}")

    import mlx.nn as nn
    import mlx_lm
    from gpu import build_from_config, speed_row

    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.evaluate import quality, reference_batches
    from optiq.tasks import gsm8k, read_gsm8k

    t0 = time.perf_counter()
    stamp = lambda what: print(f"[{args.bits}@{args.group_size}] {what} {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads((Path(args.config) / "config.json").read_text())
        ref = build_from_config(dict(config, num_hidden_layers=args.layers), Path(tmp) / "ref", tokenizer_dir=Path(args.config))
        model, tok = mlx_lm.load(str(ref))
        nn.quantize(model, group_size=args.group_size, bits=args.bits)
        if work & {"kl", "dwq", "convert"}:
            cal_text, eval_text = wikitext_split(Path(args.wikitext).read_text())
        if "kl" in work:
            reference, _ = mlx_lm.load(str(ref))
            ev = tokens_from_texts([eval_text], tok, 4, 512)
            quality(model, ev, reference_batches(reference, ev, batch_size=4), batch_size=4)
            del reference
            stamp("KL forward")
        if "generate" in work:
            problems = read_gsm8k(Path(args.gsm8k))[: args.batch_size]
            gsm8k(model, tok, problems, [], max_tokens=3, batch_size=args.batch_size)
            stamp("batched generation")
        if "speed" in work:
            speed_row(model, args.decode_context, [int(b) for b in args.decode_batches.split(",")], args.prefill, steps=2)
            stamp("decode and prefill")
        if "dwq" in work:
            from tune import mlx_lm_dwq

            cal = tokens_from_texts([cal_text], tok, 8, 512)
            dwq_args = argparse.Namespace(top_k=1024, lr=1e-6, batch_size=4, seq_len=512, seed=0)
            mlx_lm_dwq(ref, cal, dwq_args)
            stamp("DWQ steps")
        if "convert" in work:
            cal_file = Path(tmp) / "calibration.txt"
            cal_file.write_text(cal_text[:200_000])
            subprocess.run([sys.executable, "-m", "optiq", "convert", str(ref), "-o", str(Path(tmp) / "optiq"),
                            "--target-bpw", "4.5", "--calibration", str(cal_file), "--no-eval", "--force"], check=True)
            stamp("optiq convert")


if __name__ == "__main__":
    main()
