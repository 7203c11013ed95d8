"""Calibration tokens: from a text or JSONL file, a Hugging Face dataset, or
text the model samples itself with a fixed seed. Always an int32 array of
shape (n_sequences, seq_len); sequences start with BOS when the tokenizer
adds one (Gemma requires it)."""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .errors import OptiqError
from .source import hub_download


def digest(tokens) -> str:
    arr = np.asarray(tokens, dtype=np.int32)
    return hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:16]


def bos_prefix(tokenizer) -> list:
    """[bos] when the tokenizer itself adds BOS, else []."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("a")
    return [bos] if bos is not None and ids and ids[0] == bos else []


TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json")
RECORD_FORMS = (("text",), ("messages",), ("question", "answer"), ("prompt", "completion"))


def check_source(source, flag: str = "--calibration"):
    """Refuse now, before any model loads, a text source that cannot work: a
    missing, empty or unparseable file, an empty folder (speech and image
    folders are read by their families), a name that is neither a file nor a
    dataset id."""
    if source is None:
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not any(path.iterdir()):
            raise OptiqError(f"{flag} {path}: an empty folder")
        return
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise OptiqError(f"{flag} {path}: a text file must be {', '.join(TEXT_SUFFIXES)}")
        if path.stat().st_size == 0:
            raise OptiqError(f"{flag} {path}: an empty file")
        if path.suffix in (".jsonl", ".json"):
            check_jsonl(path, flag)
        return
    if path.exists():
        raise OptiqError(f"{flag} {path} is neither a file nor a folder")
    if "/" not in str(source) or str(source).startswith((".", "/")):
        raise OptiqError(f"{flag} {source!r} not found (a .txt/.jsonl file or a dataset id)")


def paired_files(folder, suffixes: tuple, media: str, partner: str) -> list:
    """The files of `folder` ending in one of `suffixes` (sorted), once each
    has a .txt `partner` (its prompt, its transcript) beside it: the layout
    of Whisper's and the vision-language models' calibration and eval data."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OptiqError(f"{folder} is not a folder of {media} with .txt {partner}s")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    for path in files:
        if not path.with_suffix(".txt").is_file():
            raise OptiqError(f"{path} has no {partner} {path.with_suffix('.txt').name} beside it")
    if not files:
        raise OptiqError(f"{folder} holds no {media} ({', '.join(suffixes)})")
    return files


def check_jsonl(path: Path, flag: str, forms=RECORD_FORMS) -> int:
    """The number of records in a JSONL file, once each non-blank line is a
    JSON object in one of `forms` (sets of keys); an error naming the line otherwise."""
    n = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise OptiqError(f"{flag} {path}: unreadable ({exc})")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise OptiqError(f"{flag} {path}:{i}: not valid JSON ({exc})")
        if not isinstance(record, dict) or not any(all(k in record for k in form) for form in forms):
            keys = " or ".join("/".join(f) for f in forms)
            raise OptiqError(f"{flag} {path}:{i}: a record needs {keys}")
        n += 1
    if n == 0:
        raise OptiqError(f"{flag} {path}: no records")
    return n


def record_text(record: dict, tokenizer) -> str:
    """One JSONL record as text: `text`, chat `messages`, question/answer or prompt/completion."""
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(record["messages"], tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    if "question" in record and "answer" in record:
        return f"{record['question']}\n{record['answer']}"
    if "prompt" in record and "completion" in record:
        return f"{record['prompt']}{record['completion']}"
    raise OptiqError(
        "a calibration record needs 'text', 'messages', 'question'/'answer' or "
        f"'prompt'/'completion' (got keys {sorted(record)})"
    )


def read_texts(path: Path, tokenizer) -> list:
    """The texts of a .txt (whole file) or .jsonl (one record a line) file."""
    if path.suffix == ".txt" or path.suffix == ".raw":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise OptiqError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise OptiqError(f"{path}:{n}: a record must be a JSON object")
            texts.append(record_text(record, tokenizer))
        return texts
    raise OptiqError(f"calibration file {path} must be .txt or .jsonl")


def windows(token_ids: list, n: int, seq_len: int, prefix: list) -> np.ndarray:
    """n windows of seq_len tokens spread evenly over the token stream."""
    body = seq_len - len(prefix)
    if len(token_ids) < body:
        raise OptiqError(
            f"calibration text has {len(token_ids)} tokens, fewer than one sequence of {seq_len}"
        )
    n_fit = len(token_ids) // body
    starts = np.linspace(0, (n_fit - 1) * body, num=min(n, n_fit)).astype(int)
    rows = [prefix + token_ids[s : s + body] for s in starts]
    return np.array(rows, dtype=np.int32)


def tokens_from_texts(texts, tokenizer, n: int, seq_len: int) -> np.ndarray:
    ids = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None and len(texts) > 1:
            ids.append(eos)
    return windows(ids, n, seq_len, bos_prefix(tokenizer))


def split_calibration(tokens: np.ndarray, n: int):
    """(n sequences spread evenly over `tokens` for the probes, the rest or None)."""
    if len(tokens) <= n:
        return tokens, None
    probe = np.linspace(0, len(tokens) - 1, num=n).round().astype(int)
    return tokens[probe], np.delete(tokens, probe, axis=0)


def sample_tokens(model, tokenizer, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0, batch_size: int = 8):
    """n sequences the model writes itself from BOS, decoded `batch_size` at a
    time with mlx-lm's cache (its buffers grow 256 positions at a time: 64
    sequences at once would hold 0.75 GB of fp32 cache for SmolLM2). Batch i
    draws from its own stream of (seed, i), so full batches do not depend
    on n and no batch repeats another seed's (eval uses seed + 1)."""
    return np.concatenate([
        _sample_batch(model, tokenizer, min(batch_size, n - start), seq_len, int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), temperature)
        for i, start in enumerate(range(0, n, batch_size))
    ])


