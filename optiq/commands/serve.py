"""optiq serve: an OpenAI-compatible server with planned KV caches and per-request LoRA.

Chat, completions and streaming, continuous batching, per-layer quantized
KV caches and LoRA adapters chosen by the request's model."""

import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx_lm
from mlx_lm.utils import sharded_load

from . import announce_device, run_command, script_entry
from ..cpu import adapt_for_cpu
from ..cuda import adapt_for_cuda
from ..errors import OptiqError
from ..http import grammar
from ..http.engine import Engine
from ..http.server import App, Defaults, serve
from ..kv import make_kv_cache, read_kv_config, uniform_layers
from ..lora import AdapterSelector, mount, read_adapter, resolve_adapter
from ..source import resolve_model


@dataclass
class ServeOptions:
    model: Optional[str] = field(default=None, metadata=dict(help="folder, .gguf or repo id (default: embedded SmolLM2)"))
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = field(default=None, metadata=dict(help="require Authorization: Bearer KEY (all but /health)"))
    kv_config: Optional[str] = field(default=None, metadata=dict(help="kv_config.json from optiq kv-cache"))
    kv_bits: Optional[int] = field(default=None, metadata=dict(help="uniform KV bits instead of a plan"))
    kv_group_size: int = 64
    kv_mode: str = field(default="affine", metadata=dict(choices=["affine", "turbo"], help="with --kv-bits: mlx-lm's affine quantized cache or TurboQuant (1-4 bits)"))
    quantized_kv_start: int = field(default=0, metadata=dict(help="keep the first N tokens' KV unquantized"))
    adapter: List[str] = field(default_factory=list, metadata=dict(nargs="*", help="LoRA adapter: folder or repo id, name=source to name it (repeatable)"))
    max_tokens: int = 512
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    max_context: Optional[int] = field(default=None, metadata=dict(help="prompt + completion tokens (default: the model's)"))
    prompt_cache_bytes: int = field(default=1 << 30, metadata=dict(help="bound on cached conversation prefixes"))
    max_body_bytes: int = 1 << 20
    timeout: float = field(default=60.0, metadata=dict(help="seconds an idle or slow connection may wait"))
    batch_size: int = field(default=16, metadata=dict(help="requests decoded together"))
    dtype: str = field(default="auto", metadata=dict(choices=["auto", "float32", "native"], help="activation dtype; auto = float32 on CPU, where bf16/fp16 matmuls are slow and quantized ones accumulate in low precision (see optiq/cpu.py)"))
    draft_model: Optional[str] = field(default=None, metadata=dict(help="a smaller model with the same vocabulary: speculative decoding (folder, .gguf or repo id)"))
    num_draft_tokens: int = field(default=3, metadata=dict(help="tokens the draft proposes per verification step"))
    pipeline: bool = field(default=False, metadata=dict(help="under mlx.launch: shard the model by layers (pipeline) instead of tensor parallel"))


def adapter_sources(specs) -> dict:
    """name=source pairs; an unnamed source is named after its folder or repo."""
    out = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = Path(spec.rstrip("/")).name, spec
        if not name or not source:
            raise OptiqError(f"--adapter {spec!r}: expected SOURCE or NAME=SOURCE")
        if name in out:
            raise OptiqError(f"--adapter: the name {name!r} is used twice")
        out[name] = source
    return out


