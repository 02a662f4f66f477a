"""``interp patch SPEC`` on the tiny Llama saved with the byte tokenizer."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from cli_util import one_error_line

from interp.cli import main


def _write(path, spec):
    path.write_text(json.dumps(spec))
    return path


def _spec(tiny_dir, **kw):
    return {"model": str(tiny_dir), "clean": "on Mon, again on", "corrupted": "on Fri, again on",
            "metric": {"type": "logit_diff", "target": "M", "baseline": "F"}, "sites": ["resid_post", "mlp_out"],
            "positions": [2, 3, 4, 5, -1], "device": "cpu", **kw}


def test_patch_writes_tables_heatmaps_and_a_summary(tiny_dir, tmp_path, capsys):
    spec = _write(tmp_path / "spec.json", _spec(tiny_dir, out="runs"))
    assert main(["patch", str(spec), "--method", "both", "--layers", "0", "2"]) == 0
    out = tmp_path / "runs"
    assert "attribution vs exact: Spearman" in capsys.readouterr().out
    for method in ("exact", "attribution"):
        with open(out / f"{method}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 * 5  # (resid_post, mlp_out) x layers 0, 2; five positions
        assert rows[1]["token"] == "F" and rows[1]["source_token"] == "M" and rows[1]["position"] == "3"
        assert (out / f"{method}.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((out / f"{method}.json").read_text())["method"] == method
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spec"]["layers"] == [0, 2] and summary["spec"]["method"] == "both"
    assert -1.0 <= summary["agreement"]["spearman"] <= 1.0 and len(summary["top"]["exact"]) == 10
    # the exact table is what the Python API gives
    from interp import load_model
    from interp.patching import activation_patching, logit_diff

    model, tok = load_model(str(tiny_dir), device="cpu")
    res = activation_patching(model, "on Mon, again on", "on Fri, again on", logit_diff("M", "F"),
                              sites=["resid_post", "mlp_out"], layers=[0, 2], positions=[2, 3, 4, 5, -1],
                              tokenizer=tok)
    with open(out / "exact.csv") as f:
        got = torch.tensor([float(r["effect"]) for r in csv.DictReader(f)])
    torch.testing.assert_close(got, res.effect.flatten(), atol=1e-5, rtol=1e-4)


def test_patch_pairs_from_a_dataset_fill_fields_per_pair(tiny_dir, tmp_path):
    rows = [{"clean": "on Mon, again on", "corrupted": "on Fri, again on", "a": "M", "b": "F"},
            {"clean": "on Tue, again on", "corrupted": "on Sat, again on", "a": "T", "b": "S"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = _spec(tiny_dir, out="o", metric={"type": "logit_diff", "target": "{a}", "baseline": "{b}"},
                 positions={"token": "{b}"}, sites=["blocks.1.hook_resid_post"], method="attribution")
    del spec["clean"], spec["corrupted"]
    spec["dataset"] = {"path": "pairs.jsonl"}
    assert main(["patch", str(_write(tmp_path / "spec.json", spec))]) == 0
    res = json.loads((tmp_path / "o" / "attribution.json").read_text())
    assert res["n_pairs"] == 2 and res["positions"] == [3] and res["tokens"] == ["F"]
    assert res["metric"]["target"] == ["M", "T"] and len(res["effects"]) == 2


@pytest.mark.parametrize("change, message", [
    ({"sites": ["resid_postt"]}, "kind expanded over layers"),
    ({"metric": {"type": "logit_diff", "target": "M"}}, "takes keys"),
    ({"corrupted": "on Friday, again on"}, "source_positions"),
    ({"method": "fast"}, "method must be"),
    ({"sits": ["resid_post"]}, "unknown key 'sits'"),
    ({"positions": {"tokn": "M"}}, "spec.positions"),
])
def test_patch_user_errors_are_one_line(tiny_dir, tmp_path, capsys, change, message):
    spec = _write(tmp_path / "spec.json", _spec(tiny_dir, out=str(tmp_path / "o"), **change))
    assert main(["patch", str(spec)]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and message in err
    assert not (tmp_path / "o").exists()


def test_a_misspelled_dataset_key_of_a_patch_spec_is_refused(tiny_dir, tmp_path, capsys):
    """clean_feild read the default column 'clean' without a word."""
    (tmp_path / "p.jsonl").write_text('{"clean": "on Mon, again on", "corrupted": "on Fri, again on", "c": "x"}\n')
    raw = {k: v for k, v in _spec(tiny_dir, out=str(tmp_path / "o")).items() if k not in ("clean", "corrupted")}
    spec = _write(tmp_path / "spec.json", {**raw, "dataset": {"path": "p.jsonl", "clean_feild": "c"}})
    assert main(["patch", str(spec)]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "spec.dataset: unknown key 'clean_feild'" in err and "'clean_field'" in err
