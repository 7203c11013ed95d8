"""Tiny random vision-language models in mlx-vlm's real layouts (config,
tokenizer trained here, image processor, weights) that stock mlx_vlm.load
opens: used by tests/test_vlm.py and, for a default model, benchmarks/vlm.py."""

import json

import mlx.core as mx

# The tokenizer's training text (not conftest's: importing conftest would
# point a benchmark's optiq cache at the tests' one).
TEXT = (
    "A red circle and two blue squares sit above the word cat. How many shapes are there? "
    "Which colour is the triangle? The answer is A, B, C or D. Describe this image in one sentence. "
) * 20

# Chat layouts as the real checkpoints spell them: Qwen2-VL's image is
# vision_start, image_pad, vision_end; Gemma 3's is start_of_image, which its
# processor expands into soft tokens.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer(folder, special, tokenizer_config, bos=None) -> dict:
    """A byte-level BPE trained here with the family's special tokens; {token: id}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT + " A B C D"], trainer=trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(tokenizer_config, tokenizer_class="PreTrainedTokenizerFast")))
    return dict({t: tok.token_to_id(t) for t in special}, vocab=tok.get_vocab_size())


def qwen2_vl(folder):
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    ids = build_tokenizer(folder, special, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE})
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(str(folder))
    text = {
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "vocab_size": ids["vocab"], "rope_theta": 10000.0, "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "max_position_embeddings": 4096,
    }
    config = dict(
        text, model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"], torch_dtype="float16",
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
        vision_config={"model_type": "qwen2_vl", "depth": 2, "embed_dim": 64, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
    )
    return config, config  # Qwen2-VL keeps its text settings at the top level


def gemma3(folder):
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    ids = build_tokenizer(
        folder, special,
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": GEMMA_TEMPLATE,
         "extra_special_tokens": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}},
        bos="<bos>",
    )
    Gemma3ImageProcessorPil(size={"height": 56, "width": 56}).save_pretrained(str(folder))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma3Processor", "image_seq_length": 4}))
    text = {
        "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 2, "head_dim": 32,
        "num_key_value_heads": 1, "query_pre_attn_scalar": 32, "sliding_window": 64, "sliding_window_pattern": 2, "vocab_size": ids["vocab"], "mm_tokens_per_image": 4,
    }
    return dict(
        model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], torch_dtype="bfloat16", vocab_size=ids["vocab"], mm_tokens_per_image=4,
        image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], text_config=text,
        vision_config={"model_type": "siglip_vision_model", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "patch_size": 14, "image_size": 56},
    ), text


def build_vlm(folder, family: str):
    """A random-weight model of mlx-vlm's `family` (config, tokenizer, image
    processor, weights), saved where stock mlx_vlm.load opens it."""
    import importlib

    from mlx.utils import tree_flatten, tree_map

    folder.mkdir(parents=True)
    config, text = {"qwen2_vl": qwen2_vl, "gemma3": gemma3}[family](folder)
    arch = importlib.import_module(f"mlx_vlm.models.{family}")
    args = arch.ModelConfig.from_dict(json.loads(json.dumps(config)))
    args.vision_config = arch.VisionConfig.from_dict(config["vision_config"])
    args.text_config = arch.TextConfig.from_dict(text)
    mx.random.seed(0)
    model = arch.Model(args)
    # Wider weights than the default init, as in conftest: peaked outputs make quantization visible.
    model.update(tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, model.parameters()))
    dtype = getattr(mx, config["torch_dtype"])
    mx.save_safetensors(str(folder / "model.safetensors"), {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
