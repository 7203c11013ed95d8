"""optiq on a GPU (MLX-CUDA), at real model shapes, side by side with mlx-lm
in the same run. Random-weight models of real shapes are built here (real
weights cannot travel to the lent machine); speed and memory do not depend
on the weights' values.

    python benchmarks/gpu.py                       # every section
    python benchmarks/gpu.py --sections kv --contexts 8192,32768

Sections (each writes benchmarks/results/gpu-SECTION.json, or under --out):
- kv: Llama-3-8B-shaped model with 4-bit weights, one decode step at
  8k-128k cached tokens: mlx-lm's fp16 KVCache and QuantizedKVCache
  against optiq's caches (uniform 8 and 4 bits, a measured ~4.5-bit plan),
  optiq's with and without the fused decode kernel; ms per token, cache bytes.
- serve: Llama-3.2-1B-shaped bf16 model, streamed greedy chats of 64 tokens
  at concurrency 1, 8 and 32 against optiq serve (also with an 8-bit KV
  plan, batched) and mlx_lm.server: tok/s, median time to first token,
  errors; the engine's own step timings.
- convert: Llama-3-8B-shaped bf16 model: the default `optiq convert`
  (GPTQ) and round-to-nearest, time and peak memory, against
  `mlx_lm.convert -q`.
- moe: Qwen3-30B-A3B-shaped bf16 mixture-of-experts model (128 experts of
  768, 8 per token, hidden 2048) with `--moe-layers` of its 48 blocks (the
  whole model is 61 GB in bf16, more than the machine's disk holds next to
  its output): the default `optiq convert` against `mlx_lm.convert -q`,
  time, peak memory, tokens per expert.
- speculative: Llama-3-8B-shaped bf16 model, streamed greedy chats at
  concurrency 1 and 4, plain and with a draft model, optiq serve against
  mlx_lm.server --draft-model: tok/s, draft acceptance; and optiq serve
  with every request under a JSON-schema grammar (structured output's
  cost). A random model's next token is noise no draft predicts (its own
  4-bit copy agreed on 4% of proposals: results/gpu-speculative-random.json),
  so the target here has its blocks' output projections (o_proj, down_proj)
  zeroed: every block still computes at full cost, but the next token then
  depends on the current one only, and a draft made of the target's first 4
  blocks with its embedding and head agrees on every token. That measures
  what the implementations deliver when the draft agrees, a ceiling; a real
  pair's acceptance (0.6-0.8 is typical) sits between the two runs.
- formats: Llama-3-8B-shaped model with every Linear in one storage format
  (affine 4-bit g64 and g128, mxfp4, nvfp4, mxfp8, affine 8-bit) and a
  4k-token bf16 KV cache: decode ms per token, weight bytes; what a plan
  that mixes formats costs in speed on this GPU.
- plans: a written model's per-layer plan (`--plan`: its folder or
  config.json; the default is the plan optiq wrote for
  Qwen2.5-Coder-1.5B-Instruct) on random weights at its own shape and
  carried to Llama-3-8B's by role and depth, against mlx-lm's uniform 4-bit
  g64, 4-bit g128 and mixed_4_6: decode ms/token at batch 1 and 16 after
  1024 cached tokens, prefill tok/s; `--plan-uniform 4:64,8:128,...` times
  uniform formats instead; `--plan-baselines 4bit` keeps only uniform 4-bit
  g64; `--fold-rows` times each quantized row again as optiq serve runs it
  (optiq/cuda.py). `--plot-plans JSON...` draws repeated runs.
- kernels: optiq.speed's decode matmul time per format at each `--plan`
  model's layer shapes and Llama-3-8B's (`--kernel-batch N` rows, default
  1; `--kernel-rows tokens`: a (batch, 1, in) input, as stock mlx-lm feeds
  it, instead of optiq serve's folded rows), written as KernelTimes JSONs (`kernel-times-NAME.json`) that `optiq convert --no-slower-than 4@64
  --kernel-times FILE` plans with elsewhere.
- replan: the first `--plan` model planned again from its sensitivity table
  (`--sensitivity`) under `--no-slower-than --replan-limit` with kernel times
  measured here at `--kernel-batch` rows, written to results/plans/ and timed
  as the plans section times (beside uniform 4-bit and the first `--plan`).
"""

import argparse
import contextlib
import http.client
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
from mlx_lm.utils import save_config, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import draw_png, drive_requests, markdown_table, weight_bits  # noqa: E402

from optiq import device, gptq  # noqa: E402
from optiq.calibration import sample_tokens  # noqa: E402
from optiq.cuda import fold_rows  # noqa: E402
from optiq.errors import OptiqError  # noqa: E402
from optiq.io import copy_tokenizer_files  # noqa: E402
from optiq.kv import kernels, make_kv_cache, measure_kv, plan_kv  # noqa: E402
from optiq.kv.sensitivity import cache_layers  # noqa: E402
from optiq.pipeline import ConvertConfig, Report, convert  # noqa: E402
from optiq.plan import plan_bits  # noqa: E402
from optiq.quantize import plan_quantization  # noqa: E402
from optiq.records import Candidate, candidate_from_key, load_sensitivity, sort_candidates  # noqa: E402
from optiq.speed import TimeBudget, layer_shapes, measure_kernel_times, plan_seconds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (rope scaling left out: speed only)
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json (num_hidden_layers: --moe-layers of 48)
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960,
                          rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
TEXT = ("The history of the city begins with a small settlement by the river. Traders came for salt and stayed "
        "for the fish; by the third century the market had a wall, a temple and a road to the coast. ") * 50


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# -- models ---------------------------------------------------------------------------


def tokenizer_files(folder: Path, vocab: int):
    """A byte-level BPE tokenizer trained here, padded with added tokens to
    the model's vocabulary, with a chat template: what mlx-lm and both
    servers need, none of it downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|end|>", "<|start|>"]
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens([f"tok{i}" for i in range(vocab - tok.get_vocab_size())])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end|>", "chat_template": CHAT_TEMPLATE,
    }))


def build(name: str, folder: Path, bits: int | None = None, **overrides) -> Path:
    """A random-weight model of `name`'s shape in bf16 (or `bits`-bit weights, group 64), saved as mlx-lm saves one."""
    if (folder / "config.json").exists():
        return folder
    t0 = time.time()
    build_from_config({"model_type": "llama", **SHAPES[name], **overrides}, folder, bits)
    log(f"built {name} {'bf16' if not bits else f'{bits}-bit'} in {time.time() - t0:.0f}s: {folder}")
    return folder


def random_model(config: dict) -> nn.Module:
    """mlx-lm's own model class for `config`, random weights in bf16, in memory."""
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(0)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    return model


