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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def small_model(config_dir: Path, out: Path, n_layers: int) -> Path:
    """A random-weight copy of the real architecture with `n_layers` layers, saved."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, save_model

    config = json.loads((config_dir / "config.json").read_text())
    config["num_hidden_layers"] = n_layers
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    model, _ = load_model(out, lazy=True, strict=False)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    save_model(out, model)
    for name in TOKENIZER_FILES:
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, out / name)
    return out


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

    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.evaluate import quality, reference_batches
    from optiq.tasks import gsm8k, read_gsm8k

    t0 = time.perf_counter()
    stamp = lambda what: print(f"[{args.bits}@{args.group_size}] {what} {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref = small_model(Path(args.config), Path(tmp) / "ref", args.layers)
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
