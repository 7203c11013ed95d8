"""TurboQuant KV benchmark: TurboQuant against mlx-lm's affine quantized KV
cache and the unquantized cache, measured side by side in one run.

    python benchmarks/turbo.py                    # SmolLM2-135M-Instruct (fp32 weights)
    python benchmarks/turbo.py --model PATH --contexts 8192,16384

Sections (each printed as a table, all written to benchmarks/results/turbo.json):
1. distortion per unit vector on random vectors, TurboQuant-mse against the
   paper's reported values and bound, and affine quantization at its
   effective bits (fp16 scale and bias per group counted);
2. attention-output error on real keys, values and queries captured from
   the model on WikiText-2;
3. KL and perplexity against the unquantized cache on held-out WikiText-2
   windows (prefill, then teacher-forced decoding through the cache), and a
   needle check (a planted number at several depths, exact match);
4. decode tokens per second at long context: every cache is filled to the
   context length with random keys and values of the model's shapes (decode
   cost depends on the shapes, not the values), then timed over decode steps.
Weights stay fp32 so the rows differ only in the KV cache.
"""

import argparse
import json
from pathlib import Path

from common import RESULTS, WIKITEXT, held_out_tokens, kv_decode_speed, kv_needle, kv_quality


def configs(bits_list):
    rows = [("unquantized", None, None)]
    rows += [(f"affine {b}-bit g64", "affine", b) for b in (2, 3, 4, 8)]
    rows += [(f"turbo {b}-bit", "turbo", b) for b in bits_list]
    return rows


def make_caches(model, mode, bits):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    from optiq.kv.caches import make_turbo_cache

    if mode == "turbo":
        return make_turbo_cache(model, bits)
    caches = make_prompt_cache(model)
    if mode == "affine":
        caches = [QuantizedKVCache(64, bits) if type(c) is KVCache else c for c in caches]
    return caches


def rows(bits_list):
    return [(name, lambda model, m=mode, b=bits: make_caches(model, m, b)) for name, mode, bits in configs(bits_list)]


def kv_bits(mode, bits, head_dim):
    if mode is None:
        return 16.0
    return bits + (32.0 / 64 if mode == "affine" else 16.0 / head_dim)


def distortion(d=64, n=4000):
    import mlx.core as mx
    import numpy as np

    from optiq import turboquant as turbo

    x = np.random.default_rng([7, 99]).standard_normal((n, d)).astype(np.float32)
    x = mx.array(x / np.linalg.norm(x, axis=1, keepdims=True))
    rows = []
    for b in (1, 2, 3, 4):
        rot = turbo.rotation(d, 1)
        p, nrm = turbo.quantize_mse(x, rot, b)
        err = mx.mean(mx.sum((x - turbo.dequantize_mse(p, nrm, rot, b)) ** 2, -1)).item()
        rows.append(dict(method=f"turbo {b}-bit", bits=b + 16 / d, mse=err, paper=turbo.PAPER_MSE[b], bound=turbo.mse_bound(b)))
    for b in (2, 3, 4):
        for g in (64, 32):
            w, s, bb = mx.quantize(x, group_size=g, bits=b)
            err = mx.mean(mx.sum((x - mx.dequantize(w, s, bb, group_size=g, bits=b)) ** 2, -1)).item()
            rows.append(dict(method=f"affine {b}-bit g{g}", bits=b + 32 / g, mse=err, paper=None, bound=None))
    return rows