def build_from_config(config: dict, folder: Path, bits: int | None = None, tokenizer_dir: Path | None = None) -> Path:
    """A random-weight model of `config` in bf16 (or `bits`-bit, group 64) in
    `folder`, with the tokenizer files of `tokenizer_dir` or one trained here."""
    config = dict(config, torch_dtype="bfloat16")
    model = random_model(config)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
    folder.mkdir(parents=True, exist_ok=True)
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, config_path=folder / "config.json")
    if tokenizer_dir is None:
        tokenizer_files(folder, config["vocab_size"])
    else:
        copy_tokenizer_files(tokenizer_dir, folder)
    return folder


# -- KV decode --------------------------------------------------------------------------


def filled(caches, kv):
    for i, (k, v) in kv.items():
        caches[i].update_and_fetch(k, v)
    return caches


def kv_rows(model, plan):
    def mlx_fp16(m):
        return make_prompt_cache(m)

    def mlx_quantized(bits):
        return lambda m: [QuantizedKVCache(64, bits) if type(c) is KVCache else c for c in make_prompt_cache(m)]

    def optiq(entries):
        return lambda m: make_kv_cache(m, entries)

    uniform = lambda b: [dict(layer_idx=i, bits=b, group_size=64) for i, _ in cache_layers(model)]  # noqa: E731
    return [
        ("mlx-lm KVCache (bf16)", mlx_fp16, None),
        ("mlx-lm QuantizedKVCache 8-bit", mlx_quantized(8), None),
        ("mlx-lm QuantizedKVCache 4-bit", mlx_quantized(4), None),
        ("optiq uniform 8-bit", optiq(uniform(8)), True),
        ("optiq uniform 4-bit", optiq(uniform(4)), True),
        (f"optiq plan {plan.average_bits:.2f} bits", optiq(list(plan.layers)), True),
        ("optiq uniform 4-bit, no kernel (dequantized)", optiq(uniform(4)), False),
    ]


def attention_variants(args) -> list:
    """The decode kernel alone on one Llama-3-8B layer at the longest context
    (32 query heads over 8 KV heads, 4-bit codes), per launch variant, against
    MLX's own fused attention over bf16 keys and values: GB/s read."""
    from optiq.kv.affine_cache import quantize_kv

    T, rows = max(args.contexts), []
    mx.random.seed(1)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    k, v = (mx.random.normal((1, 8, T, 128)).astype(mx.bfloat16) for _ in range(2))
    qk, qv = quantize_kv(k, 64, 4), quantize_kv(v, 64, 4)
    mx.eval(q, k, v, qk, qv)

    def timed(fn, reps=20):
        mx.eval(fn())
        mx.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        return (time.perf_counter() - t) / reps

    sdpa = timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=128 ** -0.5))
    rows.append(dict(variant="mlx sdpa over bf16", ms=sdpa * 1e3, gb_s=(k.nbytes + v.nbytes) / sdpa / 1e9))
    codes_bytes = sum(a.nbytes for a in (*qk, *qv))
    for unroll, epl in ((1, 8), (2, 8), (4, 8), (1, 16), (2, 16)):
        kernels.UNROLL, kernels.EPL = unroll, epl
        s = timed(lambda: kernels.decode_attention(q, qk, qv, 128 ** -0.5, None, 64, 4, 4))
        rows.append(dict(variant=f"optiq kernel U={unroll} EPL={epl}", unroll=unroll, epl=epl, ms=s * 1e3, gb_s=codes_bytes / s / 1e9))
    best = min((r for r in rows if "unroll" in r), key=lambda r: r["ms"])
    kernels.UNROLL, kernels.EPL = best["unroll"], best["epl"]
    for r in rows:
        log(f"  attention @{T}: {r['variant']:28s} {r['ms']:.3f} ms  {r['gb_s']:.0f} GB/s")
    return rows


def step_times(model, caches, steps: int, batch: int = 1) -> dict:
    """ms per decode step: synchronous (build, run, wait), pipelined (the next
    step's graph built while the GPU runs this one, as mlx-lm's generate
    does), and the host's graph building alone."""
    y = mx.full((batch, 1), 5, dtype=mx.int32)
    t = time.perf_counter()
    logits = model(y, cache=caches)
    build = time.perf_counter() - t
    mx.eval(logits)
    t = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(y, cache=caches))
    sync = (time.perf_counter() - t) / steps
    nxt = mx.argmax(model(y, cache=caches)[:, -1:], axis=-1)
    mx.async_eval(nxt)
    t = time.perf_counter()
    for _ in range(steps):
        cur = nxt
        nxt = mx.argmax(model(cur, cache=caches)[:, -1:], axis=-1)
        mx.async_eval(nxt)
        cur.tolist()
    nxt.tolist()
    return dict(ms_per_token=sync * 1e3, pipelined_ms_per_token=(time.perf_counter() - t) / steps * 1e3, host_build_ms=build * 1e3)


def kv_section(args, work: Path) -> dict:
    variants = attention_variants(args)
    folder = build("llama-3-8b", work / "llama-3-8b-4bit", bits=4)
    from mlx_lm import load

    model, tok = load(str(folder))
    t0 = time.time()
    calib = sample_tokens(model, tok, 2, 512, seed=0)
    candidates = [Candidate(b, 64) for b in (3, 4, 6, 8)] + [Candidate(8, 64, v_bits=4), Candidate(4, 64, v_bits=8)]
    table = measure_kv(model, calib, candidates)
    plan = plan_kv(table, args.kv_target, n_layers=len(model.layers))
    log(f"KV plan measured in {time.time() - t0:.0f}s: {plan.average_bits:.3f} bits; "
        + " ".join(f"{e.layer_idx}:{e.bits}{'/' + str(e.v_bits) if e.v_bits else ''}" for e in plan.layers))
    probe = make_prompt_cache(model)
    model(mx.array([[1, 2]]), cache=probe)
    shapes = {i: (c.keys.shape[1], c.keys.shape[3]) for i, c in enumerate(probe)}
    rows, out = kv_rows(model, plan), []
    for ctx in args.contexts:
        mx.random.seed(ctx)
        kv = {i: (mx.random.normal((1, h, ctx, d)).astype(mx.bfloat16), mx.random.normal((1, h, ctx, d)).astype(mx.bfloat16)) for i, (h, d) in shapes.items()}
        mx.eval(kv)
        for name, make, kernel in rows:
            kernels.ENABLED = kernel is not False
            row = dict(context=ctx, method=name)
            try:
                caches = filled(make(model), kv)
                y = mx.array([[5]])
                for _ in range(3):  # warm-up: compiles this shape's kernels
                    mx.eval(model(y, cache=caches))
                mx.synchronize()
                row.update(step_times(model, caches, args.steps), kv_bytes=sum(c.nbytes for c in caches))
            except Exception as exc:  # mlx-lm's quantized caches fail on MLX-CUDA: the row says how
                row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            finally:
                kernels.ENABLED = True
                caches = None
                mx.clear_cache()
            out.append(row)
            log(f"  {ctx:>6} {name:44s} " + (f"{row['ms_per_token']:.2f} ms/token ({row['pipelined_ms_per_token']:.2f} pipelined, host {row['host_build_ms']:.2f}), KV {row['kv_bytes'] / 2**30:.2f} GiB" if "ms_per_token" in row else row["error"]))
        del kv
        mx.clear_cache()
    base = {r["context"]: r for r in out if r["method"].startswith("mlx-lm KVCache")}
    for r in out:
        if "ms_per_token" in r and "ms_per_token" in base[r["context"]]:
            r["speedup_vs_bf16_kv"] = base[r["context"]]["ms_per_token"] / r["ms_per_token"]
            r["pipelined_speedup_vs_bf16_kv"] = base[r["context"]]["pipelined_ms_per_token"] / r["pipelined_ms_per_token"]
            r["bytes_vs_bf16_kv"] = r["kv_bytes"] / base[r["context"]]["kv_bytes"]
    return dict(model="llama-3-8b shape, 4-bit weights (random)", plan=plan.to_dict(), attention=variants,
                kernel=dict(unroll=kernels.UNROLL, epl=kernels.EPL), rows=out)


