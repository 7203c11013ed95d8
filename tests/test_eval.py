"""optiq eval on tiny models: every task, with and without a baseline, bad inputs."""

import json

import pytest

from conftest import TEXT
from optiq.cli import main as cli
from optiq.tasks import final_number


@pytest.fixture(scope="module")
def quantized(model_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "q"
    args = ["convert", str(model_factory("llama")), "-o", str(out), "--group-size", "32", "--target-bpw", "3.5",
            "--n-calibration", "2", "--seq-len", "32", "--no-eval", "--quiet"]
    assert cli(args) == 0
    return out


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "eval.txt"
    f.write_text(TEXT)
    return f


def run(tmp_path, *args):
    out = tmp_path / "result.json"
    assert cli(["eval", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_perplexity_with_baseline(model_factory, quantized, text_file, tmp_path, capsys):
    src = str(model_factory("llama"))
    result = run(tmp_path, str(quantized), "--task", "perplexity", "--baseline", src, "--data", str(text_file), "--n-samples", "3", "--seq-len", "32")
    ppl_q, ppl_ref = result["models"][str(quantized)]["perplexity"], result["models"][src]["perplexity"]
    assert ppl_q > 1 and ppl_ref > 1 and ppl_q != ppl_ref
    table = capsys.readouterr().out
    assert "perplexity" in table and src[-20:] in table


def test_kl_against_reference(model_factory, quantized, text_file, tmp_path):
    src = str(model_factory("llama"))
    result = run(tmp_path, str(quantized), "--task", "kl", "--reference", src, "--baseline", src, "--data", str(text_file), "--n-samples", "2", "--seq-len", "32")
    q, same = result["models"][str(quantized)], result["models"][src]
    assert q["kl_mean"] > 1e-4 and 0 <= q["top1"] <= 1
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-5) and same["top1"] == 1.0


def test_gsm8k_runs_and_scores_exact_matches(model_factory, tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 6)]
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = run(tmp_path, str(model_factory("llama")), "--task", "gsm8k", "--data", str(data), "--n-samples", "3", "--n-shots", "2", "--max-tokens", "8")
    r = result["models"][str(model_factory("llama"))]
    assert r["n_problems"] == 3 and 0 <= r["accuracy"] <= 1
    assert [a["want"] for a in r["answers"]] == ["6", "8", "10"]


def test_gsm8k_reports_progress_per_batch(model_factory):
    import mlx_lm

    from optiq.tasks import gsm8k

    model, tok = mlx_lm.load(str(model_factory("llama")))
    problems = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(5)]
    seen = []
    result = gsm8k(model, tok, problems, [], max_tokens=4, batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)] and result["n_problems"] == 5
    counts = result["generation"]  # mlx-lm's own counters, summed over the 3 batches
    assert 5 <= counts["tokens"] <= 5 * 4 and 1 <= counts["steps"] <= 3 * 4 and counts["prompt_tokens"] > 0
    assert counts["decode_seconds"] > 0 and counts["tokens_per_s"] == pytest.approx(counts["tokens"] / counts["decode_seconds"])


def test_final_number_extraction():
    assert final_number("so 3 + 4 = 7\n#### 7") == "7"
    assert final_number("The answer is 1,234.") == "1234"
    assert final_number("#### 12.50 dollars") == "12.5"
    assert final_number("no digits") is None


def test_bad_eval_inputs(model_factory, text_file, tmp_path, capsys):
    src = str(model_factory("llama"))
    for args, words in [
        ([src, "--task", "kl", "--data", str(text_file)], "needs --reference"),
        ([src, "--data", str(tmp_path / "none.txt")], "no such file"),
        ([str(tmp_path / "nomodel"), "--data", str(text_file)], "not found"),
        ([src, "--data", str(text_file), "--n-samples", "0"], "n-samples"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli(["eval", *args, "--json", str(tmp_path / "x.json")])
        assert exc.value.code == 2 and words in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(SystemExit):
        cli(["eval", src, "--task", "gsm8k", "--data", str(bad), "--json", str(tmp_path / "x.json")])
    assert "not a GSM8K record" in capsys.readouterr().err


def test_benchmark_side_by_side(model_factory, quantized, text_file, tmp_path, capsys):
    src = str(model_factory("llama"))
    out = tmp_path / "bench.json"
    args = ["benchmark", str(quantized), "--baseline", src, "--prompt-tokens", "16", "--generation-tokens", "4",
            "--data", str(text_file), "--n-samples", "2", "--seq-len", "32", "--json", str(out)]
    assert cli(args) == 0
    result = json.loads(out.read_text())["models"]
    q, base = result[str(quantized)], result[src]
    assert q["disk_bytes"] < base["disk_bytes"]
    assert q["effective_bpw"] <= 3.5 + 1e-9 and q["mlx_bits_per_weight"] < base["mlx_bits_per_weight"]
    for r in (q, base):
        assert r["prefill_tps"] > 0 and r["decode_tps"] > 0 and r["peak_memory_gb"] > 0 and r["perplexity"] > 1
    assert "decode_tps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["benchmark", src, "--prompt-tokens", "0", "--json", str(out)])
