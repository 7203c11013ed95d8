"""Adapters started from the quantization residual (LoftQ) and the by_error
rank rule: the start is the best rank-r fit of what quantization lost, the
rule spends exactly its budget, and the trained output is a normal adapter."""

import json

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest

from optiq.lora.plan import plan_lora, spend_on_residual
from optiq.lora.residual import dequantized_weight, layer_residuals, plan_from_residual, start_from_residual
from optiq.records import LoRAModule, LoRAPlan
from optiq.lora.train import apply_plan, reference_linears, target_dims
from test_lora import write_data

TARGETS = ("q_proj", "v_proj", "down_proj")


def quantized_copy(folder):
    model, tok = mlx_lm.load(str(folder))
    nn.quantize(model, group_size=32, bits=2)  # a coarse grid: a large residual
    return model, tok


def effective_weight(layer) -> np.ndarray:
    """(out, in) weight of a LoRALinear: base + scale * (a @ b)^T."""
    w = np.array(dequantized_weight(layer.linear), dtype=np.float64)
    return w + layer.scale * (np.array(layer.lora_a, dtype=np.float64) @ np.array(layer.lora_b, dtype=np.float64)).T


def test_the_residual_start_is_the_best_rank_r_fit(tiny_llama):
    model, _ = quantized_copy(tiny_llama)
    dims = target_dims(model, TARGETS)
    reference = reference_linears(tiny_llama, dims)
    plan, factors = plan_from_residual(model, dims, reference, "residual", 3, "constant")
    apply_plan(model, plan)
    held = 1 - start_from_residual(model, plan, factors)
    assert plan.init == "residual" and 0 < held < 1
    modules = dict(model.named_modules())
    for m in plan.modules:
        w_ref = np.array(reference[m.path], dtype=np.float64)
        residual = w_ref - np.array(dequantized_weight(modules[m.path].linear), dtype=np.float64)
        s = np.linalg.svd(residual, compute_uv=False)
        left = np.sum((w_ref - effective_weight(modules[m.path])) ** 2)
        # Eckart-Young: what a rank-r start leaves is the tail of the spectrum, and no less
        assert left == pytest.approx(np.sum(s[m.rank :] ** 2), rel=1e-3), m.path
        assert left < np.sum(s**2)


def test_a_full_rank_start_gives_back_the_reference_outputs(tiny_llama):
    model, _ = mlx_lm.load(str(tiny_llama))
    ref_model, _ = mlx_lm.load(str(tiny_llama))
    dims = target_dims(model)
    nn.quantize(model, group_size=32, bits=2, class_predicate=lambda path, _: path in dims)  # only what the adapters cover
    factors = {f.path: f for f in layer_residuals(model, reference_linears(tiny_llama, dims), dims, keep=10**6)}
    plan = LoRAPlan([LoRAModule(p, min(d), 2.0 * min(d), *d) for p, d in dims.items()], init="residual")
    x = mx.array([[1, 5, 9, 22, 7, 30]])
    before = np.abs(np.array(model(x)) - np.array(ref_model(x))).max()
    apply_plan(model, plan)
    assert start_from_residual(model, plan, factors) < 1e-9
    after = np.abs(np.array(model(x)) - np.array(ref_model(x))).max()
    assert after < 1e-3 < before


def test_by_error_spends_the_budget_on_the_largest_residual_directions(tiny_llama):
    model, _ = quantized_copy(tiny_llama)
    dims = target_dims(model, TARGETS)
    plan, factors = plan_from_residual(model, dims, reference_linears(tiny_llama, dims), "residual", 4, "by_error")
    constant = plan_lora(dims, 4)
    assert plan.trainable_params <= constant.trainable_params
    assert constant.trainable_params - plan.trainable_params < max(sum(d) for d in dims.values())
    assert len({m.rank for m in plan.modules}) > 1
    # against constant rank at the same budget, the start leaves less of the residual
    left = lambda p: sum(factors[m.path].left_over(m.rank) for m in p.modules)  # noqa: E731
    assert left(plan) <= left(constant)