def kv_table(result) -> str:
    contexts = sorted({r["context"] for r in result["rows"]})
    lines = ["| KV cache | " + " | ".join(f"@{c // 1024}k: ms/token (x bf16), pipelined" for c in contexts) + " | bytes vs bf16 |",
             "|---|" + "---|" * (len(contexts) + 1)]
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        cells = []
        for c in contexts:
            r = next(x for x in result["rows"] if x["method"] == method and x["context"] == c)
            cells.append(f"{r['ms_per_token']:.2f} ({r.get('speedup_vs_bf16_kv', 1):.2f}x), {r['pipelined_ms_per_token']:.2f} ({r.get('pipelined_speedup_vs_bf16_kv', 1):.2f}x)"
                         if "ms_per_token" in r else "fails")
        last = next(x for x in result["rows"] if x["method"] == method and x["context"] == contexts[-1])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {last.get('bytes_vs_bf16_kv', float('nan')):.3f} |")
    lines += ["", "| attention alone, one layer @" + f"{contexts[-1] // 1024}k | ms | GB/s |", "|---|---|---|"]
    lines += [f"| {a['variant']} | {a['ms']:.3f} | {a['gb_s']:.0f} |" for a in result["attention"]]
    return "\n".join(lines)


# -- serving ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, log_path, limit=600):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {Path(log_path).read_text()[-2000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError("server did not start")


