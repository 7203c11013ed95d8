"""LoRA: plans, training on tiny models, PEFT files that the real peft library loads."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from optiq.lora.formats import write_peft
from optiq.lora.plan import plan_lora, signals_from
from optiq.lora.train import apply_plan, lora_weights, target_dims
from conftest import TEXT

FAST = ["--n-calibration", "2", "--seq-len", "32", "--kl-stride", "2", "--quiet"]


def write_data(folder, kind="chat", n=24):
    folder.mkdir(parents=True, exist_ok=True)
    words = TEXT.split()
    rows = []
    for i in range(n):
        q, a = " ".join(words[i : i + 6]), " ".join(words[i + 6 : i + 12])
        rows.append({"chat": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                     "completions": {"prompt": q, "completion": a}, "text": {"text": q + " " + a}}[kind])
    for name, part in (("train", rows[: n - 6]), ("valid", rows[n - 6 :])):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in part) + "\n")
    return folder


@pytest.fixture(scope="module")
def optiq_model(model_factory, tmp_path_factory):
    from optiq.cli import main as cli

    out = tmp_path_factory.mktemp("lora") / "optiq-model"
    assert cli(["convert", str(model_factory("llama")), "-o", str(out), "--target-bpw", "4.5", "--group-size", "32",
                "--candidate-bits", "2,4,8", *FAST]) == 0
    return out


def test_plan_rules():
    dims = {f"model.layers.{i}.self_attn.q_proj": (64, 64) for i in range(4)}
    bits = dict(zip(dims, [2, 4, 8, 16]))
    kl = dict(zip(dims, [0.01, 0.1, 1.0, 100.0]))
    assert [m.rank for m in plan_lora(dims, 8, "by_bits", *signals_from(bits=bits)).modules] == [4, 8, 16, 16]
    by_kl = [m.rank for m in plan_lora(dims, 8, "by_kl", *signals_from(kl=kl)).modules]
    assert by_kl == sorted(by_kl) and max(by_kl) <= 8 * 4 and min(by_kl) >= 2  # clipped at 4x and 1/4x
    plan = plan_lora(dims, 8, "by_kl", *signals_from(kl=kl), param_budget=4000)
    assert plan.trainable_params <= 4000 and plan.trainable_params > 4000 - 4 * 128
    assert all(m.alpha == 2.0 * m.rank for m in plan.modules)
    with pytest.raises(ValueError):
        plan_lora(dims, 8, "by_bits")  # no bits to scale by


def test_train_info_serve_chain_on_an_optiq_model(optiq_model, tmp_path, capsys):
    from optiq.cli import main as cli

    data = write_data(tmp_path / "data", "chat")
    out = tmp_path / "adapter"
    assert cli(["lora", "train", str(optiq_model), "--data", str(data), "-o", str(out), "--rank", "4",
                "--rank-scaling", "by_bits", "--iters", "6", "--batch-size", "2", "--steps-per-eval", "3", "--val-batches", "2"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    plan = json.loads((out / "optiq_lora_config.json").read_text())
    meta = json.loads((optiq_model / "optiq_metadata.json").read_text())
    bits = {p: c["bits"] for p, c in meta["plan"]["assignments"]}
    for m in plan["modules"]:  # rank follows the layer's bits
        assert m["rank"] == max(1, round(4 * min(bits[m["path"]], 8) / 4))
    assert config["peft_type"] == "LORA" and config["r"] in {m["rank"] for m in plan["modules"]}
    log = json.loads((out / "training_log.json").read_text())
    assert len(log["validation"]) >= 2 and all(np.isfinite(v["val_loss"]) for v in log["validation"])
    assert not (tmp_path / "adapter.partial").exists()
    capsys.readouterr()
    assert cli(["lora", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "by_bits" in info and f"{sum(m['rank'] * (m['in_dims'] + m['out_dims']) for m in plan['modules']):,}" in info
    # the server mounts it by name, and it changes the output against the base
    from optiq.commands.serve import ServeOptions, build_app

    app = build_app(ServeOptions(model=str(optiq_model), adapter=[f"mine={out}"], port=0))
    try:
        assert app.adapters == ("mine",)
    finally:
        app.engine.close()


def test_a_stopped_run_resumes_from_its_last_checkpoint(model_factory, tmp_path):
    from optiq.commands.lora import main
    from optiq.lora.train import load_datasets, train

    src = model_factory("llama")
    data = write_data(tmp_path / "data", "completions")
    out = tmp_path / "adapter"
    model, tok = mlx_lm.load(str(src))
    dims = target_dims(model, ("q_proj", "v_proj"))
    plan = plan_lora(dims, 4)
    apply_plan(model, plan)
    tr, va = load_datasets(data, tok, True)
    train(model, plan, tr, va, tmp_path / "adapter.partial", 4, 1e-4, 2, 128, 100, 2)  # "stopped" after 4 of 8
    assert main(["train", str(src), "--data", str(data), "-o", str(out), "--rank", "4", "--target-modules", "q_proj,v_proj",
                 "--iters", "8", "--batch-size", "2", "--steps-per-save", "2", "--steps-per-eval", "100"]) == 0
    assert json.loads((out / "training_log.json").read_text())["resumed_from"] == 4


def test_bad_lora_inputs_exit_2(model_factory, tmp_path, capsys):
    from optiq.commands.lora import main

    src = str(model_factory("llama"))
    cases = [
        (["train", src, "-o", str(tmp_path / "a")], "--data is required"),
        (["train", src, "--data", str(tmp_path / "none"), "-o", str(tmp_path / "a")], "is not a folder"),
        (["train", src, "--data", str(tmp_path), "-o", str(tmp_path / "a")], "has no train.jsonl"),
        (["train", src, "--data", str(write_data(tmp_path / "d")), "--rank-scaling", "by_kl", "-o", str(tmp_path / "a")], "optiq_metadata.json"),
        (["info", str(tmp_path / "missing")], "is not a folder"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(args)
        assert exit.value.code == 2 and message in capsys.readouterr().err, args
    assert main(["frobnicate"]) == 2
    assert not (tmp_path / "a").exists()


def mixed_rank_adapter(folder, tmp_path):
    """A random mixed-rank adapter on the fp32 tiny llama, in PEFT's layout."""
    model, _ = mlx_lm.load(str(folder))
    dims = target_dims(model, ("q_proj", "v_proj", "down_proj"))
    bits = {p: (8 if "v_proj" in p else 2 if "down" in p else 4) for p in dims}
    plan = plan_lora(dims, 4, "by_bits", *signals_from(bits=bits), base_model=str(folder))
    apply_plan(model, plan)
    mx.random.seed(3)
    for m in plan.modules:
        layer = dict(model.named_modules())[m.path]
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.2
    out = tmp_path / "peft"
    out.mkdir()
    write_peft(out, plan, lora_weights(model, plan), len(model.layers))
    return model, plan, out


