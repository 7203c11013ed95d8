"""Vision-language models: mlx-vlm's own 4-bit conversion against optiq's
plans at the same size, measured side by side in one run.

    python benchmarks/vlm.py                       # a tiny random Qwen2-VL built here
    python benchmarks/vlm.py --model PATH          # any mlx-vlm model folder

Rows, each written and then opened by stock mlx_vlm.load:
- mlx-vlm convert -q (4 bits, group 64; its default keeps the vision tower
  and projector float): what mlx-vlm users run today;
- uniform 4-bit group 64 over every layer, vision included (simulated);
- optiq exact, round-to-nearest and GPTQ, at mlx-vlm's effective bpw.
Columns: effective bits per weight over the quantizable layers (scales and
biases counted; float layers at 16), held-out mean KL and top-1 agreement
against the float model on drawn scenes (another seed than calibration),
AI2D-style accuracy on drawn diagrams and how often the pick equals the
float model's. Writes benchmarks/results/vlm-<model>.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, weight_bits  # noqa: E402  (also puts the repo on sys.path)
from optiq.blas import ensure_fast_blas  # noqa: E402


def measured(path, held_out, float_picks, items) -> dict:
    """Held-out KL and diagram accuracy of a written model, as mlx_vlm.load opens it."""
    from optiq import vlm
    from optiq.source import dequantized_fp32

    raw, processor = vlm.load(path, fp32=False)
    bits, n = weight_bits(raw)
    bpw = bits / n
    model = dequantized_fp32(raw)
    kl = held_out.kl(model=model)
    choice = vlm.choices(model, processor, items)
    agree = sum(a == b for a, b in zip(choice["picks"], float_picks)) / len(items)
    return dict(effective_bpw=bpw, kl_mean=kl["kl_mean"], top1=kl["top1"], accuracy=choice["accuracy"], same_pick=agree)


def main():
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an mlx-vlm model folder (default: a tiny random Qwen2-VL)")
    p.add_argument("--n-calibration", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import mlx.core as mx
    from mlx_vlm import convert as vlm_convert

    from optiq import vlm
    from optiq.pipeline import ConvertConfig, Report, convert
    from optiq.evaluate import simulated
    from optiq.records import Candidate

    work = Path(tempfile.mkdtemp(prefix="optiq-bench-vlm-"))
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from vlm_models import build_vlm

        source, name = build_vlm(work / "tiny-qwen2-vl", "qwen2_vl"), "tiny-random-qwen2-vl"
    else:
        source, name = Path(args.model), Path(args.model).name
    model, processor = vlm.load(source)
    held_out = vlm.Calibrated(model, vlm.calibration(model, processor, None, args.n_eval, seed=1))
    items = vlm.choice_items(args.questions, seed=1234)
    float_choice = vlm.choices(model, processor, items)
    rows = [dict(method="float (reference)", effective_bpw=16.0, kl_mean=0.0, top1=1.0, accuracy=float_choice["accuracy"], same_pick=1.0, seconds=0.0)]

    t = time.time()
    baseline = work / "mlx-vlm-4bit"
    vlm_convert(str(source), mlx_path=str(baseline), quantize=True, q_group_size=64, q_bits=4)
    rows.append(dict(method="mlx-vlm convert -q (4-bit g64, vision float)", **measured(baseline, held_out, float_choice["picks"], items), seconds=time.time() - t))
    target = rows[-1]["effective_bpw"]

    for quantizer in ("rtn", "gptq"):
        t = time.time()
        out = work / f"optiq-{quantizer}"
        # float (16) is a candidate too: mlx-vlm's row keeps whole towers float
        convert(ConvertConfig(model=str(source), output=str(out), target_bpw=target, model_type="vlm", quantizer=quantizer,
                              bits=(4, 5, 6, 8, 16), n_calibration=args.n_calibration, evaluate=False), Report(quiet=True))
        rows.append(dict(method=f"optiq exact, {quantizer}, 4-8 bits or float", **measured(out, held_out, float_choice["picks"], items), seconds=time.time() - t))

    # Uniform 4-bit over every layer that group 64 divides, the vision tower included.
    layers, twins = vlm.quantizable(model)
    every = layers + [t for ts in twins.values() for t in ts]
    uniform = [(p, Candidate(4, 64)) for p, m in every if m.weight.shape[-1] % 64 == 0]
    chosen = dict(uniform)
    bits = sum(m.weight.size * (chosen[p].effective_bits if p in chosen else 16) for p, m in every)
    with simulated(model, uniform):
        kl = held_out.kl()
        choice = vlm.choices(model, processor, items)
    agree = sum(a == b for a, b in zip(choice["picks"], float_choice["picks"])) / len(items)
    rows.append(dict(method="uniform 4-bit g64, vision included (simulated)", effective_bpw=bits / sum(m.weight.size for _, m in every),
                     kl_mean=kl["kl_mean"], top1=kl["top1"], accuracy=choice["accuracy"], same_pick=agree, seconds=0.0))
    mx.clear_cache()

    print(f"\n{name}: held-out drawn scenes {args.n_eval}, diagram questions {args.questions}, calibration {args.n_calibration}\n")
    print("| method | eff. bpw | mean KL | top-1 | diagram accuracy | same pick as float | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['effective_bpw']:.3f} | {r['kl_mean']:.4f} | {r['top1']:.3f} | {r['accuracy']:.3f} | {r['same_pick']:.3f} | {r['seconds']:.1f} |")
    out = Path(args.out or RESULTS / f"vlm-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=str(args.model or name), args=vars(args), rows=rows), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