def chat(port, prompt, max_tokens, extra=None):
    """One streamed greedy chat: (seconds to the first content, content chunks, seconds)."""
    body = json.dumps({"model": "default_model", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, tokens, usage = None, 0, None
    for line in r:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        usage = event.get("usage") or usage
        for ch in event.get("choices", []):
            if ch.get("delta", {}).get("content"):
                first = first or time.perf_counter() - t0
                tokens += 1
    c.close()
    n = usage["completion_tokens"] if usage else tokens
    return first or time.perf_counter() - t0, n, time.perf_counter() - t0


def drive(port, prompts, concurrency, max_tokens, extra=None) -> dict:
    return drive_requests(lambda prompt: chat(port, prompt, max_tokens, extra), prompts, concurrency)


def health(port) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def serve_section(args, work: Path) -> dict:
    folder = build("llama-3.2-1b", work / "llama-3.2-1b-bf16")
    py = sys.executable
    servers = {
        "mlx_lm.server": lambda port: [py, "-m", "mlx_lm", "server", "--model", str(folder), "--port", str(port), "--log-level", "WARNING"],
        "optiq serve": lambda port: [py, "-m", "optiq.http", "--model", str(folder), "--port", str(port)],
        "optiq serve, GIL switch 1 ms": lambda port: [py, "-m", "optiq.http", "--model", str(folder), "--port", str(port)],
        "optiq serve, 8-bit KV (batched)": lambda port: [py, "-m", "optiq.http", "--model", str(folder), "--port", str(port), "--kv-bits", "8"],
    }
    env_of = {"optiq serve": {"OPTIQ_PROFILE": str(Path(args.out) / "gpu-serve-profile.txt")},
              "optiq serve, GIL switch 1 ms": {"OPTIQ_SWITCH_INTERVAL": "0.001"}}
    return dict(model="llama-3.2-1b shape, bf16 (random)", max_tokens=args.max_tokens,
                rows=run_servers(servers, args.servers or list(servers), args.concurrency, args.max_tokens, work, env_of))


def run_servers(servers, names, levels, max_tokens, work, env_of=None, extra_of=None) -> list:
    """Each server in turn on a free port: a warm-up at every level, then the
    timed levels; optiq's rows carry the engine's counters over the level."""
    prompts = [f"Question {i}: continue the history of the city by the river in a few sentences." for i in range(max(levels) * 2)]
    rows = []
    for name in names:
        extra = (extra_of or {}).get(name)
        port = free_port()
        log_path = work / f"serve-{name.split()[0]}-{len(rows)}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(servers[name](port), stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **(env_of or {}).get(name, {})))
        try:
            try:
                wait_ready(proc, port, log_path)
            except RuntimeError as exc:  # a server that cannot start is a row that says why
                rows.append(dict(server=name, error=str(exc)[-500:]))
                log(f"  {name}: {rows[-1]['error']}")
                continue
            for c in levels:  # warm-up at every level: each batch size compiles its kernels once
                drive(port, prompts[:c], c, 8, extra)
            for c in levels:
                before = health(port) if name.startswith("optiq") else None
                row = dict(server=name, **drive(port, prompts[: max(2 * c, 16)], c, max_tokens, extra))
                if before is not None:
                    after = health(port)
                    row["engine"] = {k: after[k] - before[k] for k in ("steps", "step_seconds", "token_seconds", "generated_tokens",
                                                                       "draft_tokens_accepted", "draft_tokens_proposed") if k in after}
                rows.append(row)
                engine = row.get("engine", {})
                log(f"  {name:34s} c={c:<3} {row['tok_per_s']:8.1f} tok/s  TTFT p50 {row['ttft_median_s']:.3f}s  errors {row['errors']} {row['error_messages'][:1]}"
                    + (f"  engine: {engine['steps']} steps, {engine['step_seconds']:.2f}s in steps, {engine['token_seconds']:.2f}s per-token" if engine else "")
                    + (f"  draft accepted {engine['draft_tokens_accepted']}/{engine['draft_tokens_proposed']}" if "draft_tokens_proposed" in engine else ""))
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            proc.kill()
    return rows


def predictable_pair(work: Path, draft_layers: int = 4) -> tuple:
    """(target, draft): the Llama-3-8B shape with every block's output
    projections zeroed (the next token a function of the current one), and
    the target's first `draft_layers` blocks with its embedding and head."""
    target, draft = work / "llama-3-8b-predictable", work / f"llama-3-8b-predictable-{draft_layers}l"
    if (draft / "config.json").exists():
        return target, draft
    source = build("llama-3-8b", work / "llama-3-8b-bf16")
    import mlx_lm

    model, _ = mlx_lm.load(str(source))
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    config = json.loads((source / "config.json").read_text())
    for folder, n in ((target, len(model.model.layers)), (draft, draft_layers)):
        model.model.layers = model.model.layers[:n]
        model.args.num_hidden_layers = n
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, model)
        save_config(dict(config, num_hidden_layers=n), config_path=folder / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, folder / name)
    return target, draft


def speculative_section(args, work: Path) -> dict:
    target, draft = predictable_pair(work)
    py = sys.executable
    n = str(args.num_draft_tokens)
    servers = {
        "mlx_lm.server": lambda port: [py, "-m", "mlx_lm", "server", "--model", str(target), "--port", str(port), "--log-level", "WARNING"],
        "mlx_lm.server --draft-model": lambda port: [py, "-m", "mlx_lm", "server", "--model", str(target), "--port", str(port), "--log-level",
                                                     "WARNING", "--draft-model", str(draft), "--num-draft-tokens", n],
        "optiq serve": lambda port: [py, "-m", "optiq.http", "--model", str(target), "--port", str(port)],
        "optiq serve --draft-model": lambda port: [py, "-m", "optiq.http", "--model", str(target), "--port", str(port),
                                                   "--draft-model", str(draft), "--num-draft-tokens", n],
        "optiq serve, JSON-schema output": lambda port: [py, "-m", "optiq.http", "--model", str(target), "--port", str(port)],
    }
    schema = {"type": "object", "properties": {"story": {"type": "string"}, "year": {"type": "integer"}}, "required": ["story", "year"]}
    extra_of = {"optiq serve, JSON-schema output": {"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}}
    names = args.servers if args.servers and all(name in servers for name in args.servers) else list(servers)
    levels = [c for c in args.concurrency if c <= 8] or [1]
    return dict(model="llama-3-8b shape, bf16, output projections zeroed; draft: its first 4 blocks", max_tokens=args.max_tokens,
                num_draft_tokens=args.num_draft_tokens, rows=run_servers(servers, names, levels, args.max_tokens, work, extra_of=extra_of))


def formats_section(args, work: Path) -> dict:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    source = build("llama-3-8b", work / "llama-3-8b-bf16")
    rows = []
    for mode, bits, group in (("affine", 4, 64), ("affine", 4, 128), ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32), ("affine", 8, 64)):
        model, _ = load(str(source))
        nn.quantize(model, group_size=group, bits=bits, mode=mode, class_predicate=lambda p, m: isinstance(m, nn.Linear))
        mx.eval(model.parameters())
        caches = make_prompt_cache(model)
        mx.eval(model(mx.zeros((1, 4096), dtype=mx.int32), cache=caches))
        step_times(model, caches, 8)  # compile this format's kernels
        times = step_times(model, caches, args.steps * 3)
        weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        rows.append(dict(format=f"{mode} {bits}-bit g{group}", weight_gib=weight_bytes / 2**30, **times))
        log(f"  {rows[-1]['format']:22s} {times['pipelined_ms_per_token']:.2f} ms/token  {rows[-1]['weight_gib']:.2f} GiB")
        del model, caches
        mx.clear_cache()
    return dict(model="llama-3-8b shape (random), every Linear in one format, 4k-token bf16 KV", rows=rows)


def formats_table(result) -> str:
    return markdown_table(["format", "decode ms/token", "weights (GiB)"],
                          [[r["format"], f"{r['pipelined_ms_per_token']:.2f}", f"{r['weight_gib']:.2f}"] for r in result["rows"]])


# -- plans: what a mixed plan costs in speed -------------------------------------------


def plan_formats(config: dict) -> dict:
    """A written model's per-layer formats from its config's `quantization`
    (mlx-lm's format): {path: {bits, group_size, mode} or False}, the
    model-wide default under None."""
    quant = dict(config["quantization"])
    default = {k: quant.pop(k) for k in ("group_size", "bits", "mode") if k in quant}
    return {None: {"mode": "affine", **default}, **quant}


def block_index(path: str):
    """(index, path with the index as {}) of a block's layer, else (None, path)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[:i] + ["{}"] + parts[i + 1:])
    return None, path


def transplanted(formats: dict, source_blocks: int, target_blocks: int) -> dict:
    """A plan carried to a model of another depth: block i's layer takes the
    format the same role has at the same relative depth in the source
    (block round(i (S-1) / (T-1))); other layers keep theirs by name."""
    by_role = {}
    for path, fmt in formats.items():
        index, role = block_index(path) if path else (None, path)
        by_role[(index, role)] = fmt
    out = {None: formats[None]}
    for (index, role), fmt in by_role.items():
        if index is None:
            out[role] = fmt
    for i in range(target_blocks):
        j = round(i * (source_blocks - 1) / max(1, target_blocks - 1))
        for (index, role), fmt in by_role.items():
            if index == j:
                out[role.format(i)] = fmt
    return out


def quantize_as(model: nn.Module, formats) -> nn.Module:
    """Quantize in place as mlx-lm's loader does with a written per-layer
    config; `formats` a plan_formats dict or a predicate (mlx-lm's mixed recipes)."""
    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if callable(formats):
            return formats(path, module)
        return formats.get(path, formats[None])

    nn.quantize(model, class_predicate=predicate)
    mx.eval(model.parameters())
    return model


def speed_row(model, context: int, batches, prefill: int, steps: int) -> dict:
    """Decode ms per token after `context` cached tokens at each batch size
    (pipelined, as mlx-lm's generate runs), and prefill tokens/s over one
    `prefill`-token prompt; each measured after one untimed run (the
    kernels' first use compiles them)."""
    row = {}
    for batch in batches:
        caches = make_prompt_cache(model)
        mx.eval(model(mx.zeros((batch, context), dtype=mx.int32), cache=caches))
        step_times(model, caches, 4, batch)
        times = step_times(model, caches, steps, batch)
        row[f"decode_b{batch}_ms"] = times["pipelined_ms_per_token"]
        row[f"decode_b{batch}_tok_s"] = batch * 1e3 / times["pipelined_ms_per_token"]
        del caches
    prompt = mx.zeros((1, prefill), dtype=mx.int32)
    seconds = []
    for _ in range(3):
        caches = make_prompt_cache(model)
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(model(prompt, cache=caches))
        seconds.append(time.perf_counter() - t)
        del caches
    row["prefill_tok_s"] = prefill / min(seconds[1:])
    return row


def baseline_rows(model: nn.Module, uniform_formats=()) -> list:
    """(name, formats) of the peer rows at one shape: bf16, mlx-lm's uniform
    and mixed recipes; with `uniform_formats` ((bits, group), ...) those
    uniform rows instead (each format's own speed)."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    uniform = lambda bits, group: {None: dict(bits=bits, group_size=group, mode="affine")}  # noqa: E731
    base = [("mlx-lm 4-bit g64 (mlx_lm.convert -q)", uniform(4, 64))]
    if uniform_formats:
        return base + [(f"uniform {b}-bit g{g}", uniform(b, g)) for b, g in uniform_formats if (b, g) != (4, 64)]
    return [("bf16 (no quantization)", None), *base,
            ("4-bit g128", uniform(4, 128)),
            ("mlx-lm mixed_4_6 (g64)", mixed_quant_predicate_builder("mixed_4_6", model, group_size=64))]


def plan_source(path: str) -> tuple:
    """(name, config, plan) of a written model's folder or its config.json;
    plan: the folder's optiq_metadata.json plan, {} without one."""
    path = Path(path)
    config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    meta = path / "optiq_metadata.json" if path.is_dir() else path.with_name("optiq_metadata.json")
    plan = json.loads(meta.read_text()).get("plan", {}) if meta.exists() else {}
    return (path.stem if path.suffix == ".json" and path.stem != "config" else path.name), config, plan


def same_shape(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"))


def plans_section(args, work: Path) -> dict:
    plans = [plan_source(path) for path in args.plan]
    first, first_config, _ = plans[0]
    own = {k: v for k, v in first_config.items() if k not in ("quantization", "quantization_config")}
    shapes = {"own": own, "llama-3-8b": {"model_type": "llama", **SHAPES["llama-3-8b"]}}
    rows = []
    for shape in args.plan_shapes:
        shape_config = shapes[shape]
        name = first if shape == "own" else shape
        specs = baseline_rows(random_model(shape_config), args.plan_uniform)
        if args.plan_baselines == "4bit":  # only the row every plan is held to
            specs = [s for s in specs if s[0].startswith("mlx-lm 4-bit g64")]
        for source, config, plan in ([] if args.plan_uniform else plans):
            formats = plan_formats(config)
            if shape == "own" and source == first:
                specs.append(("optiq plan", formats, plan))
            elif shape == "own" and same_shape(config, shape_config):
                specs.append((f"optiq plan of {source}", formats, plan))
            else:
                specs.append((f"optiq plan of {source}, carried by role and depth",
                              transplanted(formats, config["num_hidden_layers"], shape_config["num_hidden_layers"]), {}))
        for row_name, row_formats, *planned in specs:
            model = random_model(shape_config)
            try:
                if row_formats is not None:
                    quantize_as(model, row_formats)
            except ValueError as e:  # a group size the shape does not divide: mlx-lm refuses it too
                rows.append(dict(shape=name, method=row_name, error=str(e)))
                log(f"  {name:24s} {row_name[:44]:44s} {e}")
                continue
            bits, weights = weight_bits(model)
            row = dict(shape=name, method=row_name, effective_bpw=bits / weights, weight_gib=bits / 8 / 2**30)
            if planned and planned[0].get("predicted_seconds"):  # planned under --no-slower-than: what its kernel times predicted
                row["predicted_vs_limit"] = planned[0]["seconds_budget"] / planned[0]["predicted_seconds"]
            row.update(speed_row(model, args.decode_context, args.decode_batches, args.prefill, args.steps))
            rows.append(row)
            log(f"  {name:24s} {row_name[:44]:44s} {row['effective_bpw']:.3f} bpw  " +
                "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith(("decode", "prefill"))))
            if args.fold_rows and row_formats is not None:  # the same model as optiq serve runs it
                fold_rows(model)
                row = dict(row, method=f"{row_name}, rows folded (optiq serve)")
                row.update(speed_row(model, args.decode_context, args.decode_batches, args.prefill, args.steps))
                rows.append(row)
                log(f"  {name:24s} {row['method'][:44]:44s} " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("decode")))
            del model
            mx.clear_cache()
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["method"].startswith("mlx-lm 4-bit g64"))
        if "error" not in row:
            row["decode_b1_vs_4bit_g64"] = base["decode_b1_ms"] / row["decode_b1_ms"]
    what = "uniform formats" if args.plan_uniform else f"plans of {', '.join(args.plan)}"
    return dict(model=f"{what}; random weights, bf16 activations", decode_context=args.decode_context, rows=rows)


def plans_table(result) -> str:
    batches = sorted(int(k[8:-3]) for k in result["rows"][0] if k.startswith("decode_b") and k.endswith("_ms"))
    head = (["shape", "method", "eff. bpw", "weights (GiB)"] + [f"decode b{b} (ms/token)" for b in batches]
            + ["b1 vs 4-bit g64", "predicted by its kernel times", "prefill (tok/s)"])
    return markdown_table(head, [[r["shape"], r["method"], f"{r['effective_bpw']:.3f}", f"{r['weight_gib']:.2f}"]
                                 + [f"{r[f'decode_b{b}_ms']:.2f}" for b in batches]
                                 + [f"{r['decode_b1_vs_4bit_g64']:.2f}x", f"{r['predicted_vs_limit']:.2f}x" if "predicted_vs_limit" in r else "-",
                                    f"{r['prefill_tok_s']:.0f}"] if "error" not in r
                                 else [r["shape"], r["method"], "-", "-"] + ["-"] * len(batches) + ["the shape does not divide its group", "-", "-"]
                                 for r in result["rows"]])


def plot_plans(files: list, path: Path):
    """Decode ms/token of every plans row, one point per run and a bar at the
    median, per shape (rows) and batch size (columns) (matplotlib)."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(f).read_text())["rows"] for f in files]
    shapes = list(dict.fromkeys(r["shape"] for r in runs[0]))
    batches = sorted(int(k[8:-3]) for k in runs[0][0] if k.startswith("decode_b") and k.endswith("_ms"))
    fig, axes = plt.subplots(len(shapes), len(batches), figsize=(6 * len(batches), 3.2 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        methods = [r["method"] for r in runs[0] if r["shape"] == shape and "error" not in r]
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                values = [r[f"decode_b{batch}_ms"] for rows in runs for r in rows if r["shape"] == shape and r["method"] == method]
                color = "tab:red" if method.startswith("optiq") else "tab:gray"
                ax.barh(k, statistics.median(values), color=color, alpha=0.5)
                ax.plot(values, [k] * len(values), "k.", markersize=4)
            ax.set_yticks(range(len(methods)), [m.split(" (")[0].split(",")[0][:40] for m in methods], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"decode ms/token, batch {batch} (lower is faster)", fontsize=8)
            ax.set_title(shape, fontsize=9)
            ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"H200, MLX-CUDA: decode speed by weight format ({len(runs)} runs; bar = median)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def speculative_table(result) -> str:
    def accept(r):
        e = r.get("engine", {})
        return f"{e['draft_tokens_accepted'] / max(e['draft_tokens_proposed'], 1):.2f}" if "draft_tokens_proposed" in e else "-"

    return markdown_table(["server", "concurrency", "tok/s", "TTFT p50 (s)", "draft acceptance", "errors"],
                          [[r["server"], r["concurrency"], f"{r['tok_per_s']:.1f}", f"{r['ttft_median_s']:.3f}", accept(r), r["errors"]]
                           if "error" not in r else [r["server"], "-", "fails to start", "-", "-", "-"] for r in result["rows"]])


def serve_table(result) -> str:
    return markdown_table(["server", "concurrency", "tok/s", "TTFT p50 (s)", "errors"],
                          [[r["server"], r["concurrency"], f"{r['tok_per_s']:.1f}", f"{r['ttft_median_s']:.3f}", r["errors"]] if "error" not in r
                           else [r["server"], "-", "fails to start", "-", "-"] for r in result["rows"]])


# -- convert ------------------------------------------------------------------------------


def optiq_row(name: str, config: ConvertConfig) -> dict:
    """One `optiq convert` through the library: time, peak memory, what it measured."""
    mx.reset_peak_memory()
    t0 = time.time()
    written = convert(config, Report())
    row = dict(method=name, seconds=time.time() - t0, peak_gib=mx.get_peak_memory() / 2**30,
               effective_bpw=written.plan.effective_bpw, measured=dict(written.measured))
    log(f"  {name}: {row['seconds']:.0f}s, peak {row['peak_gib']:.1f} GiB")
    mx.clear_cache()
    return row


def mlx_lm_row(source: Path, out: Path) -> dict:
    """`mlx_lm.convert -q` on the same source, timed (its output removed after)."""
    t0 = time.time()
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source), "--mlx-path", str(out), "-q"], check=True, capture_output=True)
    row = dict(method="mlx_lm.convert -q (4-bit g64, round-to-nearest)", seconds=time.time() - t0, effective_bpw=4.5)
    log(f"  mlx_lm.convert -q: {row['seconds']:.0f}s")
    shutil.rmtree(out, ignore_errors=True)
    return row


def convert_section(args, work: Path) -> dict:
    source = build("llama-3-8b", work / "llama-3-8b-bf16")
    rows = []
    for name, config in (("optiq convert (default: GPTQ, 4.5 bpw)", ConvertConfig(model=str(source), output=str(work / "optiq-gptq"), force=True)),
                         ("optiq convert --quantizer rtn", ConvertConfig(model=str(source), output=str(work / "optiq-rtn"), quantizer="rtn", force=True))):
        if name in args.converts:
            rows.append(optiq_row(name, config))
    if "mlx_lm.convert -q" in args.converts:
        rows.append(mlx_lm_row(source, work / "mlx-lm-4bit"))
    return dict(model="llama-3-8b shape, bf16 (random)", rows=rows)


def convert_table(result) -> str:
    return markdown_table(["method", "time (s)", "peak memory (GiB)", "eff. bpw"],
                          [[r["method"], f"{r['seconds']:.0f}", f"{r.get('peak_gib', float('nan')):.1f}", f"{r['effective_bpw']:.3f}"] for r in result["rows"]])


# -- mixture of experts ---------------------------------------------------------------


def moe_section(args, work: Path) -> dict:
    source = build("qwen3-30b-a3b", work / f"qwen3-30b-a3b-{args.moe_layers}l-bf16", num_hidden_layers=args.moe_layers)
    rows = []
    name = "optiq convert (default: GPTQ, 4.5 bpw)"
    if name in args.converts:
        rows.append(optiq_row(name, ConvertConfig(model=str(source), output=str(work / "moe-optiq"), force=True)))
        cover = json.loads((work / "moe-optiq" / "optiq_metadata.json").read_text()).get("expert_coverage", {}).values()
        rows[-1].update(tokens_per_expert=[min(c["min_tokens"] for c in cover), max(c["max_tokens"] for c in cover)],
                        unseen_experts=sum(len(c["unseen"]) for c in cover))
        shutil.rmtree(work / "moe-optiq", ignore_errors=True)
    if "mlx_lm.convert -q" in args.converts:
        rows.append(mlx_lm_row(source, work / "moe-mlx-lm-4bit"))
    return dict(model=f"qwen3-30b-a3b shape with {args.moe_layers} of 48 blocks, bf16 (random)", rows=rows)


def moe_table(result) -> str:
    return markdown_table(["method", "time (s)", "peak memory (GiB)", "eff. bpw", "tokens per expert"],
                          [[r["method"], f"{r['seconds']:.0f}", f"{r.get('peak_gib', float('nan')):.1f}", f"{r['effective_bpw']:.3f}",
                            "{}..{} ({} unseen)".format(*r["tokens_per_expert"], r["unseen_experts"]) if "tokens_per_expert" in r else ""] for r in result["rows"]])


# -- GPTQ at layer shapes -----------------------------------------------------------


def gptq_section(args, work: Path) -> dict:
    """GPTQ on one layer of each Llama-3-8B shape: the factor, the blocked
    kernel, the codes against the kernel's plain-MLX reference (on the
    first 256 columns: the reference walks columns from Python)."""
    rows = []
    for out_dim, in_dim in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        mx.random.seed(out_dim + in_dim)
        x = mx.random.normal((8192, in_dim)).astype(mx.float32)
        gram = x.T @ x
        w = mx.random.normal((out_dim, in_dim)) * 0.02
        mx.eval(gram, w)
        t = time.perf_counter()
        factor = gptq.inverse_factor(gram)
        t_factor = time.perf_counter() - t
        row = dict(shape=[out_dim, in_dim], factor_s=t_factor)
        for bits, group in ((4, 64), (4, 128), (8, 64)):
            gptq.gptq_mlx(w[:64], factor, bits, group, mx.bfloat16, block_step=gptq.block_step_cuda)  # compile
            mx.synchronize()
            t = time.perf_counter()
            codes = gptq.gptq_mlx(w, factor, bits, group, mx.bfloat16, block_step=gptq.block_step_cuda)
            mx.eval(codes)
            row[f"gptq_{bits}@{group}_s"] = time.perf_counter() - t
        u, dead = factor
        small = (u[:256, :256], dead[:256])
        ref = gptq.gptq_mlx(w[:256, :256], small, 4, 64, mx.bfloat16)
        got = gptq.gptq_mlx(w[:256, :256], small, 4, 64, mx.bfloat16, block_step=gptq.block_step_cuda)
        row["codes_equal_to_reference"] = float(mx.mean(ref[0] == got[0]))
        rows.append(row)
        log(f"  {row}")
    return dict(model="GPTQ at Llama-3-8B layer shapes (random)", rows=rows)


def gptq_table(result) -> str:
    return markdown_table(["layer (out x in)", "factor (s)", "GPTQ 4@64 (s)", "4@128 (s)", "8@64 (s)", "codes = reference"],
                          [[f"{r['shape'][0]} x {r['shape'][1]}", f"{r['factor_s']:.2f}", f"{r['gptq_4@64_s']:.2f}", f"{r['gptq_4@128_s']:.2f}",
                            f"{r['gptq_8@64_s']:.2f}", f"{r['codes_equal_to_reference']:.4f}"] for r in result["rows"]])


# -- kernels: each format's decode matmul time at a model's shapes -----------------------


def kernels_section(args, work: Path) -> dict:
    """optiq.speed's kernel times at each --plan model's shapes (and
    Llama-3-8B's) for the 4.5-bpw default candidates: what `optiq convert
    --no-slower-than 4@64 --kernel-times FILE` plans with on another machine.
    Each is written as a KernelTimes JSON beside the section's."""
    cands = [Candidate(b, g) for b in (4, 5, 6, 8) for g in (64, 128)] + [Candidate(16, 64)]
    configs = {name: {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")} for name, config, _ in map(plan_source, args.plan)}
    configs["llama-3-8b"] = {"model_type": "llama", **SHAPES["llama-3-8b"]}
    rows = []
    for name, config in configs.items():
        shapes = layer_shapes(random_model(config))
        times = measure_kernel_times(shapes.values(), cands, batch=args.kernel_batch, device=device.describe(), rows_folded=args.kernel_rows == "folded")
        (Path(args.out) / f"kernel-times-{name}{kernel_suffix(args)}.json").write_text(json.dumps(times.to_dict(), indent=2))
        for shape in sorted({t.shape for t in times.times}):
            at = {t.candidate.key: t.seconds for t in times.times if t.shape == shape}
            rows.append(dict(model=name, shape=list(shape), us={k: v * 1e6 for k, v in at.items()}))
            log(f"  {name:24s} {shape[0]}x{shape[1]}: " + "  ".join(f"{k} {v * 1e6:.1f}" for k, v in at.items()))
    return dict(model=f"decode matmul of {args.kernel_batch} row(s) ({args.kernel_rows}), bf16, per format (us)", rows=rows)


def kernel_suffix(args) -> str:
    return ("" if args.kernel_batch == 1 else f"-b{args.kernel_batch}") + rows_suffix(args)


def rows_suffix(args) -> str:
    return "" if args.kernel_rows == "folded" else "-tokens"


def replan_section(args, work: Path) -> dict:
    """The first --plan model planned again from its sensitivity table
    (--sensitivity: a converted model's metadata) under `--no-slower-than
    --replan-limit`, with kernel times measured here at --kernel-batch rows:
    what `optiq convert --sensitivity ... --kernel-times ... --decode-batch N`
    plans, without the model's weights (the planner needs only the table and
    the shapes). The plan is written as a config and metadata (results/plans/)
    and timed by the plans section beside uniform and the first --plan."""
    source, config, _ = plan_source(args.plan[0])
    own = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    table = load_sensitivity(args.sensitivity)
    shapes = layer_shapes(random_model(own))
    limit = candidate_from_key(args.replan_limit)
    timed = sort_candidates({c for layer in table.layers for c in layer.candidates} | {limit})
    times = measure_kernel_times(shapes.values(), timed, batch=args.kernel_batch, device=device.describe(), rows_folded=args.kernel_rows == "folded")
    name = f"{source}-b{args.kernel_batch}{rows_suffix(args)}"  # never the --plan's own name, even at batch 1
    (Path(args.out) / f"kernel-times-{name}.json").write_text(json.dumps(times.to_dict(), indent=2))
    budget = TimeBudget(times, shapes, limit)
    timing = budget.plan_args(table)
    free = plan_bits(table, args.replan_bpw)
    found = dict(limit_ms=timing["seconds_budget"] * 1e3, unbudgeted_ms=plan_seconds(timing["seconds"], table, free) * 1e3,
                 unbudgeted_kl=free.predicted_kl)
    try:
        plan = plan_bits(table, args.replan_bpw, **timing)
    except OptiqError as e:  # no plan at this size is as fast as the limit at this batch: itself the finding
        log(f"  replan at batch {args.kernel_batch}: {e}")
        return dict(model=f"{source} replanned at batch {args.kernel_batch}", error=str(e), **found, rows=[])
    found.update(planned_ms=plan.predicted_seconds * 1e3, planned_kl=plan.predicted_kl, effective_bpw=plan.effective_bpw)
    log(f"  replan at batch {args.kernel_batch}: " + "  ".join(f"{k} {v:.4f}" for k, v in found.items()))
    folder = work / "replan" / name
    folder.mkdir(parents=True, exist_ok=True)
    quantization = plan_quantization(plan)
    planned_config = dict(own, quantization=quantization, quantization_config=quantization)
    metadata = dict(plan=plan.to_dict(), kernel_times=times.to_dict(), sensitivity_source=str(args.sensitivity))
    for path, data in ((folder / "config.json", planned_config), (folder / "optiq_metadata.json", metadata),
                       (Path(args.out) / "plans" / f"{name}.json", planned_config), (Path(args.out) / "plans" / f"{name}-metadata.json", metadata)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    # planned for folded rows: each row is timed again folded, as optiq serve runs it
    timed_args = argparse.Namespace(**{**vars(args), "plan": [str(folder), args.plan[0]], "plan_shapes": ["own"], "plan_uniform": [],
                                       "fold_rows": args.fold_rows or args.kernel_rows == "folded"})
    return dict(plans_section(timed_args, work), replanned=found)


def replan_table(result) -> str:
    found = result.get("replanned") or result
    head = (f"limit {found['limit_ms']:.3f} ms of matmuls per step; the plan without it {found['unbudgeted_ms']:.3f} ms "
            f"(predicted KL {found['unbudgeted_kl']:.4f})")
    if "error" in result:
        return f"{head}\n\n{result['error']}"
    return (f"{head}; planned {found['planned_ms']:.3f} ms (predicted KL {found['planned_kl']:.4f}, "
            f"{found['effective_bpw']:.3f} bpw)\n\n{plans_table(result)}")


def kernels_table(result) -> str:
    keys = sorted({k for r in result["rows"] for k in r["us"]}, key=lambda k: (int(k.split("@")[0]), int(k.split("@")[1])))
    return markdown_table(["model", "layer (out x in)", *keys], [[r["model"], f"{r['shape'][0]} x {r['shape'][1]}"]
                                                               + [f"{r['us'][k]:.1f}" if k in r["us"] else "-" for k in keys] for r in result["rows"]])


SECTIONS = {"gptq": (gptq_section, gptq_table), "kv": (kv_section, kv_table), "serve": (serve_section, serve_table), "convert": (convert_section, convert_table), "moe": (moe_section, moe_table),
            "speculative": (speculative_section, speculative_table), "formats": (formats_section, formats_table),
            "plans": (plans_section, plans_table), "kernels": (kernels_section, kernels_table), "replan": (replan_section, replan_table)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="kv,serve,convert")
    p.add_argument("--contexts", default="8192,32768,65536,131072")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per KV row")
    p.add_argument("--kv-target", type=float, default=4.5)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--servers", default="mlx_lm.server;optiq serve;optiq serve, 8-bit KV (batched)",
                   help="';'-separated serving rows (also: 'optiq serve, GIL switch 1 ms')")
    p.add_argument("--converts", default="optiq convert (default: GPTQ, 4.5 bpw);mlx_lm.convert -q", help="';'-separated rows (also: optiq convert --quantizer rtn)")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="speculative section: tokens the draft proposes per step")
    p.add_argument("--moe-layers", type=int, default=8, help="blocks of the Qwen3-30B-A3B shape (of 48) in the moe section")
    p.add_argument("--work", default=os.environ.get("OPTIQ_GPU_WORK", "/tmp/optiq-gpu"), help="where the built models go")
    p.add_argument("--plan", nargs="+", default=[str(RESULTS / "plans" / "Qwen2.5-Coder-1.5B-Instruct-optiq-4.5bpw.json")],
                   help="plans section: written models (or their config.json) whose per-layer formats are timed; the first one's shape is `own`")
    p.add_argument("--plan-shapes", default="own,llama-3-8b", help="plans section: the plan's own shape, and llama-3-8b (the plan carried by role and depth)")
    p.add_argument("--decode-context", type=int, default=1024, help="plans section: cached tokens before the timed decode steps")
    p.add_argument("--decode-batches", default="1,16", help="plans section: decode batch sizes")
    p.add_argument("--prefill", type=int, default=2048, help="plans section: prompt tokens of the timed prefill")
    p.add_argument("--kernel-batch", type=int, default=1, help="kernels/replan sections: input rows per matmul (the decode batch)")
    p.add_argument("--kernel-rows", choices=("folded", "tokens"), default="folded",
                   help="kernels/replan sections: a (batch, in) input, as optiq serve multiplies it (optiq/cuda.py), or (batch, 1, in), as stock mlx-lm feeds it")
    p.add_argument("--sensitivity", default=str(RESULTS / "plans" / "Qwen2.5-Coder-1.5B-Instruct-optiq-4.5bpw-speed-metadata.json"),
                   help="replan section: the first --plan model's sensitivity table (a converted model's folder or metadata)")
    p.add_argument("--replan-limit", default="4@64", help="replan section: the format whose decode time the plan may not exceed")
    p.add_argument("--replan-bpw", type=float, default=4.5, help="replan section: the plan's effective bpw target")
    p.add_argument("--plan-baselines", choices=("all", "4bit"), default="all",
                   help="plans/replan sections: every peer row (bf16, 4-bit g64 and g128, mixed_4_6) or mlx-lm 4-bit g64 alone")
    p.add_argument("--fold-rows", action="store_true", help="plans section: each quantized row timed again with optiq serve's folded rows (optiq/cuda.py)")
    p.add_argument("--plan-uniform", default="", help="plans section: BITS:GROUP,... to time uniform formats instead of the mixed rows")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--plot-plans", nargs="+", default=None, help="plans JSONs (repeated runs) to draw as one PNG (--out: the PNG)")
    args = p.parse_args()
    if args.plot_plans:
        return draw_png(plot_plans, args.plot_plans, Path(args.out if args.out.endswith(".png") else RESULTS / "gpu-plans.png"), script="gpu.py")
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.servers = [s for s in args.servers.split(";") if s] if args.servers else None
    args.converts = args.converts.split(";")
    args.plan_shapes = args.plan_shapes.split(",")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    try:
        args.plan_uniform = [tuple(int(x) for x in f.split(":")) for f in args.plan_uniform.split(",") if f]
        assert all(len(f) == 2 for f in args.plan_uniform)
    except (ValueError, AssertionError):
        raise SystemExit(f"--plan-uniform {args.plan_uniform!r}: expected BITS:GROUP,... (e.g. 4:64,8:128)")
    if {"plans", "replan"} & set(args.sections.split(",")):
        for path in args.plan:
            config = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
            if not config.exists() or "quantization" not in json.loads(config.read_text()):
                raise SystemExit(f"--plan {path}: not a quantized model's folder or config.json (a model `optiq convert` wrote)")
    if not device.on_gpu():
        raise SystemExit("benchmarks/gpu.py measures a GPU; MLX runs on the CPU here")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(device=device.describe(), mlx=mx.__version__, nvidia_smi=subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
    log(info)
    for section in args.sections.split(","):
        run, table = SECTIONS[section]
        t0 = time.time()
        result = dict(info, section=section, args={k: v for k, v in vars(args).items()}, **run(args, work))
        result["seconds"] = time.time() - t0
        (out / f"gpu-{section}.json").write_text(json.dumps(result, indent=2))
        print(f"\n## {section} ({result['model']}; {info['nvidia_smi']})\n\n{table(result)}\n", flush=True)


if __name__ == "__main__":
    main()
