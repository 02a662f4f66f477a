"""load_texts on local folders and files: splits, mixed kinds, non-string cells, missing local paths,
streamed datasets without the text column, and how a .txt file becomes documents."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from interp.data import DataWarning, load_texts
from interp.errors import DataError
from interp.models import looks_local


def _jsonl(path, texts):
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))


def test_folder_honours_split(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [f"TRAIN doc {i}" for i in range(5)])
    _jsonl(tmp_path / "test.jsonl", [f"TEST doc {i}" for i in range(3)])
    assert sorted(load_texts(tmp_path, shuffle_seed=None)) == [f"TRAIN doc {i}" for i in range(5)]
    assert sorted(load_texts(tmp_path, split="test", shuffle_seed=None)) == [f"TEST doc {i}" for i in range(3)]
    with pytest.raises(DataError, match=r"splits \['test', 'train'\].*split='validation'"):
        load_texts(tmp_path, split="validation")


def test_folder_without_split_names_is_train_and_single_file_has_no_other_split(tmp_path):
    _jsonl(tmp_path / "a.jsonl", ["one", "two"])
    _jsonl(tmp_path / "b.jsonl", ["three"])
    assert sorted(load_texts(tmp_path)) == ["one", "three", "two"]
    with pytest.raises(DataError, match="split='test'"):
        load_texts(tmp_path, split="test")
    with pytest.raises(DataError, match="one file"):
        load_texts(tmp_path / "a.jsonl", split="test")


def test_folder_mixing_kinds_is_refused(tmp_path):
    (tmp_path / "a_notes.txt").write_text("plain line one\nplain line two\n")
    _jsonl(tmp_path / "b_docs.jsonl", [f"json doc {i}" for i in range(3)])
    with pytest.raises(DataError, match=r"mixes file kinds \(a_notes.txt, b_docs.jsonl\)") as e:
        load_texts(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "a_notes.txt").unlink()
    (tmp_path / "c.json").write_text(json.dumps({"text": "json doc 9"}))  # .json beside .jsonl: one reader
    assert len(list(load_texts(tmp_path))) == 4


def test_non_string_cells_are_counted_in_a_warning(tmp_path):
    rows = [{"text": "real text one"}, {"text": None}, {"text": 12345}, {"text": "real text two"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(DataWarning, match="2 of 4 rows"):
        assert list(load_texts(tmp_path / "c.jsonl", shuffle_seed=None)) == ["real text one", "real text two"]
    (tmp_path / "n.jsonl").write_text("\n".join(json.dumps(r) for r in [{"text": "a"}, {"text": None}]))
    with pytest.warns(DataWarning, match="1 of 2 rows"):
        assert list(load_texts(tmp_path / "n.jsonl")) == ["a"]
    (tmp_path / "i.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(3)))
    with pytest.raises(DataError, match="holds int64, not text"):
        load_texts(tmp_path / "i.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all strings: no warning
        _jsonl(tmp_path / "ok.jsonl", ["x", "y"])
        assert len(list(load_texts(tmp_path / "ok.jsonl"))) == 2


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet", "sub/dir/missing"])
def test_missing_local_looking_path_fails_at_once(name, tmp_path, monkeypatch):
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    assert looks_local(name)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="does not exist.*Hub is not asked"):
        load_texts(name)
    assert time.perf_counter() - t0 < 5


def test_streamed_dataset_without_the_text_column():
    import datasets as hfds

    def gen():
        for i in range(4):
            yield {"content": f"document number {i}"}

    ds = hfds.IterableDataset.from_generator(gen)
    with pytest.raises(DataError, match=r"no column 'text'; columns: \['content'\]"):
        load_texts(ds)
    assert list(load_texts(ds, text_column="content")) == [f"document number {i}" for i in range(4)]


def test_streamed_dataset_non_string_rows_warn_once():
    import datasets as hfds

    def gen():
        for t in ["a", None, "b", None]:
            yield {"text": t}

    with pytest.warns(DataWarning, match="row 1 of the streamed dataset") as got:
        assert list(load_texts(hfds.IterableDataset.from_generator(gen))) == ["a", "b"]
    assert len([w for w in got if issubclass(w.category, DataWarning)]) == 1


def test_txt_is_one_document_per_line_documented(tmp_path):
    (tmp_path / "book.txt").write_text("first line\nsecond line\n\nfourth line\n")
    assert list(load_texts(tmp_path / "book.txt", shuffle_seed=None)) == ["first line", "second line", "",
                                                                          "fourth line"]
    assert sorted(load_texts(tmp_path / "book.txt")) == ["", "first line", "fourth line", "second line"]
    assert "one document per line" in load_texts.__doc__
    import interp.data
    assert "one document per line" in interp.data.__doc__


def test_sample_windows_begin_with_bos_when_the_sae_was_trained_so(text_file):
    from conftest import byte_tokenizer

    from interp.data import sample_windows

    tok = byte_tokenizer()
    ids, mask = sample_windows(tok, 4, 32, str(text_file), prepend_bos=True)
    assert (ids[:, 0] == tok.bos_token_id).all() and not mask[:, 0].any()
    plain, _ = sample_windows(tok, 4, 32, str(text_file))
    assert not (plain[:, 0] == tok.bos_token_id).all()
