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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def configs(bits_list):
    rows = [("unquantized", None, None)]
    rows += [(f"affine {b}-bit g64", "affine", b) for b in (2, 3, 4, 8)]
    rows += [(f"turbo {b}-bit", "turbo", b) for b in bits_list]
    return rows


def make_caches(model, mode, bits):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    from optiq.kv.turbo import make_turbo_cache

    if mode == "turbo":
        return make_turbo_cache(model, bits)
    caches = make_prompt_cache(model)
    if mode == "affine":
        caches = [QuantizedKVCache(64, bits) if type(c) is KVCache else c for c in caches]
    return caches


def kv_bits(mode, bits, head_dim):
    if mode is None:
        return 16.0
    return bits + (32.0 / 64 if mode == "affine" else 16.0 / head_dim)


def distortion(d=64, n=4000):
    import mlx.core as mx
    import numpy as np

    from optiq import turbo

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


def held_out_tokens(tok, n, seq_len):
    from optiq.calibration import bos_prefix, wikitext_split, windows

    if WIKITEXT.exists():
        _, text = wikitext_split(WIKITEXT.read_text())
    else:  # without ../shared: any fixed English text, said so in the output
        text = " ".join(["The history of the city begins with a small settlement by the river."] * 2000)
    ids = tok.encode(text, add_special_tokens=False)
    return windows(ids, n, seq_len, bos_prefix(tok))


def attention_error(model, tokens, bits_list):
    """Attention outputs over real K/V/Q of every full-attention layer, relative error."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from optiq.kv.turbo import TurboQuantKVCache, turbo_attention

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


def quality(model, tok, windows_, prefill, bits_list):
    import mlx.core as mx

    from optiq import metrics
    from optiq.kv.sensitivity import run_with_cache

    toks = mx.array(windows_)
    refs = [run_with_cache(model, toks[i : i + 1], make_caches(model, None, None), prefill) for i in range(len(windows_))]
    out = {}
    for name, mode, bits in configs(bits_list):
        t0 = time.perf_counter()
        kls, nlls = [], []
        for i, ref in enumerate(refs):
            logits = ref if mode is None else run_with_cache(model, toks[i : i + 1], make_caches(model, mode, bits), prefill)
            r = metrics.reference_from_logits(ref[:, prefill - 1 : -1])
            kls.append(mx.mean(metrics.token_kl(r, logits[:, prefill - 1 : -1])).item())
            nlls.append(mx.mean(metrics.token_nll(logits[:, prefill - 1 : -1], toks[i : i + 1, prefill:])).item())
        out[name] = dict(kl=sum(kls) / len(kls), ppl=float(mx.exp(mx.array(sum(nlls) / len(nlls))).item()), seconds=time.perf_counter() - t0)
        print(f"  {name}: KL {out[name]['kl']:.4f} ppl {out[name]['ppl']:.2f}", flush=True)
    return out


def needle(model, tok, bits_list, filler_tokens=400, depths=(0.1, 0.5, 0.9)):
    import mlx.core as mx
    import mlx_lm

    from optiq.calibration import wikitext_split

    text = wikitext_split(WIKITEXT.read_text())[1] if WIKITEXT.exists() else "The river flows past the old mill. " * 400
    filler = tok.encode(text, add_special_tokens=False)[:filler_tokens]
    fact = tok.encode(" The secret number is 4172. ", add_special_tokens=False)
    results = {}
    for name, mode, bits in configs(bits_list):
        hits = []
        for depth in depths:
            cut = int(len(filler) * depth)
            context = tok.decode(filler[:cut] + fact + filler[cut:])
            messages = [{"role": "user", "content": context + "\n\nWhat is the secret number? Answer with the number only."}]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            answer = mlx_lm.generate(model, tok, prompt, max_tokens=8, prompt_cache=make_caches(model, mode, bits))
            hits.append("4172" in answer)
        results[name] = dict(hits=sum(hits), of=len(hits))
        print(f"  needle {name}: {sum(hits)}/{len(hits)}", flush=True)
        mx.clear_cache()
    return results


def decode_speed(model, tok, contexts, bits_list, steps=8):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    # Decode cost does not depend on what the cache holds, only on its shape:
    # fill every full-attention layer with random keys and values of the
    # model's own shapes instead of a prefill that takes minutes per context
    # on this CPU (its fp32 attention over 16k keys is the slow part).
    probe = make_prompt_cache(model)
    model(mx.array([[1, 2]]), cache=probe)
    shapes = {i: (c.keys.shape[1], c.keys.shape[3], c.values.shape[3]) for i, c in enumerate(probe) if type(c) is KVCache}
    ids = held_out_tokens(tok, 1, 64)[0].tolist()
    rows = []
    for ctx in contexts:
        mx.random.seed(ctx)
        kv = {i: (mx.random.normal((1, h, ctx, dk)), mx.random.normal((1, h, ctx, dv))) for i, (h, dk, dv) in shapes.items()}
        for name, mode, bits in configs(bits_list):
            caches = make_caches(model, mode, bits)
            for i, (k, v) in kv.items():
                caches[i].update_and_fetch(k, v)
            mx.eval([c.state for c in caches])
            nbytes = sum(c.nbytes for c in caches)
            y = mx.array([[ids[-1]]])
            mx.eval(model(y, cache=caches))  # warm-up step
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = model(y, cache=caches)
                y = mx.argmax(logits[:, -1:], axis=-1)
                mx.eval(y)
            rows.append(dict(context=ctx, method=name, tok_per_s=steps / (time.perf_counter() - t0), kv_bytes=nbytes))
            print(f"  {ctx} {name}: {rows[-1]['tok_per_s']:.2f} tok/s, KV {nbytes / 2**20:.1f} MiB", flush=True)
            del caches
            mx.clear_cache()
    return rows


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
        result["quality"] = quality(model, tok, windows_, args.prefill, bits_list)
        save()
    if "needle" not in skip:
        print("\nneedle:")
        result["needle"] = needle(model, tok, bits_list, args.needle_tokens)
        save()
    if "speed" not in skip:
        print("\ndecode speed:")
        result["speed"] = decode_speed(model, tok, [int(c) for c in args.contexts.split(",")], bits_list, args.steps)
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
