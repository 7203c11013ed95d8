"""Evaluation tasks over any model mlx_lm.load opens: perplexity, KL against a
reference, GSM8K accuracy. Each returns a flat dict of numbers.

Models are measured with fp32 activations: prefill-sized work runs on
dequantized fp32 weights (the same numbers the quantized kernels compute, at
fp32 matmul speed on CPU); generation keeps the packed weights and casts only
scales, biases and norms to fp32 (one-row quantized matmuls are fast)."""

import json
import re
from pathlib import Path

import numpy as np
from mlx_lm.generate import batch_generate

from . import device
from .calibration import read_texts, tokens_from_texts, wikitext_split
from .errors import OptiqError
from .evaluate import batches, quality, reference_batches
from .metrics import token_nll
from .source import to_fp32

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_data(task: str):
    """../shared/data files when present (benchmarks); None otherwise."""
    path = {
        "perplexity": SHARED / "wikitext-2-raw" / "wiki.test.raw",
        "kl": SHARED / "wikitext-2-raw" / "wiki.test.raw",
        "gsm8k": SHARED / "gsm8k" / "test.jsonl",
    }[task]
    return path if path.exists() else None


def eval_text(path: Path) -> str:
    """The evaluation text of a file: WikiText-2's first 75% of articles (the
    last 25% are calibration), any other .txt whole."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.name.startswith("wiki."):
        return wikitext_split(text)[1]
    return text


def eval_tokens(tokenizer, path: Path, n: int, seq_len: int) -> np.ndarray:
    texts = [eval_text(path)] if path.suffix in (".txt", ".raw") else read_texts(path, tokenizer)
    return tokens_from_texts(texts, tokenizer, n, seq_len)


def perplexity(model, tokens, batch_size: int = 8) -> dict:
    nll = []
    for batch in batches(tokens, batch_size):
        nll.append(np.array(token_nll(model(batch)[:, :-1], batch[:, 1:])))
    nll = np.concatenate(nll)
    return {"perplexity": float(np.exp(nll.mean())), "nll": float(nll.mean()), "n_tokens": int(nll.size)}


def kl(model, reference, tokens, batch_size: int = 8) -> dict:
    refs = reference_batches(reference, tokens, batch_size)
    q = quality(model, tokens, refs, batch_size)
    return {"kl_mean": q["kl_mean"], "kl_p99": q["kl_p99"], "top1": q["top1"], "n_tokens": int(np.asarray(tokens).size)}


# -- GSM8K -------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str):
    """The answer a GSM8K solution states: after '####', else the last number."""
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.findall(text)
        return _clean(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _clean(found[-1]) if found else None


def _clean(number: str) -> str:
    value = number.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def read_gsm8k(path: Path) -> list:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append({"question": row["question"], "answer": row["answer"]})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise OptiqError(f"{path}:{n}: not a GSM8K record with question/answer ({exc})")
    if not rows:
        raise OptiqError(f"{path} has no GSM8K records")
    return rows


def gsm8k_prompt(tokenizer, shots: list, question: str) -> list:
    """Token ids of a few-shot prompt, through the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]}]
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return tokenizer.encode(text + f"Question: {question}\nAnswer:")


def gsm8k(model, tokenizer, problems: list, shots: list, max_tokens: int = 256, batch_size: int = 8, progress=None) -> dict:
    """Greedy few-shot accuracy: exact match of the final number. `progress(done,
    total)` is called after each batch (a GPU's first batches compile kernels).
    `generation` counts what mlx-lm's batch generator did (tokens, decode
    steps, seconds), so two models' speeds compare per token, not per batch
    (a batch lasts as long as its longest answer)."""
    correct, outputs = 0, []
    counts = dict(prompt_tokens=0, prompt_seconds=0.0, tokens=0, steps=0, decode_seconds=0.0)
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [gsm8k_prompt(tokenizer, shots, p["question"]) for p in chunk]
        response = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens)
        texts, stats = response.texts, response.stats
        for key, value in (("prompt_tokens", stats.prompt_tokens), ("prompt_seconds", stats.prompt_time), ("tokens", stats.generation_tokens),
                           ("steps", stats.generation_steps), ("decode_seconds", stats.decode_time)):
            counts[key] += value
        for p, text in zip(chunk, texts):
            # a model that runs on into another question: keep its first answer
            text = text.split("Question:")[0]
            got, want = final_number(text), final_number(p["answer"])
            correct += int(got is not None and got == want)
            outputs.append({"got": got, "want": want})
        if progress is not None:
            progress(len(outputs), len(problems))
    counts["tokens_per_s"] = counts["tokens"] / counts["decode_seconds"] if counts["decode_seconds"] > 0 else 0.0
    return {"accuracy": correct / len(problems), "n_problems": len(problems), "answers": outputs, "generation": counts}


def fp32_activations(model):
    """Keep packed weights; on a CPU cast every float (scales, biases, norms)
    to fp32, on a GPU keep the model's own dtype (device.py)."""
    return model if device.on_gpu() else to_fp32(model)
