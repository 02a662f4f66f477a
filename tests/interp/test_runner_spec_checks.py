"""What ``interp intervene`` refuses when it reads a spec, where a spec's ``out`` lands, and what
``write_result`` leaves in its folder when a write fails or a run was killed (no model is loaded)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from interp.errors import InputError
from interp.folders import LockError, folder_lock, temp_name
from interp.intervene_spec import EDIT_KEYS, load_spec, spec_from_dict
from interp.runner import RunResult, write_result

VEC = [1.0] * 8
BASE = {"model": "m", "site": "blocks.0.hook_resid_post", "prompts": ["a b", "c d"], "metric": {"type": "kl"},
        "edits": [{"name": "s", "type": "steer", "vector": VEC}]}


def _rows(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"prompt {i}", "q": f"question {i}"}) for i in range(n)))
    return path


def _with_dataset(tmp_path: Path, **ds) -> dict:
    return {**{k: v for k, v in BASE.items() if k != "prompts"}, "dataset": {"path": str(_rows(tmp_path)), **ds}}


# ------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(("edit", "message"), [
    ({"name": "s", "type": "steer", "vector": VEC, "alpah": 100.0},
     r"edit 's' \(type steer\): unknown key 'alpah'; it takes .*alpha.*; did you mean 'alpha'\?"),
    ({"name": "p", "type": "project_out", "coords": [5.0, 5.0]},
     r"edit 'p' \(type project_out\): unknown key 'coords'"),
    ({"name": "r", "type": "replace", "vector": VEC, "alpha": 7}, r"edit 'r' \(type replace\): unknown key 'alpha'"),
    ({"name": "r", "type": "rotate", "too": "Friday"}, r"unknown key 'too'.*did you mean 'to'\?"),
])
def test_an_edit_key_its_type_does_not_read_is_refused(edit, message):
    with pytest.raises(InputError, match=message):
        spec_from_dict({**BASE, "edits": [edit]})


@pytest.mark.parametrize(("edit", "message"), [
    ({"name": "s", "type": "steer", "vector": VEC, "coords": [3, 4]}, r"takes vector or coords, not both"),
    ({"name": "c", "type": "set_coords", "coords": [0.0, 0.0], "value": "Friday"}, r"takes coords or value, not both"),
    ({"name": "r", "type": "rotate", "angle": 1.0, "to": "Friday"}, r"takes angle or to, not both"),
    ({"name": "r", "type": "replace"}, r"edit 'r' \(type replace\) needs vector"),
    ({"name": "m", "type": "mean_ablate"}, r"edit 'm' \(type mean_ablate\) needs coords"),
    ({"name": "p", "type": "patch"}, r"edit 'p' \(type patch\) needs source_field"),
])
def test_contradictory_or_missing_edit_keys_are_refused(edit, message):
    with pytest.raises(InputError, match=message):
        spec_from_dict({**BASE, "subspace": "sub", "edits": [edit]})


def test_every_edit_type_loads_with_the_keys_it_reads():
    edits = [{"name": "po", "type": "project_out", "site": "blocks.1.hook_resid_post", "positions": "last"},
             {"name": "za", "type": "zero_ablate"}, {"name": "ma", "type": "mean_ablate", "coords": [0.0, 1.0]},
             {"name": "sv", "type": "steer", "vector": VEC, "alpha": 2.0},
             {"name": "sc", "type": "steer", "coords": [1.0, 0.0], "alpha": 2.0}, {"name": "s1", "type": "steer"},
             {"name": "cc", "type": "set_coords", "coords": [0.0, 1.0]}, {"name": "cv", "type": "set_coords",
                                                                          "value": "Friday"},
             {"name": "ra", "type": "rotate", "angle": 1.0}, {"name": "rt", "type": "rotate", "to": "{target}"},
             {"name": "re", "type": "replace", "vector": VEC}, {"name": "pa", "type": "patch", "source_field": "src"}]
    assert {e["type"] for e in edits} == set(EDIT_KEYS)
    spec = spec_from_dict({**BASE, "subspace": "sub", "edits": edits})
    assert [e["name"] for e in spec.edits] == [e["name"] for e in edits]


@pytest.mark.parametrize(("metric", "message"), [
    ({"type": "prob", "tokn": "a"}, r"spec.metric \(type prob\): unknown key 'tokn'; it takes type, token; did you "
                                    r"mean 'token'\?"),
    ({"type": "kl", "token": "a"}, r"spec.metric \(type kl\): unknown key 'token'; it takes type"),
    ({"type": "prob"}, r"spec.metric \(type prob\) needs token"),
    ({"type": "logit_diff", "target": " a"}, r"spec.metric \(type logit_diff\) needs baseline"),
])
def test_metric_keys_are_checked_when_the_spec_is_read(metric, message):
    with pytest.raises(InputError, match=message):
        spec_from_dict({**BASE, "metric": metric})


def test_a_misspelled_dataset_key_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"spec.dataset: unknown key 'text_feild'; it takes path, text_field, limit; "
                                         r"did you mean 'text_field'\?"):
        spec_from_dict(_with_dataset(tmp_path, text_feild="q"))
    assert spec_from_dict(_with_dataset(tmp_path, text_field="q")).rows[0]["text"] == "question 0"


def test_prompts_and_dataset_together_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"give prompts: \[...\] or dataset: \{path: ...\}, not both"):
        spec_from_dict({**_with_dataset(tmp_path), "prompts": ["a b"]})


def test_edit_and_edits_together_are_refused():
    with pytest.raises(InputError, match=r"give edit: \{...\} \(one edit\) or edits: \[...\].*not both"):
        spec_from_dict({**BASE, "edit": {"name": "a", "type": "steer", "vector": [5.0] * 8}})


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "2"])
def test_dataset_limit_must_be_a_positive_row_count(tmp_path, limit):
    with pytest.raises(InputError, match=rf"spec.dataset.limit must be a number of rows >= 1.*got {limit!r}"):
        spec_from_dict(_with_dataset(tmp_path, limit=limit))


def test_dataset_limit_reads_that_many_rows(tmp_path):
    assert len(spec_from_dict(_with_dataset(tmp_path, limit=2)).rows) == 2
    assert len(spec_from_dict(_with_dataset(tmp_path, limit=None)).rows) == 3
    assert len(spec_from_dict(_with_dataset(tmp_path)).rows) == 3


def test_edit_names_are_text_before_they_are_compared():
    with pytest.raises(InputError, match=r"names must be unique; got '1' twice"):
        spec_from_dict({**BASE, "edits": [{"name": 1, "type": "steer", "vector": VEC},
                                          {"name": "1", "type": "steer", "vector": [9.0] * 8}]})
    spec = spec_from_dict({**BASE, "edits": [{"name": 1, "type": "steer", "vector": VEC}]})
    assert spec.edits[0]["name"] == "1"
    with pytest.raises(InputError, match=r"an edit's name must be non-empty text; got \[1\]"):
        spec_from_dict({**BASE, "edits": [{"name": [1], "type": "steer", "vector": VEC}]})


def test_top_level_typo_names_the_closest_key():
    with pytest.raises(InputError, match=r"spec: unknown key 'promts'; it takes .*; did you mean 'prompts'\?"):
        spec_from_dict({**BASE, "promts": ["a"]})


# ------------------------------------------------------------------------------------------ out
def test_a_relative_out_is_relative_to_the_spec_file(tmp_path, monkeypatch):
    specs, elsewhere = tmp_path / "specs", tmp_path / "elsewhere"
    specs.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = specs / "spec.json"
    path.write_text(json.dumps({**BASE, "out": "runs/a"}))
    assert load_spec(path).out == str(specs / "runs" / "a")
    assert load_spec(path, out="flag_out").out == "flag_out"  # a --out flag is relative to the working folder
    path.write_text(json.dumps({**BASE, "out": str(tmp_path / "abs")}))
    assert load_spec(path).out == str(tmp_path / "abs")


# ------------------------------------------------------------------------------------------ write_result
def _result(edit: str) -> RunResult:
    table = [{"row": 0, "prompt": "a b", "edit": name, "kl": value} for name, value in (("none", 0.0), (edit, 0.5))]
    return RunResult(table=table, summary={"edits": [{"name": edit}], "mean": {"none": {"kl": 0.0},
                                                                               edit: {"kl": 0.5}}})


def _edits_on_disk(out: Path) -> tuple[set, set | None]:
    with (out / "results.csv").open(newline="") as f:
        table = {r["edit"] for r in csv.DictReader(f)} - {"none"}
    summary = out / "summary.json"
    return table, ({e["name"] for e in json.loads(summary.read_text())["edits"]} if summary.exists() else None)


@pytest.mark.parametrize("failing", ["summary.json", "results.csv"])
def test_a_failed_rewrite_never_pairs_two_runs_files(tmp_path, monkeypatch, failing):
    out = tmp_path / "out"
    write_result(_result("first"), out)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == failing:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left on device"):
        write_result(_result("second"), out)
    monkeypatch.setattr(os, "replace", real)
    table, summary = _edits_on_disk(out)
    assert summary is None or summary == table  # no summary (no complete run), or the table's own one
    assert not [p.name for p in out.iterdir() if p.name.startswith(".interp-")]
    write_result(_result("second"), out)
    assert _edits_on_disk(out) == ({"second"}, {"second"})


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    left = [out / f"{temp_name('results.csv')}abc123", out / f"{temp_name('summary.json')}def456"]
    others = [out / f"{temp_name('other.bin')}x1", out / "notes.txt"]
    for p in left + others:
        p.write_text("partial")
    write_result(_result("s"), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.csv", "summary.json"] + [p.name for p in others])


def test_a_folder_another_writer_holds_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, ".interp-lock", "held by the test"):
        with pytest.raises(LockError, match=r"the intervention output folder .*out is being written by process"):
            write_result(_result("s"), out)
    assert not (out / "results.csv").exists()
