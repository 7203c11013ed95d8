"""Multimodal -> text-only, on tiny checkpoints in the Hugging Face layouts the
families publish (config sections and weight names as released, random weights)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from conftest import build_model
from optiq.cli import main as cli
from optiq.errors import OptiqError
from optiq.strip import is_multimodal, strip

# family -> (text arch for the fixture, multimodal config builder, text weight prefix map, vision tensors)
VISION = {
    "gemma3": {
        "vision_tower.vision_model.embeddings.patch_embedding.weight": (16, 14, 14, 3),
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": (16, 16),
        "vision_tower.vision_model.post_layernorm.weight": (16,),
        "multi_modal_projector.mm_input_projection_weight": (16, 64),
        "multi_modal_projector.mm_soft_emb_norm.weight": (16,),
    },
    "qwen3_vl": {
        "model.visual.patch_embed.proj.weight": (16, 3, 2, 14, 14),
        "model.visual.blocks.0.attn.qkv.weight": (48, 16),
        "model.visual.merger.linear_fc1.weight": (64, 64),
        "model.visual.deepstack_merger_list.0.norm.weight": (64,),
    },
    "mistral3": {
        "vision_tower.patch_conv.weight": (16, 3, 14, 14),
        "vision_tower.transformer.layers.0.attention.q_proj.weight": (16, 16),
        "multi_modal_projector.linear_1.weight": (64, 16),
        "multi_modal_projector.patch_merger.merging_layer.weight": (16, 64),
    },
}


def multimodal_checkpoint(tmp_path, family):
    """A tiny multimodal checkpoint around a random text model."""
    text_arch = {"gemma3": "gemma3_text", "qwen3_vl": "qwen3", "mistral3": "llama"}[family]
    text_dir = build_model(tmp_path / "text", text_arch)
    text_cfg = json.loads((text_dir / "config.json").read_text())
    weights = mx.load(str(text_dir / "model.safetensors"))
    if family == "gemma3":
        renamed = {"language_model." + k: v for k, v in weights.items()}
        config = {
            "model_type": "gemma3",
            "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": text_cfg,
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16, "patch_size": 14},
            "vocab_size": text_cfg["vocab_size"],
            "mm_tokens_per_image": 4,
        }
    elif family == "qwen3_vl":
        renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in weights.items()}
        config = {
            "model_type": "qwen3_vl",
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "text_config": dict(text_cfg, model_type="qwen3_vl_text"),
            "vision_config": {"model_type": "qwen3_vl", "hidden_size": 16, "depth": 1},
            "image_token_id": 5,
        }
    else:
        renamed = {"language_model." + k: v for k, v in weights.items()}
        config = {
            "model_type": "mistral3",
            "architectures": ["Mistral3ForConditionalGeneration"],
            "text_config": dict(text_cfg, model_type="mistral"),
            "vision_config": {"model_type": "pixtral", "hidden_size": 16},
            "multimodal_projector_bias": False,
        }
    rng = np.random.default_rng(0)
    for name, shape in VISION[family].items():
        renamed[name] = mx.array(rng.normal(size=shape).astype(np.float32))
    folder = tmp_path / family
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), renamed, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_text((text_dir / f).read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "X"}))
    return folder


def logits(path):
    model, tok = load(str(path))
    return np.array(model(mx.array([tok.encode("The quick brown fox jumps")])).astype(mx.float32))


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "mistral3"])
def test_strip_matches_the_text_path(tmp_path, family):
    src = multimodal_checkpoint(tmp_path, family)
    assert is_multimodal(src)
    out = tmp_path / "text-only"
    report = strip(src, out)
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" not in config and "text_config" not in config
    assert config["model_type"] == {"gemma3": "gemma3_text", "qwen3_vl": "qwen3", "mistral3": "mistral"}[family]
    assert not (out / "preprocessor_config.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert report.removed_tensors == len(VISION[family])
    vision_bytes = sum(4 * int(np.prod(s)) for s in VISION[family].values())
    assert report.removed_bytes == vision_bytes
    names = mx.load(str(out / "model.safetensors"))
    assert not any(k.startswith(("vision", "multi_modal", "model.visual", "language_model")) for k in names)
    # same logits as mlx-lm's own text path of the multimodal checkpoint
    np.testing.assert_allclose(logits(out), logits(src), rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "optiq_metadata.json").read_text())
    assert meta["stripped"]["removed_bytes"] == vision_bytes
    # the files shrink by what the report says (up to safetensors headers)
    shrunk = (src / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert abs(shrunk - vision_bytes) < 4096


def test_convert_strips_by_default_and_keeps_on_request(tmp_path):
    src = multimodal_checkpoint(tmp_path, "gemma3")
    fast = ["--n-calibration", "2", "--seq-len", "32", "--group-size", "32", "--no-eval", "--quiet"]
    assert cli(["convert", str(src), "-o", str(tmp_path / "q"), *fast]) == 0
    meta = json.loads((tmp_path / "q" / "optiq_metadata.json").read_text())
    assert meta["stripped"]["family"] == "gemma3"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "gemma3_text"
    load(str(tmp_path / "q"))
    assert cli(["convert", str(src), "-o", str(tmp_path / "k"), "--keep-unused-modalities", *fast]) == 0
    kept = json.loads((tmp_path / "k" / "config.json").read_text())
    assert kept["model_type"] == "gemma3" and "vision_config" in kept
    extra = mx.load(str(tmp_path / "k" / "model-unused-modalities.safetensors"))
    assert set(extra) == set(VISION["gemma3"])
    load(str(tmp_path / "k"))  # mlx-lm's gemma3 text path still opens it


def test_strip_command_and_errors(tmp_path, tiny_llama, capsys):
    src = multimodal_checkpoint(tmp_path, "mistral3")
    assert cli(["strip", str(src), "-o", str(tmp_path / "s")]) == 0
    assert "mistral3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli(["strip", str(tiny_llama), "-o", str(tmp_path / "t")])
    assert exc.value.code == 2 and "not a multimodal" in capsys.readouterr().err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "fancy_vlm", "vision_config": {}}))
    with pytest.raises(OptiqError, match="unrecognised multimodal layout.*fancy_vlm"):
        is_multimodal(odd)
    # a weight name the family table does not know is named, not guessed
    bad = multimodal_checkpoint(tmp_path / "b", "gemma3")
    w = mx.load(str(bad / "model.safetensors"))
    w["audio_tower.conv.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    with pytest.raises(OptiqError, match="unrecognised weight 'audio_tower.conv.weight'"):
        strip(bad, tmp_path / "bad-out")
    assert not (tmp_path / "bad-out").exists()
