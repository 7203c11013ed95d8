"""Server benchmark: optiq serve against mlx_lm.server on the same model and
machine, in one run: requests/s, generated tokens/s, median and p95 time to
first token at several concurrency levels, and errors.

    python benchmarks/server.py                  # SmolLM2-135M-Instruct
    python benchmarks/server.py --model PATH --concurrency 1,4,8 --requests 16
    python benchmarks/server.py --draft-model DRAFT --servers "optiq serve,optiq serve --draft-model"

Each server runs as its own process (started here, stopped at the end) and
is driven over HTTP by the `openai` client with streaming, greedy sampling
and the same prompts. The head-to-head rows serve the same fp32 model folder
(made here with mlx_lm.convert --dtype float32): on this CPU mlx_lm.server
with an fp16 or 4-bit model computes in fp16, where one 4-bit layer's
single-row matmul alone takes ~29 ms (optiq/cpu.py), which makes a run take
hours. A last row serves the uniform 4-bit model (mlx_lm.convert -q) with
optiq serve, whose CPU path runs it in fp32 with packed weights. With
--draft-model, rows for speculative decoding join (both servers with the
draft; optiq's rows report the draft acceptance from /health). GPU numbers
for speculative decoding come from benchmarks/gpu.py --sections speculative.
Writes JSON to benchmarks/results/.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, drive_requests  # also puts the repo on sys.path
FALLBACK_PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse.",
    "List three uses of a paper clip.",
    "What is the capital of France, and why is it famous?",
    "Describe how a bicycle works.",
    "Give me a recipe for pancakes.",
    "Why do cats purr?",
    "Summarise the plot of Romeo and Juliet.",
]


def prompts(n: int) -> list:
    """Chat prompts: WikiText-2 paragraphs to continue when ../shared is present."""
    if WIKITEXT.exists():
        paras = [p.strip() for p in WIKITEXT.read_text().split("\n") if len(p.strip()) > 200 and not p.strip().startswith("=")]
        return [f"Continue this text:\n{p[:400]}" for p in paras[:n]]
    return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(n)]


def prepared(kind: str) -> str:
    """SmolLM2-135M-Instruct as fp32 ("fp32") or uniform 4-bit g64 ("4bit"), made once with mlx_lm.convert."""
    from optiq.source import cache_dir, resolve_model

    out = cache_dir() / "bench" / f"SmolLM2-135M-Instruct-{kind}"
    if not (out / "config.json").exists():
        from mlx_lm import convert

        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "4bit":
            convert(str(resolve_model(None)), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64)
        else:
            convert(str(resolve_model(None)), mlx_path=str(out), dtype="float32")
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, log):
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    import urllib.request

    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited; see {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not start in time")


def one_request(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    ttft, tokens, usage = None, 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True},
    )
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for c in event.choices:
            if c.delta.content:
                ttft = ttft or time.perf_counter() - t0
                tokens += 1
    n = usage.completion_tokens if usage is not None else tokens
    return ttft or time.perf_counter() - t0, n, time.perf_counter() - t0


def drive(url, model, work, concurrency, max_tokens):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    return drive_requests(lambda prompt: one_request(client, model, prompt, max_tokens), work, concurrency)


def ceiling(model, work, concurrency, max_tokens):
    """mlx-lm's BatchGenerator alone, in this process, no HTTP: the most any
    server built on it can reach (tokens/s over the decode of a full batch)."""
    import mlx_lm
    from mlx_lm.generate import BatchGenerator

    from optiq.http.server import chat_tokens

    model_, tok = mlx_lm.load(model)
    prompts = [chat_tokens(tok, [{"role": "user", "content": p}]) for p in work[:concurrency]]
    gen = BatchGenerator(model_, completion_batch_size=concurrency, prefill_batch_size=min(8, concurrency))
    gen.insert(prompts, max_tokens=[max_tokens] * concurrency)
    n, t0 = 0, None
    while n < max_tokens * concurrency:
        _, responses = gen.next()
        if responses and t0 is None:
            t0 = time.perf_counter()
        n += len(responses)
        if t0 is not None and not responses:
            break
    gen.close()
    return dict(server="BatchGenerator alone (no HTTP)", concurrency=concurrency, requests=concurrency, errors=0,
                error_messages=[], wall_s=time.perf_counter() - t0, req_per_s=float("nan"),
                tok_per_s=n / (time.perf_counter() - t0), tokens=n, ttft_median_s=float("nan"), ttft_p95_s=float("nan"))


def forward_ceiling(model, work, concurrency, max_tokens):
    """mlx-lm's model forward alone at this batch size: one greedy decode step
    per call on a plain KV cache (no padding, sampling or bookkeeping). Any
    server running this model code decodes at most this fast (decode only:
    prefill, HTTP and the client come on top)."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    from optiq.http.server import chat_tokens

    model_, tok = mlx_lm.load(model)
    prompts = [chat_tokens(tok, [{"role": "user", "content": p}]) for p in work[:concurrency]]
    width = min(len(p) for p in prompts)  # same-length prompts: no padding to mask
    cache = make_prompt_cache(model_)
    logits = model_(mx.array([p[-width:] for p in prompts]), cache=cache)
    y = mx.argmax(logits[:, -1:], axis=-1)
    mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(max_tokens):
        y = mx.argmax(model_(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    wall = time.perf_counter() - t0
    n = max_tokens * concurrency
    return dict(server="model forward alone (no sampling, no HTTP)", concurrency=concurrency, requests=concurrency, errors=0,
                error_messages=[], wall_s=wall, req_per_s=float("nan"), tok_per_s=n / wall, tokens=n,
                ttft_median_s=float("nan"), ttft_p95_s=float("nan"))


def health(port) -> dict:
    import urllib.request

    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
    except (ValueError, OSError):  # mlx_lm.server's /health may not be JSON
        return {}


def servers(model, quantized, draft=None, num_draft=3):
    py = sys.executable
    rows = {
        "mlx_lm.server": lambda port: [py, "-m", "mlx_lm", "server", "--model", model, "--port", str(port), "--log-level", "WARNING"],
        "optiq serve": lambda port: [py, "-m", "optiq.http", "--model", model, "--port", str(port)],
    }
    if draft:
        rows["mlx_lm.server --draft-model"] = lambda port: [py, "-m", "mlx_lm", "server", "--model", model, "--port", str(port), "--log-level",
                                                            "WARNING", "--draft-model", draft, "--num-draft-tokens", str(num_draft)]
        rows["optiq serve --draft-model"] = lambda port: [py, "-m", "optiq.http", "--model", model, "--port", str(port),
                                                          "--draft-model", draft, "--num-draft-tokens", str(num_draft)]
    if quantized:
        rows["optiq serve, 4-bit model"] = lambda port: [py, "-m", "optiq.http", "--model", quantized, "--port", str(port)]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="served by every row (default: SmolLM2 in fp32)")
    p.add_argument("--quantized-model", default=None, help="for the last row (default: SmolLM2 4-bit; 'none' to skip)")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--servers", default=None, help="comma-separated subset of the rows")
    p.add_argument("--draft-model", default=None, help="adds speculative rows with this draft ('4bit': SmolLM2 4-bit)")
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "server.json"))
    args = p.parse_args()

    from optiq.blas import ensure_fast_blas

    ensure_fast_blas()  # children inherit LD_PRELOAD
    model = args.model or prepared("fp32")
    quantized = None if args.quantized_model == "none" else (args.quantized_model or (prepared("4bit") if not args.model else None))
    levels = [int(c) for c in args.concurrency.split(",")]
    work = prompts(args.requests)
    draft = prepared("4bit") if args.draft_model == "4bit" else args.draft_model
    table = servers(model, quantized, draft, args.num_draft_tokens)
    names = args.servers.split(",") if args.servers else list(table)
    rows = []
    for name in names:
        port = free_port()
        log = open(RESULTS / f"server-{name.replace(' ', '_')}.log", "w")
        proc = start(table[name](port), port, log)
        try:
            served = "default_model"  # mlx_lm.server's name for --model; optiq accepts it too
            drive(f"http://127.0.0.1:{port}", served, work[:2], 1, 8)  # warm up
            for c in levels:
                before = health(port)
                row = dict(server=name, **drive(f"http://127.0.0.1:{port}", served, work, c, args.max_tokens))
                after = health(port)
                if "draft_tokens_proposed" in after:
                    row["draft_acceptance"] = (after["draft_tokens_accepted"] - before["draft_tokens_accepted"]) / max(
                        after["draft_tokens_proposed"] - before["draft_tokens_proposed"], 1)
                rows.append(row)
                print(f"{name:28s} c={c}: {row['req_per_s']:.2f} req/s {row['tok_per_s']:.1f} tok/s "
                      f"TTFT p50 {row['ttft_median_s']:.2f}s p95 {row['ttft_p95_s']:.2f}s errors {row['errors']}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()

    for c in levels:
        for bound in (ceiling, forward_ceiling):
            rows.append(bound(model, work, c, args.max_tokens))
            print(f"{rows[-1]['server']} c={c}: {rows[-1]['tok_per_s']:.1f} tok/s", flush=True)

    print(f"\nmodel: {model} (last row: {quantized}); {args.requests} chat requests per level, max_tokens {args.max_tokens}, greedy, streaming\n")
    print("| server | concurrency | req/s | tok/s | TTFT p50 (s) | TTFT p95 (s) | draft acceptance | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        accept = f"{r['draft_acceptance']:.2f}" if "draft_acceptance" in r else "-"
        print(f"| {r['server']} | {r['concurrency']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | {r['ttft_median_s']:.2f} | {r['ttft_p95_s']:.2f} | {accept} | {r['errors']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(model=model, quantized_model=quantized, args=vars(args), rows=rows), indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
