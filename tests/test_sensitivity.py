import mlx.core as mx
import numpy as np
import pytest

from optiq import metrics
from optiq.calibration import sample_tokens
from optiq.records import Candidate
from optiq.estimate import output_error, predict_kl
from optiq.model_tree import quantizable_layers, start_block
from optiq.probe_hooks import ProbeCache, cached
from optiq.probes import measure_weights, probe_one, rounding_for
from optiq.reference import ReferencePass, reference_pass
from optiq.rounding import fake_quantize
from optiq.source import load_reference

ARCHS = ["llama", "qwen3", "qwen3_5", "gemma3_text"]


@pytest.mark.parametrize("arch", ARCHS)
def test_probe_from_cached_block_matches_full_forward(model_factory, arch):
    loaded = load_reference(model_factory(arch))
    model = loaded.model
    tokens = sample_tokens(model, loaded.tokenizer, 3, 24, seed=1)
    cal = reference_pass(model, tokens, batch_size=2, kl_stride=1)
    n_blocks = len(cal.blocks)
    ref_logits = model(mx.array(tokens))
    ref = metrics.reference_from_logits(ref_logits)
    layers = quantizable_layers(model)
    # one layer per region: embedding, a middle block, the last block, the head
    picks = [layers[0], layers[len(layers) // 2], layers[-1]]
    for path, module in picks:
        original = module.weight
        module.weight = fake_quantize(original, Candidate(2, 16 if original.shape[-1] % 32 else 32))
        try:
            probed = cal.probe(start_block(path, n_blocks))
            full = float(mx.mean(metrics.token_kl(ref, model(mx.array(tokens)))))
        finally:
            module.weight = original
        assert full > 1e-6, f"{arch} {path}: 2-bit quantization should change the logits"
        assert probed == pytest.approx(full, rel=2e-3, abs=1e-6), (arch, path)


def test_kl_stride_measures_a_subset_of_positions(tiny_llama):
    loaded = load_reference(tiny_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 2, 32, seed=2)
    every = reference_pass(loaded.model, tokens, 2, kl_stride=1)
    fourth = reference_pass(loaded.model, tokens, 2, kl_stride=4)
    assert every.refs[0].top1.size == 2 * 32
    assert fourth.refs[0].top1.size == 2 * 8


def test_quantizable_layers_include_tied_embedding_once(model_factory):
    loaded = load_reference(model_factory("llama"))  # tied
    paths = [p for p, _ in quantizable_layers(loaded.model)]
    assert paths[0] == "model.embed_tokens"
    assert not any("lm_head" in p for p in paths)
    untied = load_reference(model_factory("qwen3"))
    paths = [p for p, _ in quantizable_layers(untied.model)]
    assert "lm_head" in paths and "model.embed_tokens" in paths


def test_qwen3_5_has_linear_attention_layers_planned(model_factory):
    loaded = load_reference(model_factory("qwen3_5"))
    paths = [p for p, _ in quantizable_layers(loaded.model)]
    assert any("linear_attn" in p for p in paths)
    assert any("self_attn" in p for p in paths)


def test_table_measures_every_candidate_and_more_bits_means_less_kl(tiny_llama):
    loaded = load_reference(tiny_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 4, 32, seed=3)
    cands = [Candidate(b, 32) for b in (2, 4, 8)]
    table = measure_weights(loaded.model, tokens, cands, anchors=None, kl_stride=2)
    assert len(table.layers) == len(quantizable_layers(loaded.model))
    for layer in table.layers:
        assert all(layer.measured)
        assert layer.kl[0] > layer.kl[2], layer.path  # 2-bit hurts more than 8-bit


def test_anchor_prediction_tracks_measurement(tiny_llama):
    """Predicted KL for unprobed candidates, checked against probing them."""
    loaded = load_reference(tiny_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 4, 32, seed=4)
    cands = [Candidate(b, 32) for b in (2, 3, 4, 5)]
    exact = measure_weights(loaded.model, tokens, cands, anchors=None, kl_stride=2)
    anchored = measure_weights(loaded.model, tokens, cands, anchors={3, 4}, kl_stride=2)
    for e, a in zip(exact.layers, anchored.layers):
        assert a.measured == (False, True, True, False)
        assert a.kl[1:3] == pytest.approx(e.kl[1:3])
    # unprobed 2- and 5-bit: within a factor of 3, and the same ranking of layers
    pred = np.array([a.kl[0] for a in anchored.layers] + [a.kl[3] for a in anchored.layers])
    true = np.array([e.kl[0] for e in exact.layers] + [e.kl[3] for e in exact.layers])
    ratio = pred / np.maximum(true, 1e-12)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.6)
    from scipy.stats import spearmanr

    assert spearmanr(pred, true).statistic > 0.8


def test_probe_cache_resumes_without_probing(tiny_llama, tmp_path, monkeypatch):
    loaded = load_reference(tiny_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 2, 16, seed=5)
    cands = [Candidate(4, 32)]
    cache = tmp_path / "probes.jsonl"
    first = measure_weights(loaded.model, tokens, cands, on_probe=cached(ProbeCache(cache)), kl_stride=1)
    calls = []
    monkeypatch.setattr(ReferencePass, "probe", lambda self, s: calls.append(s) or 0.0)
    again = measure_weights(loaded.model, tokens, cands, on_probe=cached(ProbeCache(cache)), kl_stride=1)
    assert calls == []
    assert [l.kl for l in again.layers] == [l.kl for l in first.layers]
    # a line cut short by an interruption is skipped, and that probe re-runs
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    measure_weights(loaded.model, tokens, cands, on_probe=cached(ProbeCache(cache)), kl_stride=1)
    assert len(calls) == 1


def test_predict_kl_power_law():
    errors = [8.0, 4.0, 2.0, 1.0]
    got = predict_kl(errors, [4.0, 2.0], [0.4, 0.1])  # alpha = 2
    assert got == pytest.approx([1.6, 0.4, 0.1, 0.025])
    one = predict_kl(errors, [2.0], [0.2])  # alpha = 1
    assert one == pytest.approx([0.8, 0.4, 0.2, 0.1])


def test_fake_quantize_matches_mlx_quantized_layer():
    import mlx.nn as nn

    mx.random.seed(0)
    layer = nn.Linear(128, 32)
    w = layer.weight
    q = nn.QuantizedLinear.from_linear(layer, group_size=64, bits=4)
    dq = mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=4)
    ours = fake_quantize(w, Candidate(4, 64))
    # equal up to the fp16 rounding of scales and biases that a saved model has
    assert float(mx.max(mx.abs(ours - dq))) < 1e-2 * float(mx.max(mx.abs(w)))


