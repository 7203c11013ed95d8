"""optiq eval: perplexity, KL, GSM8K, speech WER or AI2D accuracy, beside a baseline.

Perplexity, KL against a reference and GSM8K accuracy for text models, word
error rate on speech (mlx-whisper models), diagram multiple-choice accuracy
(AI2D's form, mlx-vlm models); with --baseline, two models side by side in
one table."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx_lm import load

from . import announce_device, run_command, script_entry
from .. import tasks, vlm, whisper
from ..calibration import check_source
from ..errors import OptiqError
from ..io import write_json
from ..source import as_measured, load_reference, resolve_model


@dataclass
class EvalOptions:
    model: str = field(metadata=dict(args=["model"], help="folder, .gguf file or Hub repo id"))
    task: str = field(default="perplexity", metadata=dict(choices=["perplexity", "kl", "gsm8k", "wer", "ai2d"]))
    reference: Optional[str] = field(default=None, metadata=dict(help="reference model for --task kl"))
    baseline: Optional[str] = field(default=None, metadata=dict(help="a second model, measured the same way"))
    data: Optional[str] = field(default=None, metadata=dict(help="text/jsonl file (default: ../shared/data when present); for wer a folder of .wav files with .txt transcripts (default: espeak-ng speech); for ai2d a .jsonl of image, question, options, answer (default: drawn diagrams)"))
    n_samples: int = field(default=32, metadata=dict(help="sequences (perplexity, kl), problems (gsm8k) or questions (ai2d)"))
    seq_len: int = 512
    n_shots: int = field(default=4, metadata=dict(help="GSM8K worked examples in the prompt"))
    max_tokens: int = field(default=256, metadata=dict(help="GSM8K generation limit"))
    json: Optional[str] = field(default=None, metadata=dict(help="write results here (default optiq-eval-TASK.json)"))


def data_path(opts) -> Path:
    if opts.task in ("wer", "ai2d"):
        return Path(opts.data) if opts.data else None
    if opts.data:
        path = Path(opts.data)
        if not path.is_file():
            raise OptiqError(f"--data {path}: no such file")
        if opts.task == "gsm8k":
            tasks.read_gsm8k(path)  # every record parsed now, before a model loads
        else:
            check_source(path, "--data")
        return path
    path = tasks.default_data(opts.task)
    if path is None:
        raise OptiqError(f"--task {opts.task} needs --data (no ../shared/data here)")
    return path


def measure(spec: str, opts, data: Path, reference=None) -> dict:
    path = resolve_model(spec)
    if opts.task == "wer":
        if not whisper.is_whisper(path):
            raise OptiqError(f"--task wer needs an mlx-whisper model; {spec} is not one")
        return whisper.wer(path, data)
    if opts.task == "ai2d":
        model, processor = vlm.load(path, fp32=False)
        return vlm.choices(as_measured(model), processor, data)
    if opts.task == "gsm8k":
        model, tokenizer = load(str(path))
        tasks.fp32_activations(model)
        problems = tasks.read_gsm8k(data)
        train = data.with_name("train.jsonl")
        if train.exists() and train != data:
            shots = tasks.read_gsm8k(train)[: opts.n_shots]
        else:
            shots, problems = problems[: opts.n_shots], problems[opts.n_shots :]
        problems = problems[: opts.n_samples]
        if not problems:
            raise OptiqError(f"{data}: no problems left after {opts.n_shots} shots")
        return tasks.gsm8k(model, tokenizer, problems, shots, max_tokens=opts.max_tokens)
    loaded = load_reference(path)
    tokens = tasks.eval_tokens(loaded.tokenizer, data, opts.n_samples, opts.seq_len)
    if opts.task == "perplexity":
        return tasks.perplexity(loaded.model, tokens)
    probe = mx.array(tokens[:1, :2])
    if loaded.model(probe).shape[-1] != reference.model(probe).shape[-1]:
        raise OptiqError(f"{spec} and the reference have different vocabularies")
    return tasks.kl(loaded.model, reference.model, tokens)


def table(rows, task) -> str:
    keys = {"perplexity": ["perplexity", "n_tokens"], "kl": ["kl_mean", "kl_p99", "top1", "n_tokens"], "gsm8k": ["accuracy", "n_problems"], "wer": ["wer", "n_words"], "ai2d": ["accuracy", "n_questions"]}[task]
    head = f"{'model':<48}" + "".join(f"{k:>12}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, result in rows:
        cells = "".join(f"{result[k]:>12.4f}" if isinstance(result[k], float) else f"{result[k]:>12}" for k in keys)
        lines.append(f"{name[-48:]:<48}" + cells)
    return "\n".join(lines)


def run(opts: EvalOptions) -> dict:
    if opts.n_samples < 1 or opts.seq_len < 2:
        raise OptiqError("--n-samples must be >= 1 and --seq-len >= 2")
    if opts.task == "kl" and not opts.reference:
        raise OptiqError("--task kl needs --reference MODEL")
    data = data_path(opts)
    announce_device()
    reference = load_reference(resolve_model(opts.reference)) if opts.task == "kl" else None
    label = str(data)
    if opts.task == "wer":  # the speech, read (or spoken) once for both models
        whisper.require()
        label = opts.data or "espeak-ng sentences"
        data = whisper.speech(data, whisper.EVAL_SENTENCES)
    if opts.task == "ai2d":  # the questions, read (or drawn) once for both models
        vlm.require()
        label = opts.data or "drawn diagrams"
        data = (vlm.read_choices(data) if data else vlm.choice_items(opts.n_samples, seed=1234))[: opts.n_samples]
    rows = [(opts.model, measure(opts.model, opts, data, reference))]
    if opts.baseline:
        rows.append((opts.baseline, measure(opts.baseline, opts, data, reference)))
    print(table(rows, opts.task))
    result = {"task": opts.task, "data": label, "reference": opts.reference, "models": {name: r for name, r in rows}}
    if opts.task == "ai2d" and opts.baseline:  # how often the two models pick the same option
        a, b = (r["picks"] for _, r in rows)
        result["agreement"] = sum(x == y for x, y in zip(a, b)) / len(a)
        print(f"same option picked by both: {result['agreement']:.3f}")
    write_json(opts.json or f"optiq-eval-{opts.task}.json", result)
    return result


def main(argv=None, prog="optiq eval") -> int:
    return run_command(EvalOptions, run, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
