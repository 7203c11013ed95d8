"""Bad command-line input: one `optiq: error:` line and exit 2, before any
expensive work (loading a model, probing), never a traceback or a
half-written output; written folders get the usual permissions."""

import json
import os
import shutil

import pytest

from optiq.cli import main as cli

FAST = ["--n-calibration", "2", "--seq-len", "32", "--n-eval", "2", "--kl-stride", "2", "--gram-samples", "2", "--quiet"]


def refused(capsys, argv, *words):
    """Run `optiq argv`; assert exit 2 and one error line holding `words`."""
    try:
        code = cli(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("optiq: error:"), err
    for word in words:
        assert word in last, (word, last)
    return last


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load (or self-sampling, or a probe) fails the test: the error
    must come first."""
    import optiq.commands.kv_cache as kv_cmd
    import optiq.commands.lora as lora_cmd
    import optiq.pipeline as pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for module, name in ((pipeline, "resolve_model"), (kv_cmd, "load_within"), (kv_cmd, "resolve_model"), (lora_cmd, "resolve_model")):
        monkeypatch.setattr(module, name, loaded)


def broken_copy(src, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def test_corrupt_config_is_refused(tiny_llama, tmp_path, capsys):
    bad = broken_copy(tiny_llama, tmp_path, "corrupt")
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    refused(capsys, ["convert", str(bad), "-o", str(tmp_path / "out"), *FAST], "config.json", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_config_that_is_a_list_is_refused(tiny_llama, tmp_path, capsys):
    bad = broken_copy(tiny_llama, tmp_path, "listed")
    (bad / "config.json").write_text("[1, 2, 3]")
    refused(capsys, ["convert", str(bad), "-o", str(tmp_path / "out"), *FAST], "config.json", "list")
    refused(capsys, ["kv-cache", str(bad), "-o", str(tmp_path / "kv"), "--quiet"], "config.json")


@pytest.mark.parametrize("cut", ["empty", "truncated", "header"])
def test_broken_safetensors_are_refused(tiny_llama, tmp_path, capsys, cut):
    bad = broken_copy(tiny_llama, tmp_path, cut)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "header": b"\xff" * 64}[cut])
    line = refused(capsys, ["convert", str(bad), "-o", str(tmp_path / "out"), *FAST], "model.safetensors")
    assert any(w in line for w in ("empty", "truncated", "not a safetensors"))
    text = tmp_path / "eval.txt"
    text.write_text("Some held-out text. " * 50)
    refused(capsys, ["eval", str(bad), "--task", "perplexity", "--data", str(text)], "model.safetensors")


@pytest.mark.parametrize("args, words", [
    (["--target-bpw", "99"], ["above the largest candidate"]),
    (["--target-bpw", "99", "--measure", "proxy"], ["above the largest candidate"]),
    (["--target-bpw", "17", "--candidate-bits", "4,16"], ["above the largest candidate"]),
    (["--target-bpw", "0.5"], ["below the cheapest"]),
    (["--target-bpw", "abc"], ["--target-bpw", "invalid float value"]),
    (["--n-calibration", "many"], ["--n-calibration"]),
    (["--quantizer", "best"], ["--quantizer"]),
])
def test_convert_targets_and_flags_are_checked_first(tiny_llama, tmp_path, capsys, no_model_loads, args, words):
    refused(capsys, ["convert", str(tiny_llama), "-o", str(tmp_path / "out"), *FAST, *args], *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, words", [
    ("", ["empty file"]),
    ('{"text": "fine"}\n{"broken": ', ["not valid JSON"]),
    ('{"colour": "blue"}\n', ["a record needs"]),
])
def test_bad_calibration_files_are_refused_before_the_model_loads(tiny_llama, tmp_path, capsys, no_model_loads, content, words):
    data = tmp_path / "cal.jsonl"
    data.write_text(content)
    refused(capsys, ["convert", str(tiny_llama), "-o", str(tmp_path / "out"), *FAST, "--calibration", str(data)], "--calibration", *words)
    refused(capsys, ["kv-cache", str(tiny_llama), "-o", str(tmp_path / "kv"), "--calibration", str(data)], "--calibration")


def test_missing_calibration_is_refused(tiny_llama, tmp_path, capsys, no_model_loads):
    refused(capsys, ["convert", str(tiny_llama), "-o", str(tmp_path / "out"), "--calibration", "nowhere.txt", *FAST], "not found")


@pytest.mark.parametrize("target, words", [("1", ["below the cheapest"]), ("17", ["above 16"])])
def test_kv_targets_outside_the_candidates_are_refused_before_probing(tiny_llama, tmp_path, capsys, no_model_loads, target, words):
    refused(capsys, ["kv-cache", str(tiny_llama), "-o", str(tmp_path / "kv"), "--target-bits", target], *words)
    refused(capsys, ["kv-cache", str(tiny_llama), "-o", str(tmp_path / "kv"), "--target-bits", "2.5", "--candidate-bits", "4,8", "--split-bits", ""], "below the cheapest")


@pytest.mark.parametrize("train", ["", "\n\n", "not json\n", '{"unknown": 1}\n'])
def test_lora_data_that_mlx_lm_cannot_read_is_refused_first(tiny_llama, tmp_path, capsys, no_model_loads, train):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(train)
    refused(capsys, ["lora", "train", str(tiny_llama), "--data", str(data), "-o", str(tmp_path / "adapter")], "train.jsonl")
    assert not (tmp_path / "adapter").exists()


def test_written_folders_get_the_usual_permissions(tiny_llama, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli(["convert", str(tiny_llama), "-o", str(tmp_path / "out"), "--target-bpw", "5", "--no-eval", *FAST]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # every writer goes through io.atomic_output
    assert json.loads((tmp_path / "out" / "optiq_metadata.json").read_text())["plan"]