def test_proxy_estimator_ranks_layers_like_the_probes(tiny_llama):
    from scipy.stats import spearmanr

    loaded = load_reference(tiny_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 4, 32, seed=6)
    cands = [Candidate(b, 32) for b in (2, 3, 4)]
    exact = measure_weights(loaded.model, tokens, cands, anchors=None, kl_stride=2)
    proxy = measure_weights(loaded.model, tokens, cands, anchors=set(), kl_stride=2)
    assert proxy.method.startswith("proxy") and not any(any(l.measured) for l in proxy.layers)
    e = np.array([l.kl for l in exact.layers]).ravel()
    p = np.array([l.kl for l in proxy.layers]).ravel()
    # a weak but real signal: the proxy knows bits and inputs, not the downstream gain
    assert spearmanr(e, p).statistic > 0.5


def test_a_probes_gptq_error_is_kept_and_equals_the_slabbed_one(tiny_llama):
    """A GPTQ probe keeps its layer's output error for the table instead of
    running GPTQ again; the kept number is the one output_error computes."""
    loaded = load_reference(tiny_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 2, 16, seed=4)
    cal = reference_pass(loaded.model, tokens, 2, kl_stride=1)
    rounding = rounding_for(cal, "gptq")
    c = Candidate(4, 32)
    for path, module in [cal.layers[0], cal.layers[3]]:  # the tied embedding (head Gram) and a Linear
        assert rounding.uses_gptq(path, module, c)
        fresh = output_error(path, module, c, rounding, cal.token_counts)
        _, kept = probe_one(cal, rounding, path, module, c)
        assert kept == pytest.approx(fresh, rel=1e-4)