def test_mlx_lm_export_loads_in_mlx_lm_with_the_same_outputs(model_factory, tmp_path):
    from optiq.commands.lora import main

    src = model_factory("llama")
    model, plan, peft_dir = mixed_rank_adapter(src, tmp_path)
    assert len({m.rank for m in plan.modules}) == 3
    assert main(["export", str(peft_dir), "-o", str(tmp_path / "mlx")]) == 0
    loaded, _ = mlx_lm.load(str(src), adapter_path=str(tmp_path / "mlx"))
    x = mx.array([[1, 5, 9, 22, 7]])
    assert mx.allclose(loaded(x), model(x), atol=1e-4).item()


def test_peft_loads_the_adapter_and_matches_mlx_logits(model_factory, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    src = model_factory("llama")
    model, plan, peft_dir = mixed_rank_adapter(src, tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(peft_dir))
    ids = [[1, 5, 9, 22, 7, 30, 2]]
    with torch.no_grad():
        theirs = tuned(torch.tensor(ids)).logits.numpy()
    from optiq.source import to_fp32

    ours = np.array(to_fp32(model)(mx.array(ids)))
    assert np.max(np.abs(theirs - ours)) < 1e-3
    # and every module got the rank our plan gave it
    for m in plan.modules:
        lora_a = dict(tuned.named_modules())[f"base_model.model.{m.path}"].lora_A["default"].weight
        assert lora_a.shape[0] == m.rank