def attention_error(model, tokens, bits_list):
    """Attention outputs over real K/V/Q of every full-attention layer, relative error."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from optiq.kv.turbo_cache import TurboQuantKVCache, turbo_attention

    caches = make_prompt_cache(model)
    captured = {}
    attn_modules = [(i, layer.self_attn) for i, layer in enumerate(model.layers)]
    originals = {}
    for i, attn in attn_modules:  # capture the queries each layer sees (rope applied)
        originals[i] = attn.rope

        def rope(x, offset=0, _i=i, _orig=attn.rope):
            y = _orig(x, offset=offset)
            captured.setdefault(_i, []).append(y)
            return y

        attn.rope = rope
    model(mx.array(tokens[:1]), cache=caches)
    for i, attn in attn_modules:
        object.__delattr__(attn, "rope")  # drop the hook (an instance attribute) ...
        attn.rope = originals[i]  # ... and put the module back as a child
    rows = {}
    for i, cache in enumerate(caches):
        if type(cache) is not KVCache:
            continue
        q = captured[i][0][:, :, -64:]  # the last 64 queries (the first rope call is q)
        keys, values = cache.keys[:, :, : cache.offset], cache.values[:, :, : cache.offset]
        scale = model.layers[i].self_attn.scale
        # the last 64 queries attend to every cached position (no mask needed: all precede them)
        ref = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=None)
        norm = mx.linalg.norm(ref).item()
        for b in (2, 3, 4, 8):
            qc = QuantizedKVCache(64, b)
            k, v = qc.update_and_fetch(keys, values)
            # a copy: mlx-lm's function scales its queries argument in place (queries *= scale)
            out = quantized_scaled_dot_product_attention(q * 1, k, v, scale=scale, mask=None, group_size=64, bits=b)
            rows.setdefault(f"affine {b}-bit g64", []).append(mx.linalg.norm(out - ref).item() / norm)
        for b in bits_list:
            tc = TurboQuantKVCache(b, 0, i)
            tc.update_and_fetch(keys, values)
            out = turbo_attention(q, tc, scale, None)
            rows.setdefault(f"turbo {b}-bit", []).append(mx.linalg.norm(out - ref).item() / norm)
    return {k: sum(v) / len(v) for k, v in rows.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--bits", default="2,3,4", help="TurboQuant bit-widths")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=768)
    p.add_argument("--contexts", default="8192,16384")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--needle-tokens", type=int, default=400, help="filler tokens around the planted fact")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: distortion,attention,quality,needle,speed")
    p.add_argument("--out", default=str(RESULTS / "turbo.json"))
    args = p.parse_args()

    from optiq.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx_lm

    from optiq.source import resolve_model, to_fp32

    skip = set(args.skip.split(","))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every section, so a stopped run keeps what it measured
        out_path.write_text(json.dumps(result, indent=2))
    bits_list = [int(b) for b in args.bits.split(",")]
    folder = resolve_model(args.model)
    model, tok = mlx_lm.load(str(folder))
    to_fp32(model)
    head_dim = model.layers[0].self_attn.head_dim if hasattr(model.layers[0].self_attn, "head_dim") else 64
    result = dict(model=str(folder), args=vars(args), wikitext=WIKITEXT.exists())

    if "distortion" not in skip:
        result["distortion"] = distortion()
        save()
        print("\n| method | bits/element | MSE per unit vector | paper | paper bound |\n|---|---|---|---|---|")
        for r in result["distortion"]:
            print(f"| {r['method']} | {r['bits']:.3f} | {r['mse']:.4f} | {r['paper'] or ''} | {'' if r['bound'] is None else round(r['bound'], 4)} |")
    windows_ = held_out_tokens(tok, args.windows, args.seq_len)
    if "attention" not in skip:
        result["attention"] = attention_error(model, windows_, bits_list)
        save()
        print("\n| KV | relative attention-output error |\n|---|---|")
        for k, v in result["attention"].items():
            print(f"| {k} | {v:.4f} |")
    if "quality" not in skip:
        print("\nquality (KL and perplexity vs the unquantized cache):")
        result["quality"] = kv_quality(model, windows_, args.prefill, rows(bits_list), first=args.prefill - 1)
        save()
    if "needle" not in skip:
        print("\nneedle:")
        result["needle"] = kv_needle(model, tok, rows(bits_list), args.needle_tokens)
        save()
    if "speed" not in skip:
        print("\ndecode speed:")
        result["speed"] = kv_decode_speed(model, tok, [int(c) for c in args.contexts.split(",")], rows(bits_list), args.steps)
        save()

    print(f"\nmodel {folder}; WikiText-2 held out: {result['wikitext']}; {args.windows}x{args.seq_len} tokens, prefill {args.prefill}\n")
    print("| KV cache | bits/element | KL | ppl | needle | " + " | ".join(f"tok/s @{c}" for c in args.contexts.split(",")) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.contexts.split(",")))
    for name, mode, bits in configs(bits_list):
        q = result.get("quality", {}).get(name, {})
        n = result.get("needle", {}).get(name, {})
        speeds = [next((r["tok_per_s"] for r in result.get("speed", []) if r["method"] == name and r["context"] == int(c)), float("nan")) for c in args.contexts.split(",")]
        print(f"| {name} | {kv_bits(mode, bits, head_dim):.3f} | {q.get('kl', float('nan')):.4f} | {q.get('ppl', float('nan')):.2f} | "
              f"{n.get('hits', '-')}/{n.get('of', '-')} | " + " | ".join(f"{s:.2f}" for s in speeds) + " |")
    save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
