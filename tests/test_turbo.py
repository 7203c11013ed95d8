"""TurboQuant KV on tiny models: attention in the rotated space equals attention
over the dequantized cache, generation, state round trips, the planner's
family choice and the seed's import path."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

from optiq import turboquant as turbo
from optiq.kv.sensitivity import run_with_cache
from optiq.kv.caches import make_turbo_cache
from optiq.kv.turbo_cache import TurboQuantKVCache, turbo_attention
from conftest import build_model


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("turbo") / "llama", "llama", hidden_size=128)
    model, tok = mlx_lm.load(str(folder))
    return folder, model, tok


def dequantized_attention(queries, cache, scale, mask):
    """Reference: dequantize keys and values fully, then mlx's own attention."""
    H, d = cache.keys.shape[1], queries.shape[-1]
    rk, rv = cache._rotations(H, d)
    o = cache.offset
    keys = turbo.dequantize_mse(cache.keys[:, :, :o], cache.key_norms[:, :, :o].astype(mx.float32), rk[None], cache.turbo_bits)
    values = turbo.dequantize_mse(cache.values[:, :, :o], cache.value_norms[:, :, :o].astype(mx.float32), rv[None], cache.turbo_bits)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 3, 40])  # decode (bit planes / gather) and prefill (gather) paths
def test_rotated_space_attention_equals_attention_over_dequantized_kv(bits, L):
    mx.random.seed(bits * 10 + L)
    B, H, rep, T, d = 1, 2, 3, 50, 64
    cache = TurboQuantKVCache(bits, seed=1, layer_idx=2)
    cache.update_and_fetch(mx.random.normal((B, H, T, d)), mx.random.normal((B, H, T, d)))
    q = mx.random.normal((B, H * rep, L, d))
    mask = "causal" if L > 1 else None
    ours = turbo_attention(q, cache, 0.125, mask)
    ref = dequantized_attention(q, cache, 0.125, mask)
    assert mx.allclose(ours, ref, atol=2e-4, rtol=1e-3).item()


def test_turbo_cache_generation_tracks_the_unquantized_cache_and_kl_falls_with_bits(llama32):
    _, model, tok = llama32
    tokens = mx.array([tok.encode("The quick brown fox jumps over the lazy dog. " * 4)[:48]])
    ref = run_with_cache(model, tokens, make_prompt_cache(model), 32)
    lr = ref - mx.logsumexp(ref, -1, keepdims=True)

    def kl(caches):
        out = run_with_cache(model, tokens, caches, 32)
        lp = out - mx.logsumexp(out, -1, keepdims=True)
        return mx.mean(mx.sum(mx.exp(lr) * (lr - lp), -1)).item()

    kls = [kl(make_turbo_cache(model, bits)) for bits in (1, 2, 3, 4)]
    affine3 = kl([QuantizedKVCache(32, 3) for _ in model.layers])
    assert kls == sorted(kls, reverse=True), kls
    # A sanity bound only: random tiny models have isotropic keys, where rotation
    # gains nothing; the real comparison is benchmarks/turbo.py on SmolLM2.
    assert kls[3] < affine3 and kls[3] < kls[0] / 5, (kls, affine3)


def test_generate_runs_with_a_turbo_prompt_cache(llama32):
    _, model, tok = llama32
    caches = make_turbo_cache(model, 3)
    text = mlx_lm.generate(model, tok, "A stitch in time", max_tokens=8, prompt_cache=caches)
    assert isinstance(text, str)
    assert all(isinstance(c, TurboQuantKVCache) for c in caches) and caches[0].offset > 0
    assert caches[0].bits_per_element == pytest.approx(3 + 16 / 32)


def test_state_round_trips_through_mlx_lm_prompt_cache_files(llama32, tmp_path):
    _, model, tok = llama32
    caches = make_turbo_cache(model, 3)
    model(mx.array([tok.encode("Numbers like 12, 345 and 6789")]), cache=caches)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), caches)
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    nxt = mx.array([[5]])
    a = model(nxt, cache=caches)
    b = model(nxt, cache=loaded)
    assert all(type(c) is TurboQuantKVCache for c in loaded)
    assert mx.allclose(a, b, atol=1e-5).item()
    # trimming drops tokens like mlx-lm's caches
    assert loaded[0].trim(2) == 2 and loaded[0].offset == caches[0].offset - 2


def test_seed_import_path():
    from optiq.core.turbo_kv_cache import TurboQuantKVCache as Seed

    assert Seed is TurboQuantKVCache


def test_kv_cache_command_chooses_between_affine_and_turbo(llama32, tmp_path, capsys):
    folder, _, _ = llama32
    out = tmp_path / "plan"
    from optiq.commands.kv_cache import main

    assert main([str(folder), "--target-bits", "3.5", "--candidate-bits", "2,4,8", "--turbo-bits", "2,3", "--group-size", "32",
                 "--n-calibration", "1", "--seq-len", "40", "-o", str(out), "--quiet"]) == 0
    entries = json.loads((out / "kv_config.json").read_text())
    plan = json.loads((out / "kv_plan.json").read_text())
    assert plan["average_bits"] <= 3.5 + 1e-9
    assert {e.get("mode", "affine") for e in entries} <= {"affine", "turbo"}
    from optiq.kv import make_kv_cache

    caches = make_kv_cache(llama32[1], entries)
    for e in entries:
        kind = TurboQuantKVCache if e.get("mode") == "turbo" else None
        if kind:
            assert isinstance(caches[e["layer_idx"]], kind)
    with pytest.raises(SystemExit):
        main([str(folder), "--turbo-bits", "5", "-o", str(tmp_path / "bad")])
    assert "--turbo-bits" in capsys.readouterr().err


def test_measure_kv_offers_turbo_candidates_per_layer(llama32):
    from optiq.kv import measure_kv
    from optiq.records import Candidate

    _, model, tok = llama32
    tokens = [tok.encode("The quick brown fox jumps over the lazy dog. " * 3)[:32]]
    table = measure_kv(model, tokens, [Candidate(4, 32), Candidate(2, 0, "turbo"), Candidate(4, 0, "turbo")], prefill=24)
    for layer in table.layers:
        turbo_kl = {c.bits: kl for c, kl in zip(layer.candidates, layer.kl) if c.mode == "turbo"}
        assert set(turbo_kl) == {2, 4}
        assert all(c.group_size == 32 for c in layer.candidates if c.mode == "turbo")  # the head dimension
        assert turbo_kl[2] > turbo_kl[4] > 0
