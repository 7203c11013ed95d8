"""Larger than memory: the sensitivity pass with blocks streamed from disk
gives the in-memory pass's table while holding a fraction of the weights."""

import mlx.core as mx
import numpy as np
import pytest

from optiq.calibration import sample_tokens
from optiq.records import Candidate
from optiq.probes import measure_weights
from optiq.source import load_reference
from optiq.stream import checkpoint_bytes_fp32, load_streamed
from conftest import build_model


def peak_added(run):
    """run()'s result and the peak memory it added above what was already
    resident (earlier tests in the same process leave arrays alive)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    result = run()
    return result, mx.get_peak_memory() - resident


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Weights dominate memory: 12 blocks of ~0.25M parameters, short calibration."""
    return build_model(tmp_path_factory.mktemp("stream") / "llama", "llama", hidden_size=128, intermediate_size=512, num_hidden_layers=12)


def test_streamed_sensitivity_equals_in_memory_under_a_budget(wide_llama):
    cands = [Candidate(2, 32), Candidate(8, 32)]
    loaded = load_reference(wide_llama)
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 2, 16, seed=1)
    table, memory_peak = peak_added(lambda: measure_weights(loaded.model, tokens, cands, batch_size=1, kl_stride=1))
    del loaded
    mx.clear_cache()

    streamed_loaded, streamed = load_streamed(wide_llama)
    streamed_table, peak = peak_added(lambda: measure_weights(streamed_loaded.model, tokens, cands, batch_size=1, kl_stride=1, streamed=streamed))

    budget = checkpoint_bytes_fp32(wide_llama) // 2  # half the model: in memory it cannot fit
    assert memory_peak > budget > peak, (memory_peak, budget, peak)
    assert [l.path for l in table.layers] == [l.path for l in streamed_table.layers]
    for a, b in zip(table.layers, streamed_table.layers):
        np.testing.assert_allclose(a.kl, b.kl, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(a.error, b.error, rtol=1e-4)


def test_convert_streams_a_model_larger_than_max_memory(wide_llama, tmp_path, capsys):
    """The same plan and the same written weights as the in-memory convert,
    with the peak under --max-memory; stock mlx-lm opens the (sharded) output."""
    from mlx_lm import load

    from optiq.cli import main as cli

    # 70% of the fp32 model: streaming is forced; the peak must stay under it
    # (the quantized output and the calibration's generation share the budget)
    budget_gb = checkpoint_bytes_fp32(wide_llama) * 0.7 / 2**30
    common = ["--target-bpw", "4.5", "--n-calibration", "2", "--gram-samples", "4", "--seq-len", "16", "--candidate-bits", "2,4,8", "--group-size", "32", "--measure", "all", "--quiet"]
    # streamed, the default quantizer is round-to-nearest (GPTQ holds whole layers)
    assert cli(["convert", str(wide_llama), "-o", str(tmp_path / "memory"), "--no-eval", "--quantizer", "rtn", *common]) == 0
    code, peak = peak_added(lambda: cli(["convert", str(wide_llama), "-o", str(tmp_path / "streamed"), "--max-memory", f"{budget_gb:.6f}", *common]))
    assert code == 0
    assert peak < budget_gb * 2**30, (peak, budget_gb * 2**30)
    import json

    meta = [json.loads((tmp_path / d / "optiq_metadata.json").read_text()) for d in ("memory", "streamed")]
    assert meta[1]["quantizer"] == "rtn"
    assert meta[0]["plan"]["assignments"] == meta[1]["plan"]["assignments"]
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1  # written a shard at a time
    a, _ = load(str(tmp_path / "memory"))
    b, _ = load(str(tmp_path / "streamed"))
    from mlx.utils import tree_flatten

    fa, fb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert fa.keys() == fb.keys()
    assert all(mx.array_equal(fa[k], fb[k]).item() for k in fa)
    with pytest.raises(SystemExit) as exc:
        cli(["convert", str(wide_llama), "-o", str(tmp_path / "x"), "--max-memory", "-1", *common])
    assert exc.value.code == 2 and "--max-memory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # below the resident parts plus one block: refused, nothing written
        cli(["convert", str(wide_llama), "-o", str(tmp_path / "y"), "--max-memory", "0.0001", *common])
    assert exc.value.code == 2 and "holds at least" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_kv_cache_streams_a_model_larger_than_max_memory(tmp_path):
    """optiq kv-cache with every forward streamed: the same plan, within the budget
    (weights wide enough to dominate the probes' preallocated 256-step caches)."""
    import json

    from optiq.cli import main as cli

    src = build_model(tmp_path / "llama", "llama", hidden_size=128, intermediate_size=1536, num_hidden_layers=8)  # head dim 32
    budget_gb = checkpoint_bytes_fp32(src) / 2 / 2**30
    common = ["--n-calibration", "2", "--seq-len", "16", "--candidate-bits", "2,8", "--split-bits", "", "--target-bits", "5", "--group-size", "32", "--quiet"]
    assert cli(["kv-cache", str(src), "-o", str(tmp_path / "memory"), *common]) == 0
    code, peak = peak_added(lambda: cli(["kv-cache", str(src), "-o", str(tmp_path / "streamed"), "--max-memory", f"{budget_gb:.6f}", *common]))
    assert code == 0 and peak < budget_gb * 2**30, (peak, budget_gb * 2**30)
    a, b = (json.loads((tmp_path / d / "kv_plan.json").read_text()) for d in ("memory", "streamed"))
    assert a["layers"] == b["layers"]
    assert abs(a["predicted_kl"] - b["predicted_kl"]) <= 1e-4 * abs(a["predicted_kl"])


def test_gram_only_sequences_add_to_the_grams_in_memory_and_streamed(wide_llama):
    """Gram-only sequences feed GPTQ's Hessians exactly as if they had been
    calibration sequences, in memory and streamed, while the probes (and the
    stored block inputs) stay on the calibration sequences."""
    from optiq.calibration import split_calibration
    from optiq.reference import reference_pass

    loaded = load_reference(wide_llama)
    every = sample_tokens(loaded.model, loaded.tokenizer, 5, 16, seed=3)
    probe, extra = split_calibration(every, 2)
    assert probe.shape[0] == 2 and extra.shape[0] == 3
    whole = reference_pass(loaded.model, every, 1)
    split = reference_pass(loaded.model, probe, 1, gram_tokens=extra)
    alone = reference_pass(loaded.model, probe, 1)
    assert len(split.block_inputs) == len(alone.block_inputs) == 2
    assert alone.probe(0) == pytest.approx(split.probe(0), abs=1e-9)
    streamed_loaded, streamed = load_streamed(wide_llama)
    on_disk = reference_pass(streamed_loaded.model, probe, 1, streamed=streamed, gram_tokens=extra)
    assert len(on_disk.block_inputs) == 2
    for path in whole.grams:
        want = np.array(whole.grams[path])
        assert not np.allclose(np.array(alone.grams[path]), want, rtol=1e-2)  # the extra tokens count
        np.testing.assert_allclose(np.array(split.grams[path]), want, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(np.array(on_disk.grams.get(path)), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.array(split.head_gram), np.array(whole.head_gram), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.array(on_disk.head_gram), np.array(whole.head_gram), rtol=1e-4, atol=1e-3)
