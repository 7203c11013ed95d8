"""The KV path on tiny llama, qwen3_5 (hybrid) and gemma3 (sliding-window) models."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate
from mlx_lm.models.cache import make_prompt_cache

from optiq.calibration import sample_tokens
from optiq.cli import main as cli
from optiq.kv import PlannedKVCache, cache_layers, make_kv_cache, measure_kv, plan_kv, read_kv_config
from optiq.kv.sensitivity import run_with_cache
from optiq.records import Candidate
from optiq.source import load_reference
from conftest import build_model


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory):
    """Tiny models whose head dimension (32) admits MLX's smallest group size."""
    root = tmp_path_factory.mktemp("kv")
    return {
        "llama": build_model(root / "llama", "llama", hidden_size=128),
        "qwen3_5": build_model(root / "qwen3_5", "qwen3_5", head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32),
    }


def test_hybrid_model_plans_only_full_attention_layers_by_true_index(kv_models, tmp_path):
    loaded = load_reference(kv_models["qwen3_5"])
    layers = cache_layers(loaded.model)
    assert [i for i, _ in layers] == [1, 3]  # full_attention_interval=2: layers 1 and 3
    out = tmp_path / "kv"
    assert cli(["kv-cache", str(kv_models["qwen3_5"]), "-o", str(out), "--n-calibration", "2", "--seq-len", "24", "--candidate-bits", "4,8", "--target-bits", "6", "--group-size", "32", "--quiet"]) == 0
    config = json.loads((out / "kv_config.json").read_text())
    assert [e["layer_idx"] for e in config] == [1, 3]
    plan = read_kv_config(out / "kv_plan.json")
    assert plan.skipped_layers == (0, 2) and plan.average_bits <= 6 + 1e-9


def test_kv_table_more_bits_less_kl_and_exact_budget(kv_models):
    loaded = load_reference(kv_models["llama"])
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 2, 24, seed=3)
    table = measure_kv(loaded.model, tokens, [Candidate(b, 32) for b in (2, 4, 8)], progress=False)
    for layer in table.layers:
        kl = dict(zip([c.bits for c in layer.candidates], layer.kl))
        assert kl[2] > kl[8] >= 0 and kl[16] == 0.0
    plan = plan_kv(table, 4.0, n_layers=3)
    assert plan.average_bits <= 4.0 + 1e-9
    assert plan.effective_bits > plan.average_bits  # scales and biases cost extra


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_planned_cache_at_8_bits_generates_like_the_unquantized_cache(kv_models, arch):
    loaded = load_reference(kv_models[arch])
    model, tok = loaded.model, loaded.tokenizer
    layers = [i for i, kind in cache_layers(model) if kind == "full"]
    from optiq.kv.plan import KVPlan

    plan = KVPlan(layers=[{"layer_idx": i, "bits": 8, "group_size": 32} for i in layers], target_bits=8, average_bits=8, effective_bits=9, predicted_kl=0.0)
    tokens = mx.array(sample_tokens(model, tok, 1, 40, seed=4))
    ref = run_with_cache(model, tokens, make_prompt_cache(model), 20)
    caches = make_kv_cache(model, plan, start=8)
    got = run_with_cache(model, tokens, caches, 20)
    assert all(c.quantized for c in caches if isinstance(c, PlannedKVCache))
    from optiq import metrics

    kl = metrics.token_kl(metrics.reference_from_logits(ref), got)
    assert float(mx.mean(kl)) < 2e-3, float(mx.mean(kl))
    assert (np.array(ref.argmax(-1)) == np.array(got.argmax(-1))).mean() > 0.95
    # and mlx-lm's own generate takes the per-layer cache list as its prompt cache
    text = generate(model, tok, "The quick brown", max_tokens=5, prompt_cache=make_kv_cache(model, plan))
    assert isinstance(text, str)


def test_planned_cache_stays_full_precision_until_start():
    cache = PlannedKVCache(4, 32, start=10)
    k = mx.zeros((1, 2, 6, 32))
    cache.update_and_fetch(k, k)
    assert not hasattr(cache, "bits") and not cache.quantized
    cache.update_and_fetch(k, k)  # offset 6 < 10: still full precision
    assert not cache.quantized
    cache.update_and_fetch(k[:, :, :1], k[:, :, :1])  # offset 12 >= 10: quantized from here
    assert cache.quantized and cache.bits == 4 and cache.offset == 13


def test_bad_kv_inputs(kv_models, tmp_path, capsys):
    src = str(kv_models["llama"])
    for args, words in [
        (["--candidate-bits", "7"], "candidate-bits"),
        (["--group-size", "48"], "group-size"),
        (["--prefill", "500"], "--prefill"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli(["kv-cache", src, "-o", str(tmp_path / "x"), *args])
        assert exc.value.code == 2 and words in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"nope": 1')
    from optiq.errors import OptiqError

    with pytest.raises(OptiqError, match="cannot read KV config"):
        read_kv_config(bad)
