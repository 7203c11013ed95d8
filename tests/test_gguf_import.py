"""GGUF import: llama (rotary rows permuted as llama.cpp writes them), qwen2
(q/k/v biases, rows as Hugging Face has them) and gemma3 (norms stored as 1 + w), written here with the gguf package's own writer."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from conftest import build_model
from optiq.cli import main as cli
from optiq.gguf_import import import_gguf

LLAMA_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GEMMA_NAMES = dict(
    LLAMA_NAMES,
    post_attention_layernorm="post_attention_norm",
    pre_feedforward_layernorm="ffn_norm",
    post_feedforward_layernorm="post_ffw_norm",
    **{"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
)


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, names) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{names[rest]}.{suffix}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[stem] + "." + suffix


def write_gguf(folder, out, arch, quantize_embedding=False):
    import gguf

    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    weights = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    w = gguf.GGUFWriter(str(out), arch)
    p = arch + "."
    w.add_uint32(p + "block_count", config["num_hidden_layers"])
    w.add_uint32(p + "embedding_length", config["hidden_size"])
    w.add_uint32(p + "feed_forward_length", config["intermediate_size"])
    w.add_uint32(p + "attention.head_count", config["num_attention_heads"])
    w.add_uint32(p + "attention.head_count_kv", config["num_key_value_heads"])
    w.add_float32(p + "attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    w.add_float32(p + "rope.freq_base", config.get("rope_theta", 10000.0))
    w.add_uint32(p + "context_length", 512)
    if arch == "gemma3":
        w.add_uint32(p + "attention.key_length", config["head_dim"])
        w.add_uint32(p + "attention.sliding_window", config["sliding_window"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<") and t.endswith(">") else 1 for t, _ in vocab])
    merges = tok["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok["model"]["vocab"]["<bos>"])
    w.add_eos_token_id(tok["model"]["vocab"]["<eos>"])
    w.add_add_bos_token(True)
    names = GEMMA_NAMES if arch == "gemma3" else LLAMA_NAMES
    for hf, t in weights.items():
        if arch == "llama" and hf.endswith("q_proj.weight"):
            t = permute(t, config["num_attention_heads"])
        if arch == "llama" and hf.endswith("k_proj.weight"):
            t = permute(t, config["num_key_value_heads"])
        if arch == "gemma3" and hf.endswith("norm.weight"):
            t = t + 1.0
        name = gguf_name(hf, names)
        if quantize_embedding and name == "token_embd.weight":
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def logits_of(path, text="The quick brown fox jumps"):
    model, tok = load(str(path))
    from optiq.source import to_fp32

    to_fp32(model)
    return np.array(model(mx.array([tok.encode(text)]))), tok.encode(text)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_import_reproduces_the_source_model(tmp_path, arch):
    hf_arch = {"gemma3": "gemma3_text"}.get(arch, arch)
    overrides = {"num_hidden_layers": 6, "sliding_window_pattern": 6} if arch == "gemma3" else {}
    src = build_model(tmp_path / "src", hf_arch, **overrides)
    gguf_file = write_gguf(src, tmp_path / "tiny.gguf", arch)
    out = import_gguf(gguf_file, tmp_path / "imported")
    want, want_ids = logits_of(src)
    got, got_ids = logits_of(out)
    assert got_ids == want_ids  # the rebuilt tokenizer encodes the same (BOS included)
    # fp16 storage of the imported weights: close, not bit-equal
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_import_dequantizes_quantized_tensors(tmp_path):
    src = build_model(tmp_path / "src", "llama")
    gguf_file = write_gguf(src, tmp_path / "q.gguf", "llama", quantize_embedding=True)
    out = import_gguf(gguf_file, tmp_path / "imported")
    want = mx.load(str(src / "model.safetensors"))["model.embed_tokens.weight"].astype(mx.float32)
    got = mx.load(str(out / "model.safetensors"))["model.embed_tokens.weight"].astype(mx.float32)
    err = float(mx.max(mx.abs(got - want)))
    assert 0 < err < 0.02 * float(mx.max(mx.abs(want)))  # Q8_0 rounding, nothing worse


def test_import_gguf_command_and_bad_input(tmp_path, capsys):
    src = build_model(tmp_path / "src", "llama")
    gguf_file = write_gguf(src, tmp_path / "tiny.gguf", "llama")
    assert cli(["import-gguf", str(gguf_file), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").exists()
    with pytest.raises(SystemExit) as exc:
        cli(["import-gguf", str(gguf_file), "-o", str(tmp_path / "out")])
    assert exc.value.code == 2 and "exists" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(SystemExit) as exc:
        cli(["import-gguf", str(bad), "-o", str(tmp_path / "bad_out")])
    assert exc.value.code == 2 and "GGUF" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()


def test_import_with_a_carried_tokenizer(tmp_path, capsys):
    src = build_model(tmp_path / "src", "llama")
    gguf_file = write_gguf(src, tmp_path / "tiny.gguf", "llama")
    built = import_gguf(gguf_file, tmp_path / "built")
    assert cli(["import-gguf", str(gguf_file), "-o", str(tmp_path / "carried"), "--tokenizer", str(built)]) == 0
    want, want_ids = logits_of(built)
    got, got_ids = logits_of(tmp_path / "carried")
    assert got_ids == want_ids and np.array_equal(got, want)
    assert (tmp_path / "carried" / "config.json").read_text() == (built / "config.json").read_text()
    with pytest.raises(SystemExit) as exc:
        cli(["import-gguf", str(gguf_file), "-o", str(tmp_path / "none"), "--tokenizer", str(tmp_path)])
    assert exc.value.code == 2 and "tokenizer_config.json" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