def test_spend_on_residual_matches_the_optimum_when_costs_are_equal():
    rng = np.random.default_rng(0)
    paths = [f"m{i}" for i in range(5)]
    dims = {p: (16, 16) for p in paths}
    spectra = {p: np.sort(rng.gamma(1.0, size=16))[::-1] for p in paths}
    ranks = spend_on_residual(paths, dims, spectra, budget=32 * 14, max_rank=8)
    # equal costs: the optimum keeps the 14 largest sigma^2 overall (5 forced at rank 1)
    chosen = sorted(((spectra[p][k] ** 2, p) for p in paths for k in range(1, 8)), reverse=True)[: 14 - 5]
    expect = {p: 1 + sum(1 for _, q in chosen if q == p) for p in paths}
    assert ranks == expect


def test_train_by_error_from_the_residual_then_serve_it(model_factory, tiny_llama_3bpw, tmp_path, capsys):
    from optiq.cli import main as cli
    from optiq.lora import AdapterSelector, mount, read_adapter

    src = model_factory("llama")
    model_dir = tiny_llama_3bpw
    data = write_data(tmp_path / "data", "chat")
    outs = {}
    for init in ("zero", "residual"):
        outs[init] = tmp_path / f"adapter-{init}"
        assert cli(["lora", "train", str(model_dir), "--data", str(data), "-o", str(outs[init]), "--rank", "4", "--rank-scaling", "by_error",
                    "--init", init, "--target-modules", ",".join(TARGETS), "--iters", "2", "--batch-size", "2", "--steps-per-eval", "2",
                    "--val-batches", "2", "--lr", "1e-6"]) == 0
    assert "of its energy held" in capsys.readouterr().out
    plan = json.loads((outs["residual"] / "optiq_lora_config.json").read_text())
    assert plan["scaling"] == "by_error" and plan["init"] == "residual"
    # the written PEFT files carry the residual fit (two tiny steps later) ...
    written = read_adapter(outs["residual"])
    base, _ = mlx_lm.load(str(model_dir))
    reference = reference_linears(src, dims := target_dims(base, TARGETS))
    modules = dict(base.named_modules())
    for m in plan["modules"]:
        a, b, scale = written.modules[m["path"]]
        residual = np.array(reference[m["path"]], dtype=np.float64) - np.array(dequantized_weight(modules[m["path"]]), dtype=np.float64)
        u, sv, vt = np.linalg.svd(residual, full_matrices=False)
        best = (u[:, : m["rank"]] * sv[: m["rank"]]) @ vt[: m["rank"]]
        fitted = scale * (np.array(a, dtype=np.float64) @ np.array(b, dtype=np.float64)).T
        assert np.linalg.norm(fitted - best) < 0.02 * np.linalg.norm(best), m["path"]
    assert sorted(written.ranks.items()) == sorted((m["path"], m["rank"]) for m in plan["modules"]) and len(dims) == len(plan["modules"])
    # ... and mount per request on the quantized base like any adapter
    selector = AdapterSelector()
    mount(base, "mine", written, selector)
    x = mx.array([[1, 5, 9, 22, 7]])
    plain = base(x)
    selector.active = "mine"
    assert not mx.allclose(base(x), plain, atol=1e-3).item()


def test_by_error_without_a_reference_is_refused_first(model_factory, tmp_path, capsys):
    from optiq.commands.lora import main

    src = str(model_factory("llama"))
    data = write_data(tmp_path / "d")
    for args, message in ((["--rank-scaling", "by_error"], "needs --reference"), (["--init", "residual", "--reference", str(tmp_path / "nope")], "reference model")):
        with pytest.raises(SystemExit) as exit:
            main(["train", src, "--data", str(data), "-o", str(tmp_path / "a"), *args])
        assert exit.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "a").exists()
