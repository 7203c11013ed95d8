"""Import a GGUF file (llama, qwen2 or gemma3) into a folder that `mlx_lm.load` opens.

Weights are dequantized with the `gguf` package; the tokenizer is rebuilt with
transformers' own GGUF tokenizer converter, so the output folder is a plain
Hugging Face layout (config.json, model.safetensors, tokenizer files).
"""

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf.quants import dequantize
from tokenizers import Tokenizer, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .errors import OptiqError
from .io import copy_tokenizer_files

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# GGUF tensor names (after "blk.N.") -> Hugging Face names (after "model.layers.N.").
_BLOCK_NAMES = {
    "llama": {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "gemma3": {
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
}
# Qwen2 keeps llama's names; its q/k/v biases come as blk.N.attn_q.bias etc.
_BLOCK_NAMES["qwen2"] = _BLOCK_NAMES["llama"]
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def read_metadata(reader) -> dict:
    """All key/value fields of a GGUF file as Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """The Hugging Face name of a GGUF tensor, e.g. blk.3.attn_q.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part not in _BLOCK_NAMES[arch]:
            raise OptiqError(f"unrecognised GGUF tensor {gguf_name!r} for {arch}")
        return f"model.layers.{index}.{_BLOCK_NAMES[arch][part]}.{suffix}"
    if stem not in _TOP_NAMES:
        raise OptiqError(f"unrecognised GGUF tensor {gguf_name!r} for {arch}")
    return f"{_TOP_NAMES[stem]}.{suffix}"


def unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves rotary halves)."""
    dim = weight.shape[0] // n_heads // 2
    w = weight.reshape(n_heads, dim, 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _config(meta: dict, arch: str, tied: bool) -> dict:
    p = f"{arch}."
    head_count = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": int(meta[p + "block_count"]),
        "intermediate_size": int(meta[p + "feed_forward_length"]),
        "num_attention_heads": head_count,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", head_count)),
        "rms_norm_eps": float(meta[p + "attention.layer_norm_rms_epsilon"]),
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    head_dim = meta.get(p + "attention.key_length", hidden // head_count)
    config["head_dim"] = int(head_dim)
    if arch == "llama":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"],
                      torch_dtype="float16")
    elif arch == "qwen2":
        config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                      torch_dtype="bfloat16")
    else:
        config.update(
            model_type="gemma3_text",
            architectures=["Gemma3ForCausalLM"],
            # fp16 activations overflow in Gemma; bf16 is what Google ships.
            torch_dtype="bfloat16",
            sliding_window=int(meta.get(p + "attention.sliding_window", 512)),
            sliding_window_pattern=6,
            query_pre_attn_scalar=int(head_dim),
            rope_local_base_freq=10000.0,
        )
    return config


def read_tensors(reader, arch: str, config: dict) -> dict:
    """Dequantized fp32 tensors under Hugging Face names."""
    tensors = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, arch)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        array = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = unpermute_rope(array, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = unpermute_rope(array, config["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's (1 + w) norm scale; mlx-lm adds the 1 itself.
            array = array - 1.0
        tensors[name] = array
    return tensors


def build_tokenizer(meta: dict, arch: str):
    """A transformers fast tokenizer rebuilt from the GGUF vocabulary."""
    # Imported here: transformers' GGUF internals move between releases (5.17
    # has no GGUF_TOKENIZER_MAPPING), and only a GGUF import needs them.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {
        group: {
            name: meta[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in meta
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tok_dict, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    backend, _ = convert_gguf_tokenizer(arch, tok_dict)
    if tok_dict.get("pre_tokenizer_type") == "smollm":
        # SmolLM splits digits one by one before byte-level BPE (its tokenizer.json).
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    specials = {}
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            specials[name] = tok_dict["tokens"][int(token_id)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    if tok_config.get("chat_template"):
        tokenizer.chat_template = tok_config["chat_template"]
    add_bos = bool(tok_config.get("add_bos_token", arch == "gemma3"))
    return tokenizer, add_bos


def _set_bos(tokenizer_dir: Path, add_bos: bool, bos_token: str | None):
    """Make the saved tokenizer add BOS the way llama.cpp does for this file."""
    path = tokenizer_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    if add_bos and bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bos_id)],
        )
        tok.save(str(path))
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = add_bos
    config_path.write_text(json.dumps(config, indent=2))


def import_gguf(gguf_path, out_dir, tokenizer_dir=None) -> Path:
    """Write a Hugging Face style folder for `gguf_path` into `out_dir`.
    `tokenizer_dir`: tokenizer files to copy instead of rebuilding them (made
    where transformers has its GGUF converter; some installs lack it)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # gguf raises bare ValueErrors on bad magic
        raise OptiqError(f"{gguf_path} is not a readable GGUF file ({exc})") from exc
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise OptiqError(
            f"GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = _config(meta, arch, tied)
    tensors = read_tensors(reader, arch, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = mx.bfloat16 if config["torch_dtype"] == "bfloat16" else mx.float16
    weights = {k: mx.array(v).astype(dtype) for k, v in tensors.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
        return out_dir
    tokenizer, add_bos = build_tokenizer(meta, arch)
    tokenizer.save_pretrained(str(out_dir))
    _set_bos(out_dir, add_bos, tokenizer.bos_token)
    return out_dir
