import json

import numpy as np
import pytest

from optiq.calibration import load_calibration, wikitext_split
from optiq.errors import OptiqError
from optiq.source import load_reference
from conftest import TEXT


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_reference(tiny_llama)


def test_text_file_windows_start_with_bos(loaded, tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(TEXT)
    toks = load_calibration(str(f), loaded.tokenizer, loaded.model, 4, 16)
    assert toks.shape == (4, 16)
    assert (toks[:, 0] == loaded.tokenizer.bos_token_id).all()
    assert len({tuple(r) for r in toks.tolist()}) == 4  # spread over the text, not repeated


@pytest.mark.parametrize(
    "record",
    [
        {"text": TEXT},
        {"messages": [{"role": "user", "content": TEXT}, {"role": "assistant", "content": "ok"}]},
        {"question": TEXT, "answer": "#### 5"},
        {"prompt": TEXT, "completion": " done"},
    ],
)
def test_jsonl_formats(loaded, tmp_path, record):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    toks = load_calibration(str(f), loaded.tokenizer, loaded.model, 2, 16)
    assert toks.shape == (2, 16)


def test_bad_calibration_inputs(loaded, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(OptiqError, match="bad.jsonl:2"):
        load_calibration(str(f), loaded.tokenizer, loaded.model, 1, 8)
    g = tmp_path / "odd.jsonl"
    g.write_text('{"foo": 1}\n')
    with pytest.raises(OptiqError, match="needs 'text'"):
        load_calibration(str(g), loaded.tokenizer, loaded.model, 1, 8)
    short = tmp_path / "short.txt"
    short.write_text("hi")
    with pytest.raises(OptiqError, match="fewer than one sequence"):
        load_calibration(str(short), loaded.tokenizer, loaded.model, 1, 64)
    with pytest.raises(OptiqError, match="must be .txt or .jsonl"):
        (tmp_path / "c.csv").write_text("a,b")
        load_calibration(str(tmp_path / "c.csv"), loaded.tokenizer, loaded.model, 1, 8)


def test_self_sampled_is_seeded(loaded):
    a = load_calibration(None, loaded.tokenizer, loaded.model, 2, 12, seed=7)
    b = load_calibration(None, loaded.tokenizer, loaded.model, 2, 12, seed=7)
    c = load_calibration(None, loaded.tokenizer, loaded.model, 2, 12, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_wikitext_split_keeps_calibration_and_evaluation_apart():
    text = "".join(f" = Article {i} = \n\n Body {i} text .\n\n = = Section = = \n more {i}\n" for i in range(8))
    cal, ev = wikitext_split(text)
    assert "Article 6" in cal and "Article 7" in cal and "Article 0" not in cal
    assert "Article 0" in ev and "Article 5" in ev and "Article 6" not in ev


def test_self_sampled_in_batches_does_not_depend_on_n(loaded):
    """Sequences are decoded 8 at a time, each batch from its own seed stream:
    asking for more keeps the first full batches, and eval's seed + 1 repeats none."""
    from optiq.calibration import sample_tokens, split_calibration

    many = sample_tokens(loaded.model, loaded.tokenizer, 11, 12, seed=0)
    few = sample_tokens(loaded.model, loaded.tokenizer, 8, 12, seed=0)
    other = sample_tokens(loaded.model, loaded.tokenizer, 11, 12, seed=1)
    assert many.shape == (11, 12)
    np.testing.assert_array_equal(many[:8], few)
    assert not any((row == many).all(axis=1).any() for row in other)
    probe, rest = split_calibration(many, 4)
    assert probe.shape == (4, 12) and rest.shape == (7, 12)
    assert sorted(map(tuple, np.concatenate([probe, rest]))) == sorted(map(tuple, many))
    assert split_calibration(few, 8)[1] is None and split_calibration(few, 9)[0] is few
