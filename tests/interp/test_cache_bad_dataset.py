"""cache_activations opens the dataset before it writes manifest.json: a bad dataset leaves nothing behind
that would refuse the corrected command."""

from __future__ import annotations

import json

import pytest
from conftest import DOCS, byte_tokenizer, tiny_model

from interp.cache import cache_activations
from interp.errors import DataError

SITES = ["blocks.0.hook_resid_post"]


def test_bad_dataset_writes_no_header_then_the_fix_runs(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"body": d}) for d in DOCS[:20]))  # no 'text' column
    out = tmp_path / "c"
    with pytest.raises(DataError, match="no column 'text'"):
        cache_activations(model, tok, SITES, out, 200, dataset=str(bad), context_size=32, progress=False)
    assert not (out / "manifest.json").exists()
    assert not out.exists()  # the folder this call made is removed again
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:20]))
    info = cache_activations(model, tok, SITES, out, 200, dataset=str(good), context_size=32, progress=False)
    assert info.rows >= 200


def test_bad_dataset_into_an_existing_folder_leaves_it_as_it_was(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError):
        cache_activations(model, tok, SITES, out, 200, dataset=str(tmp_path / "missing.jsonl"), context_size=32,
                          progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
