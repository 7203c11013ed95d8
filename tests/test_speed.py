"""Decode time as a planning budget (optiq.speed, `optiq convert --no-slower-than`) on tiny models."""

import json

import pytest
from conftest import build_model
from mlx_lm import load

from optiq.cli import main as cli
from optiq.errors import OptiqError
from optiq.records import BitPlan, Candidate, SensitivityTable, candidate_from_key
from optiq.speed import (
    KernelTimes,
    layer_seconds,
    layer_shapes,
    measure_kernel_times,
    missing_times,
    plan_seconds,
)

FAST = ["--n-calibration", "3", "--seq-len", "32", "--kl-stride", "2", "--no-eval", "--quiet"]
SPEED = ["--candidate-bits", "2,4,8", "--group-sizes", "32,64"]


def convert(*args):
    return cli(["convert", *map(str, args)])


def meta(out):
    return json.loads((out / "optiq_metadata.json").read_text())


def test_candidate_keys_parse_back():
    for c in (Candidate(4, 64), Candidate(8, 128), Candidate(4, 32, "mxfp4"), Candidate(4, 16, "nvfp4"), Candidate(16, 64)):
        assert candidate_from_key(c.key) == c
    for bad in ("4at64", "4", "mxfp4@64", "@64", "0@64"):
        with pytest.raises(ValueError, match="not a format"):
            candidate_from_key(bad)


def test_kernel_times_cover_every_fitting_pair_and_round_trip():
    cands = (Candidate(4, 32), Candidate(4, 64), Candidate(8, 32), Candidate(16, 64))
    times = measure_kernel_times([(64, 96), (32, 64), (64, 96)], cands, repeats=2)
    got = {(t.shape, t.candidate.key) for t in times.times}
    # 96 inputs take groups of 32, not 64; the float weight fits everything
    assert got == {((64, 96), "4@32"), ((64, 96), "8@32"), ((64, 96), "16@64"), ((32, 64), "4@32"), ((32, 64), "4@64"), ((32, 64), "8@32"), ((32, 64), "16@64")}
    assert all(t.seconds > 0 for t in times.times)
    assert KernelTimes.from_dict(json.loads(json.dumps(times.to_dict()))) == times
    assert missing_times(times, {"a": (64, 96), "b": None}, cands) == []
    assert missing_times(times, {"a": (64, 96)}, cands + (Candidate(5, 32),)) == [((64, 96), "5@32")]
    # (batch, in) rows by default, as optiq serve multiplies them; stock mlx-lm's (batch, 1, in) on request, and recorded
    assert times.rows_folded and KernelTimes.from_dict({k: v for k, v in times.to_dict().items() if k != "rows_folded"}).rows_folded
    tokens = measure_kernel_times([(32, 64)], (Candidate(4, 32),), batch=3, repeats=2, rows_folded=False)
    assert not tokens.rows_folded and not KernelTimes.from_dict(json.loads(json.dumps(tokens.to_dict()))).rows_folded


def test_layer_shapes_follow_what_a_decode_step_multiplies(model_factory):
    tied, _ = load(str(model_factory("llama")))
    untied, _ = load(str(model_factory("qwen3")))
    tied_shapes, untied_shapes = layer_shapes(tied), layer_shapes(untied)
    # a tied embedding is the output head's matmul; an untied one is a row gather
    assert tied_shapes["model.embed_tokens"] == tuple(tied.model.embed_tokens.weight.shape)
    assert untied_shapes["model.embed_tokens"] is None
    assert untied_shapes["lm_head"] == tuple(untied.lm_head.weight.shape)
    assert tied_shapes["model.layers.0.mlp.down_proj"] == tuple(tied.model.layers[0].mlp.down_proj.weight.shape)
    experts, _ = load(str(model_factory("mixtral")))
    with pytest.raises(OptiqError, match="dense layers only"):
        layer_shapes(experts)


@pytest.fixture(scope="module")
def timed(model_factory, tmp_path_factory):
    """A convert held to uniform 4@64's decode time, the kernel times measured here."""
    src = model_factory("llama")
    out = tmp_path_factory.mktemp("speed") / "timed"
    assert convert(src, "-o", out, "--target-bpw", "5.0", *SPEED, "--no-slower-than", "4@64", *FAST) == 0
    return src, out


def test_the_plan_meets_its_time_budget_by_the_times_it_records(timed):
    src, out = timed
    m = meta(out)
    plan, table = BitPlan.from_dict(m["plan"]), SensitivityTable.from_dict(m["sensitivity"])
    times = KernelTimes.from_dict(m["kernel_times"])
    model, _ = load(str(src))
    seconds = layer_seconds(times, layer_shapes(model), table)
    assert plan.predicted_seconds == pytest.approx(plan_seconds(seconds, table, plan))
    assert plan.predicted_seconds <= plan.seconds_budget * (1 + 1e-9)
    assert plan.effective_bpw <= 5.0 + 1e-9
    config = json.loads((out / "config.json").read_text())["quantization"]
    for path, c in plan.assignments:  # the written model holds what was planned and timed
        assert config[path] == {"group_size": c.group_size, "bits": c.bits, "mode": "affine"}


