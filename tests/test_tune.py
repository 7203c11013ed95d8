"""optiq tune: learned scales and biases over a written plan, on a tiny model."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from optiq.calibration import sample_tokens, with_sampled
from optiq.tune import TuneConfig, batch_rows, start, unfreeze_scales

TUNE = ["--n-calibration", "8", "--n-eval", "4", "--seq-len", "32", "--batch-size", "2", "--lr", "2e-3", "--top-k", "64"]


@pytest.fixture
def quantized(tiny_llama_3bpw):
    return tiny_llama_3bpw


def weights(folder) -> dict:
    model, _ = mlx_lm.load(str(folder))  # stock mlx-lm, no optiq import needed to open it
    return {k: np.array(v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in tree_flatten(model.parameters())}


def interrupt_after(monkeypatch, last: int):
    """optiq tune stopped (KeyboardInterrupt) once step `last` is done; returns the real tune_steps."""
    import optiq.commands.tune as tune_cmd

    real = tune_cmd.tune_steps

    def stopping_run(*args, **kw):
        on_step = args[-1]

        def stopping(step, *rest):
            on_step(step, *rest)
            if step == last:
                raise KeyboardInterrupt
        return real(*args[:-1], stopping, **kw)

    monkeypatch.setattr(tune_cmd, "tune_steps", stopping_run)
    return real


def test_tuning_lowers_held_out_kl_and_keeps_the_codes(quantized, tmp_path, capsys):
    from optiq.cli import main as cli

    out = tmp_path / "tuned"
    assert cli(["tune", str(quantized), "-o", str(out), "--steps", "24", *TUNE]) == 0
    tuning = json.loads((out / "optiq_metadata.json").read_text())["tuning"]
    assert tuning["held_out_after"]["kl_mean"] < 0.9 * tuning["held_out_before"]["kl_mean"], tuning
    assert tuning["temperature"] == 2.0 and tuning["lr"] == 2e-3
    assert len(tuning["losses"]) == 24 and not (tmp_path / "tuned.partial").exists()
    assert json.loads((out / "config.json").read_text())["quantization"] == json.loads((quantized / "config.json").read_text())["quantization"]
    before, after = weights(quantized), weights(out)
    assert before.keys() == after.keys()
    moved = [k for k in before if k.endswith((".scales", ".biases")) and not np.array_equal(before[k], after[k])]
    assert moved and all(np.array_equal(before[k], after[k]) for k in before if k.endswith(".weight"))  # codes as written
    assert "held-out KL" in capsys.readouterr().out


def test_a_stopped_run_resumes_to_the_same_result(quantized, tmp_path, monkeypatch):
    import optiq.commands.tune as tune_cmd
    from optiq.cli import main as cli

    whole = tmp_path / "whole"
    assert cli(["tune", str(quantized), "-o", str(whole), "--steps", "4", *TUNE]) == 0
    real = interrupt_after(monkeypatch, 2)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        cli(["tune", str(quantized), "-o", str(resumed), "--steps", "4", "--steps-per-save", "1", *TUNE])
    assert (tmp_path / "resumed.partial" / "tune_state.safetensors").exists() and not resumed.exists()
    monkeypatch.setattr(tune_cmd, "tune_steps", real)
    assert cli(["tune", str(quantized), "-o", str(resumed), "--steps", "4", *TUNE]) == 0
    assert json.loads((resumed / "optiq_metadata.json").read_text())["tuning"]["resumed_from"] == 2
    a, b = weights(whole), weights(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_depend_only_on_seed_and_step():
    rows = [batch_rows(10, 3, 7, s).tolist() for s in range(6)]
    assert rows == [batch_rows(10, 3, 7, s).tolist() for s in range(6)]
    assert sorted(sum(rows[:3], [])) == sorted(set(sum(rows[:3], [])))  # one epoch: no row twice


def test_bad_tune_input_is_refused_before_loading(model_factory, quantized, tmp_path, capsys):
    from optiq.commands.tune import main

    float_model = str(model_factory("llama"))
    cases = [
        ([float_model, "-o", str(tmp_path / "a")], "is not quantized"),
        ([str(quantized), "-o", str(tmp_path / "a"), "--steps", "0"], "at least 1"),
        ([str(quantized), "-o", str(tmp_path / "a"), "--lr", "-1"], "--lr and --temperature must be positive"),
        ([str(quantized), "-o", str(tmp_path / "a"), "--temperature", "0"], "--lr and --temperature must be positive"),
        ([str(quantized), "-o", str(tmp_path / "a"), "--calibration", str(tmp_path / "none.txt")], "--calibration"),
        ([str(quantized), "-o", str(tmp_path / "a"), "--reference", str(tmp_path / "nope")], "reference model"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(args)
        assert exit.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "a").exists()


def test_temperature_reaches_the_loss(quantized, tmp_path):
    from optiq.cli import main as cli

    tuned = {}
    for t in ("1", "4"):
        assert cli(["tune", str(quantized), "-o", str(tmp_path / t), "--steps", "2", "--temperature", t, *TUNE]) == 0
        tuned[t] = weights(tmp_path / t)
    assert any(not np.array_equal(tuned["1"][k], tuned["4"][k]) for k in tuned["1"] if k.endswith(".scales"))


def test_max_bits_decides_which_layers_train(quantized):
    model = mlx_lm.load(str(quantized))[0]
    bits = {m.bits for _, m in model.named_modules() if hasattr(m, "bits")}
    assert unfreeze_scales(model, max_bits=min(bits)) == 0  # nothing strictly below the lowest width
    assert unfreeze_scales(model, max_bits=max(bits) + 1) > 0


def test_cosine_schedule_decays_to_zero_at_the_last_step():
    model = nn.QuantizedLinear(64, 8, bias=False, group_size=32, bits=4)
    params, opt = start(model, TuneConfig(steps=10, lr=1e-3, schedule="cosine"))
    opt.state["step"] = mx.array(10)  # Adam sets its rate from the step on the next update
    opt.apply_gradients(tree_map(mx.zeros_like, params), params)
    assert abs(float(opt.learning_rate)) < 1e-9
    _, const = start(model, TuneConfig(steps=10, lr=1e-3))
    assert float(const.learning_rate) == pytest.approx(1e-3)
    with pytest.raises(ValueError):
        start(model, TuneConfig(schedule="linear"))


def test_self_sampled_windows_join_the_calibration_and_repeat_neither_stream(model_factory):
    model, tokenizer = mlx_lm.load(str(model_factory("llama")))
    calibration = sample_tokens(model, tokenizer, 4, 16, seed=0)
    mixed = with_sampled(calibration, model, tokenizer, 3, seed=0, batch_size=2)
    assert mixed.shape == (7, 16) and np.array_equal(mixed[:4], calibration)
    held_out = sample_tokens(model, tokenizer, 3, 16, seed=1)
    added = mixed[4:]
    assert not any(np.array_equal(a, b) for a in added for b in np.concatenate([calibration, held_out]))
    assert np.array_equal(added, with_sampled(calibration, model, tokenizer, 3, seed=0, batch_size=2)[4:])  # a function of the seed
    assert with_sampled(calibration, model, tokenizer, 0) is calibration


def test_tune_trains_on_the_mix_and_records_it(quantized, tmp_path):
    from optiq.cli import main as cli

    out = tmp_path / "mixed"
    assert cli(["tune", str(quantized), "-o", str(out), "--steps", "2", "--self-sampled", "3", "--sample-batch", "2", "--schedule", "cosine", *TUNE]) == 0
    tuning = json.loads((out / "optiq_metadata.json").read_text())["tuning"]
    assert tuning["self_sampled"] == 3 and tuning["schedule"] == "cosine"


def test_a_checkpoint_of_other_settings_is_refused_before_loading(quantized, tmp_path, monkeypatch, capsys):
    import optiq.commands.tune as tune_cmd
    from optiq.cli import main as cli

    interrupt_after(monkeypatch, 1)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        cli(["tune", str(quantized), "-o", str(out), "--steps", "4", "--steps-per-save", "1", *TUNE])
    monkeypatch.setattr(tune_cmd, "load_reference", lambda *a: pytest.fail("loaded before refusing"))
    with pytest.raises(SystemExit) as exit:
        tune_cmd.main([str(quantized), "-o", str(out), "--steps", "4", *TUNE[:-4], "--lr", "1e-3", "--top-k", "64"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "other settings" in err and "lr 0.002 -> 0.001" in err and "--no-resume" in err


def test_norm_lr_trains_the_norms_and_only_them(quantized, tmp_path):
    from optiq.cli import main as cli

    for norm_lr in ("0", "1e-2"):
        assert cli(["tune", str(quantized), "-o", str(tmp_path / norm_lr), "--steps", "3", "--norm-lr", norm_lr, *TUNE]) == 0
    before, frozen, trained = weights(quantized), weights(tmp_path / "0"), weights(tmp_path / "1e-2")
    norms = [k for k in before if "norm" in k]
    assert norms and all(np.array_equal(before[k], frozen[k]) for k in norms)
    assert all(not np.array_equal(before[k], trained[k]) for k in norms)
    assert all(np.array_equal(before[k], trained[k]) for k in before if k.endswith(".weight") and "norm" not in k)  # codes as written
    assert json.loads((tmp_path / "1e-2" / "optiq_metadata.json").read_text())["tuning"]["norm_lr"] == 1e-2


def test_the_two_rates_reach_their_parameters_and_the_state_round_trips(quantized):
    from optiq.tune import restore, state_arrays

    model = mlx_lm.load(str(quantized))[0]
    config = TuneConfig(steps=4, lr=3e-6, norm_lr=1e-2)
    start_params, opt = start(model, config)
    params = opt.apply_gradients(tree_map(mx.ones_like, start_params), start_params)
    # Adam's first step is the same multiple of lr (sqrt(10) without bias correction) for every value: each group moves by its own rate
    was = dict(tree_flatten(start_params))
    moved = {k: float(mx.abs(v - was[k]).max()) for k, v in tree_flatten(params)}
    assert moved.keys() == was.keys()
    norms = [k for k in moved if k.endswith(".weight")]
    first = 10 ** 0.5
    assert norms and all(moved[k] == pytest.approx(first * 1e-2, rel=1e-3) for k in norms)
    assert all(moved[k] == pytest.approx(first * 3e-6, rel=1e-2) for k in moved if k.endswith((".scales", ".biases")))
    _, fresh = start(model, config)
    _, fresh, step = restore(state_arrays(params, opt, 1), fresh)
    saved, back = dict(tree_flatten(opt.state)), dict(tree_flatten(fresh.state))
    assert step == 1 and saved.keys() == back.keys()
    assert all(np.array_equal(np.array(saved[k]), np.array(back[k])) for k in saved)


def test_released_codes_compute_the_layer_and_settle_back_to_its_words(quantized):
    from optiq.source import to_fp32
    from optiq.tune import CodeTunedLinear, release_codes, settle_codes

    model = to_fp32(mlx_lm.load(str(quantized))[0])  # fp32: fp16 quantized_matmul on a CPU is off by percents
    x = mx.array(np.arange(24, dtype=np.int32).reshape(2, 12) % 50)
    before_logits, before = model(x), {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    n = release_codes(model)
    layers = [m for _, m in model.named_modules() if isinstance(m, CodeTunedLinear)]
    assert layers and n == sum(m.codes.size for m in layers)
    assert np.allclose(np.array(model(x)), np.array(before_logits), atol=1e-4)  # dense dequantized = quantized_matmul
    grads = nn.value_and_grad(model, lambda m, x: m(x).astype(mx.float32).sum())(model, x)[1]
    assert all(float(mx.abs(g).sum()) > 0 for k, g in tree_flatten(grads) if k.endswith(".codes"))  # straight through the rounding
    settle_codes(model)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert not any(isinstance(m, CodeTunedLinear) for _, m in model.named_modules())
    assert after.keys() == before.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_code_lr_flips_codes_and_the_written_model_holds_what_was_measured(quantized, tmp_path):
    from optiq.calibration import load_calibration
    from optiq.cli import main as cli
    from optiq.cpu import adapt_for_cpu
    from optiq.evaluate import quality, reference_batches
    from optiq.source import load_reference

    out = tmp_path / "codes"
    assert cli(["tune", str(quantized), "-o", str(out), "--steps", "12", "--code-lr", "0.2", *TUNE]) == 0
    tuning = json.loads((out / "optiq_metadata.json").read_text())["tuning"]
    assert tuning["code_lr"] == 0.2
    before, after = weights(quantized), weights(out)
    codes = [k for k in before if k.endswith(".weight") and "norm" not in k and before[k].dtype == np.uint32]
    flipped = [k for k in codes if not np.array_equal(before[k], after[k])]
    assert flipped and "model.embed_tokens.weight" not in flipped  # a tied table keeps its codes
    model = adapt_for_cpu(mlx_lm.load(str(out))[0])  # stock mlx-lm opens it; measured as tune measures on a CPU
    reference = load_reference(tuning["reference"])
    held = load_calibration(None, reference.tokenizer, reference.model, 4, 32, seed=1)  # tune's held-out windows
    measured = quality(model, held, reference_batches(reference.model, held, batch_size=4), batch_size=4)
    assert measured["kl_mean"] == pytest.approx(tuning["held_out_after"]["kl_mean"], rel=1e-4)


def test_written_values_pack_a_latent_as_settle_does(quantized):
    from optiq.tune import settle_codes, written_values

    model = mlx_lm.load(str(quantized))[0]
    params, _ = start(model, TuneConfig(code_lr=1e-3))
    params = tree_map(lambda v: v + 0.7, params)  # every latent past a rounding boundary
    values = written_values(params, model)
    assert not any(k.endswith(".codes") for k in values)
    model.update(params)
    settle_codes(model)
    held = dict(tree_flatten(model.parameters()))
    packed = [k for k in values if k.endswith(".weight")]
    assert packed and all(np.array_equal(np.array(values[k]), np.array(held[k])) for k in packed)


def test_resume_settings_keep_a_hub_id_as_given_and_resolve_a_folder(tmp_path, monkeypatch):
    """A Hub repo id is not a path: resolving it would tie a checkpoint to the cwd it was made in."""
    from optiq.commands.tune import TuneOptions, run_settings

    opts = TuneOptions(model=str(tmp_path), output=str(tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    by_id = run_settings(opts, tmp_path, "HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "ref").mkdir()
    by_folder = run_settings(opts, tmp_path, "ref")
    assert by_id["reference"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert by_folder["reference"] == str((tmp_path / "ref").resolve())