def with_sampled(tokens: np.ndarray, model, tokenizer, n: int, seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """`tokens` and n more windows of the same length that the model writes
    itself. They draw from seed + 1000's streams, so they repeat neither
    self-sampled calibration (seed) nor held-out text (seed + 1). Why: a
    calibration file's few hundred windows overfit a long tuning run."""
    if n < 1:
        return tokens
    sampled = sample_tokens(model, tokenizer, n, tokens.shape[1], seed=seed + 1000, batch_size=batch_size)
    return np.concatenate([tokens, sampled.astype(tokens.dtype)])


def _sample_batch(model, tokenizer, n: int, seq_len: int, seed: int, temperature: float):
    start = getattr(tokenizer, "bos_token_id", None)
    if start is None:
        start = tokenizer.eos_token_id
    key = mx.random.key(seed)
    cache = make_prompt_cache(model)
    tokens = mx.full((n, 1), start, dtype=mx.int32)
    out = [tokens]
    for _ in range(seq_len - 1):
        logits = model(tokens, cache=cache)[:, -1, :].astype(mx.float32)
        key, sub = mx.random.split(key)
        tokens = mx.random.categorical(logits / temperature, key=sub)[:, None].astype(mx.int32)
        out.append(tokens)
        mx.eval(tokens)
    return np.array(mx.concatenate(out, axis=1))


def load_calibration(source, tokenizer, model, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """Calibration tokens from a file, a dataset id, or (source=None) self-sampled text."""
    if n < 1 or seq_len < 2:
        raise OptiqError("--n-calibration must be >= 1 and --seq-len >= 2")
    if source is None:
        return sample_tokens(model, tokenizer, n, seq_len, seed=seed)
    path = Path(source).expanduser()
    if path.is_file():
        return tokens_from_texts(read_texts(path, tokenizer), tokenizer, n, seq_len)
    if path.exists():
        raise OptiqError(f"calibration {path} is not a file")
    if "/" in str(source) and not str(source).startswith((".", "/")):
        return tokens_from_texts(dataset_texts(str(source), tokenizer), tokenizer, n, seq_len)
    raise OptiqError(f"calibration {source!r} not found (a .txt/.jsonl file or a dataset id)")


def dataset_texts(repo_id: str, tokenizer) -> list:
    """Texts of a Hugging Face dataset repo's .jsonl/.txt files (via huggingface_hub)."""
    folder = hub_download(repo_id, repo_type="dataset", allow_patterns=["*.jsonl", "*.txt"])
    files = sorted(folder.rglob("*.jsonl")) + sorted(folder.rglob("*.txt"))
    if not files:
        raise OptiqError(f"dataset {repo_id!r} has no .jsonl or .txt files")
    texts = []
    for f in files:
        texts.extend(read_texts(f, tokenizer))
    return texts


def wikitext_articles(text: str) -> list:
    """Split WikiText-2 raw into articles (each starts with a ' = Title = ' line)."""
    articles, current = [], []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title and current:
            articles.append("".join(current))
            current = []
        current.append(line)
    if current:
        articles.append("".join(current))
    return articles


def wikitext_split(text: str):
    """(calibration, evaluation) text: the last 25% of articles, the first 75%."""
    articles = wikitext_articles(text)
    cut = int(round(len(articles) * 0.75))
    return "".join(articles[cut:]), "".join(articles[:cut])