def test_kernel_times_from_elsewhere_drive_the_plan(timed, tmp_path):
    """Times where every format but 4@64 is 10x slower leave a plan that is
    uniform 4@64, whatever spare bits the target gives; without the budget
    the same table spends them on wider layers."""
    src, out = timed
    times = meta(out)["kernel_times"]
    for t in times["times"]:
        t["seconds"] = 1.0 if Candidate.from_dict(t["candidate"]) == Candidate(4, 64) else 10.0
    fake = tmp_path / "times.json"
    fake.write_text(json.dumps(times))
    held, free = tmp_path / "held", tmp_path / "free"
    assert convert(src, "-o", held, "--target-bpw", "5.0", *SPEED, "--no-slower-than", "4@64", "--kernel-times", fake, *FAST) == 0
    assert convert(src, "-o", free, "--target-bpw", "5.0", *SPEED, *FAST) == 0
    held_plan, free_plan = BitPlan.from_dict(meta(held)["plan"]), BitPlan.from_dict(meta(free)["plan"])
    assert {c for _, c in held_plan.assignments} == {Candidate(4, 64)}
    assert any(c.bits == 8 for _, c in free_plan.assignments)
    assert held_plan.predicted_kl >= free_plan.predicted_kl
    # the first model's folder is a source of kernel times as well
    again = tmp_path / "again"
    assert convert(src, "-o", again, "--target-bpw", "5.0", *SPEED, "--no-slower-than", "4@64", "--kernel-times", out, *FAST) == 0
    assert meta(again)["kernel_times"] == meta(out)["kernel_times"]


def expect_error(capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        convert(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err


def test_bad_speed_options_are_refused_before_any_measuring(timed, model_factory, tmp_path, capsys):
    src, out = timed
    never = tmp_path / "never"
    expect_error(capsys, [src, "-o", never, "--no-slower-than", "4at64", *FAST], ["--no-slower-than", "not a format"])
    expect_error(capsys, [src, "-o", never, "--kernel-times", out, *FAST], ["only with --no-slower-than"])
    expect_error(capsys, [src, "-o", never, "--no-slower-than", "4@64", "--kernel-times", tmp_path / "none.json", *FAST], ["no such file"])
    (tmp_path / "junk.json").write_text('{"device": 3}')
    expect_error(capsys, [src, "-o", never, "--no-slower-than", "4@64", "--kernel-times", tmp_path / "junk.json", *FAST], ["not kernel times"])
    expect_error(capsys, [src, "-o", never, "--no-slower-than", "4@64", "--refine-rounds", "1", *FAST], ["without --refine-rounds"])
    expect_error(capsys, [src, "-o", never, "--no-slower-than", "4@64", "--decode-batch", "0", *FAST], ["--decode-batch"])
    # times of another model's shapes
    other = build_model(tmp_path / "wider", "llama", intermediate_size=192)
    expect_error(capsys, [other, "-o", never, *SPEED, "--no-slower-than", "4@64", "--kernel-times", out, *FAST], ["lacks", "measure them"])
    # times where the 2-bit layers a 3-bpw plan needs are slower than 4@64 everywhere: no plan fits both budgets
    times = meta(out)["kernel_times"]
    for t in times["times"]:
        t["seconds"] = 10.0 if Candidate.from_dict(t["candidate"]).bits == 2 else 1.0
    (tmp_path / "slow2.json").write_text(json.dumps(times))
    expect_error(capsys, [src, "-o", never, "--target-bpw", "3.0", *SPEED, "--no-slower-than", "4@64", "--kernel-times", tmp_path / "slow2.json", *FAST],
                 ["no plan at 3.0 bpw meets the time budget"])
    # a limit outside the candidates: the budget is its time, the plan only 8-bit, 10x slower per layer
    for t in times["times"]:
        t["seconds"] = 1.0 if Candidate.from_dict(t["candidate"]) == Candidate(4, 64) else 10.0
    (tmp_path / "slow8.json").write_text(json.dumps(times))
    expect_error(capsys, [src, "-o", never, "--target-bpw", "8.5", "--candidate-bits", "8", "--group-size", "64", "--no-slower-than", "4@64",
                          "--kernel-times", tmp_path / "slow8.json", *FAST], ["no plan at 8.5 bpw meets the time budget"])
    expect_error(capsys, [model_factory("mixtral"), "-o", never, "--no-slower-than", "4@64", *FAST], ["dense layers only"])
    assert not never.exists()
