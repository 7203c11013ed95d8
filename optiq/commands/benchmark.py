"""optiq benchmark: size, speed, peak memory and perplexity, beside a baseline.

Size on disk, effective bits per weight, prefill and decode speed, peak
memory and perplexity; with --baseline, two models side by side, measured in
the same run."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import json

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.utils import compute_bits_per_weight

from . import announce_device, run_command, script_entry
from .. import tasks
from ..errors import OptiqError
from ..io import write_json
from ..source import load_reference, resolve_model


@dataclass
class BenchmarkOptions:
    model: str = field(metadata=dict(args=["model"], help="folder, .gguf file or Hub repo id"))
    baseline: Optional[str] = None
    prompt_tokens: int = field(default=512, metadata=dict(help="prefill length"))
    generation_tokens: int = field(default=128, metadata=dict(help="decode length"))
    data: Optional[str] = field(default=None, metadata=dict(help="perplexity text (default: ../shared WikiText-2, else skipped)"))
    n_samples: int = 8
    seq_len: int = 512
    json: Optional[str] = field(default=None, metadata=dict(help="write results here (default optiq-benchmark.json)"))


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def speed(path: Path, prompt_tokens: int, generation_tokens: int) -> dict:
    """mlx-lm's own generation loop, native dtypes: what a user of mlx-lm sees."""
    model, tokenizer = load(str(path))
    vocab = model(mx.array([[0]])).shape[-1]
    rng = mx.random.key(0)
    prompt = mx.random.randint(0, min(vocab, 1000) or 1, (prompt_tokens,), key=rng).tolist()
    mx.reset_peak_memory()
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=generation_tokens):
        pass
    return {
        "mlx_bits_per_weight": float(compute_bits_per_weight(model)),
        "prefill_tps": float(last.prompt_tps),
        "decode_tps": float(last.generation_tps),
        "peak_memory_gb": float(mx.get_peak_memory() / 1e9),
    }


def measure(spec: str, opts, data) -> dict:
    path = resolve_model(spec)
    result = {"disk_bytes": disk_bytes(path)}
    meta = path / "optiq_metadata.json"
    if meta.exists():
        result["effective_bpw"] = json.loads(meta.read_text()).get("effective_bpw")
    result.update(speed(path, opts.prompt_tokens, opts.generation_tokens))
    if data is not None:
        loaded = load_reference(path)
        tokens = tasks.eval_tokens(loaded.tokenizer, data, opts.n_samples, opts.seq_len)
        result["perplexity"] = tasks.perplexity(loaded.model, tokens)["perplexity"]
    return result


def table(rows) -> str:
    keys = ["disk_bytes", "effective_bpw", "mlx_bits_per_weight", "prefill_tps", "decode_tps", "peak_memory_gb", "perplexity"]
    lines = [f"{'':<24}" + "".join(f"{name[-24:]:>26}" for name, _ in rows)]
    for k in keys:
        cells = []
        for _, r in rows:
            v = r.get(k)
            cells.append(f"{'-':>26}" if v is None else f"{v:>26.3f}" if isinstance(v, float) else f"{v:>26}")
        lines.append(f"{k:<24}" + "".join(cells))
    return "\n".join(lines)


def run(opts: BenchmarkOptions) -> dict:
    if opts.prompt_tokens < 1 or opts.generation_tokens < 1:
        raise OptiqError("--prompt-tokens and --generation-tokens must be >= 1")
    data = Path(opts.data) if opts.data else tasks.default_data("perplexity")
    announce_device()
    if data is not None and not data.is_file():
        raise OptiqError(f"--data {data}: no such file")
    rows = [(opts.model, measure(opts.model, opts, data))]
    if opts.baseline:
        rows.append((opts.baseline, measure(opts.baseline, opts, data)))
    print(table(rows))
    result = {"data": str(data) if data else None, "models": dict(rows)}
    write_json(opts.json or "optiq-benchmark.json", result)
    return result


def main(argv=None, prog="optiq benchmark") -> int:
    return run_command(BenchmarkOptions, run, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