def build_app(opts: ServeOptions):
    """Load the model, mount adapters, start the engine: everything but the socket."""
    if opts.kv_config and opts.kv_bits:
        raise OptiqError("give --kv-config or --kv-bits, not both")
    allowed = (1, 2, 3, 4) if opts.kv_mode == "turbo" else (2, 3, 4, 5, 6, 8)
    if opts.kv_bits is not None and opts.kv_bits not in allowed:
        raise OptiqError(f"--kv-bits {opts.kv_bits} with --kv-mode {opts.kv_mode}: choose from {','.join(map(str, allowed))}")
    if opts.kv_group_size not in (32, 64, 128):
        raise OptiqError(f"--kv-group-size {opts.kv_group_size}: MLX supports 32, 64, 128")
    if not 0 <= opts.port <= 65535:
        raise OptiqError(f"--port {opts.port} is not a TCP port")
    if opts.num_draft_tokens < 1:
        raise OptiqError(f"--num-draft-tokens {opts.num_draft_tokens}: at least 1")
    sources = adapter_sources(opts.adapter)
    folder = resolve_model(opts.model)
    announce_device()
    group = mx.distributed.init()
    if group.size() > 1 and opts.draft_model:
        raise OptiqError("--draft-model is not served with a model sharded over processes (mlx-lm cannot either)")
    draft_folder = resolve_model(opts.draft_model) if opts.draft_model else None
    if group.size() > 1:  # started by mlx.launch: mlx-lm's own sharding
        model, tokenizer = sharded_model(folder, group, opts.pipeline, sources)
    else:
        model, tokenizer = mlx_lm.load(str(folder))
    fp32 = opts.dtype == "float32" or (opts.dtype == "auto" and mx.default_device() == mx.cpu)
    if fp32:
        adapt_for_cpu(model)  # fp32 activations, row-adaptive quantized matmuls (optiq/cpu.py)
    else:
        adapt_for_cuda(model)  # batched decode's rows as one matrix (optiq/cuda.py)
    draft = load_draft(draft_folder, tokenizer, fp32) if draft_folder else None
    mx.eval(model.parameters())  # materialise here: the engine thread has its own stream
    layers = None
    if opts.kv_config:
        layers = list(read_kv_config(opts.kv_config).layers)
        n = len(model.layers)
        bad = [e.layer_idx for e in layers if not 0 <= e.layer_idx < n]
        if bad:
            raise OptiqError(f"{opts.kv_config}: layers {bad} do not exist (the model has {n})")
    elif opts.kv_bits:
        layers = uniform_layers(model, opts.kv_bits, opts.kv_group_size, opts.kv_mode)
    make_cache = None
    if layers is not None:
        try:  # fail now, not per request: a layer without a KV cache, a group size the head dim refuses
            model(mx.array([[0, 0]]), cache=make_kv_cache(model, layers))
        except (ValueError, RuntimeError) as exc:
            raise OptiqError(f"the KV plan does not fit this model: {exc}")
        make_cache = lambda: make_kv_cache(model, layers, opts.quantized_kv_start)  # noqa: E731
    selector = AdapterSelector()
    for name, source in sources.items():
        mount(model, name, read_adapter(resolve_adapter(source)), selector)
    args = getattr(model, "args", None)
    context = opts.max_context or getattr(args, "max_position_embeddings", None) or 4096
    if draft is not None and make_cache is not None and not all(getattr(c, "is_trimmable", lambda: False)() for c in make_cache()):
        raise OptiqError("--draft-model needs a KV cache that can drop rejected tokens; this KV plan's caches cannot (drop --kv-config/--kv-bits)")
    vocab = getattr(args, "vocab_size", None) or len(tokenizer.get_vocab())
    make_processor = lambda g: grammar.GrammarProcessor(g, grammar.lltokenizer(tokenizer, vocab), vocab)  # noqa: E731
    engine = Engine(model, tokenizer, make_cache, selector, opts.prompt_cache_bytes, opts.batch_size, group=group,
                    make_processor=make_processor, draft_model=draft, num_draft_tokens=opts.num_draft_tokens)
    name = opts.model or folder.name
    defaults = Defaults(name, opts.max_tokens, opts.temp, opts.top_p, opts.top_k, opts.seed)
    return App(engine, tokenizer, defaults, tuple(sources), int(context), opts.api_key, opts.max_body_bytes, opts.timeout, vocab)


def load_draft(folder, tokenizer, fp32: bool):
    """The draft model for speculative decoding (on the model's CPU path when
    fp32): it must speak the same vocabulary."""
    draft, draft_tokenizer = mlx_lm.load(str(folder))
    ours, theirs = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if ours != theirs:  # the same ids must mean the same tokens, added tokens included
        differ = sum(ours.get(k) != v for k, v in theirs.items()) + len(ours.keys() - theirs.keys())
        raise OptiqError(f"--draft-model {folder}: its vocabulary ({len(theirs)} tokens) is not the model's ({len(ours)}; {differ} differ)")
    if fp32:
        adapt_for_cpu(draft)
    else:
        adapt_for_cuda(draft)  # the model's GPU path too (optiq/cuda.py)
    mx.eval(draft.parameters())
    return draft


def sharded_model(folder, group, pipeline: bool, sources):
    """mlx-lm's sharded_load over the mlx.launch group (tensor parallel, or
    pipeline by layers), as mlx_lm.server does."""
    if sources:
        raise OptiqError("adapters are not served with a model sharded over processes (mlx-lm cannot either)")
    try:
        return sharded_load(str(folder), pipeline_group=group if pipeline else None, tensor_group=None if pipeline else group)
    except (ValueError, FileNotFoundError) as exc:
        raise OptiqError(f"cannot shard {folder} over {group.size()} processes: {exc}")


# The engine thread and the HTTP loop share the GIL; Python's default 5 ms
# switch interval left each waiting on the other. Measured on the H200
# (benchmarks/gpu.py, 1B shape): 1 ms took c=32 from 1152 to 1964 tok/s and
# median first token from 0.66 to 0.45 s, c=1 from 215 to 246 tok/s.
SWITCH_INTERVAL = 0.001


def run(opts: ServeOptions):
    sys.setswitchinterval(float(os.environ.get("OPTIQ_SWITCH_INTERVAL", SWITCH_INTERVAL)))
    app = build_app(opts)
    if not app.engine.is_leader:  # another rank: decode in step with rank 0 until it stops
        app.engine.thread.join()
        return

    def ready(server):
        host, port = server.sockets[0].getsockname()[:2]
        print(f"optiq serve: {app.defaults.model_name} on http://{host}:{port}/v1"
              + (f" with adapters {', '.join(app.adapters)}" if app.adapters else ""), flush=True)

    try:
        asyncio.run(serve(app, opts.host, opts.port, ready))
    except OSError as exc:
        raise OptiqError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass
    finally:
        app.engine.close()


def merge_repeated(argv, flag: str) -> list:
    """`--adapter a --adapter b` -> `--adapter a b` (argparse-dataclass has no append)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(flag + "="):
            values.append(argv[i][len(flag) + 1:])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def main(argv=None, prog="optiq serve") -> int:
    return run_command(ServeOptions, run, merge_repeated(argv, "--adapter"), prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
