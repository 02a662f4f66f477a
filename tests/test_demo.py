"""`interp demo` runs end to end (reduced with --quick) and writes its report folder."""

from __future__ import annotations

import json

import pytest

from interp.cli import main

pytestmark = pytest.mark.slow


def test_demo_quick_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert f"report: {(out / 'report.md').resolve()}" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    edits = res["intervention"]["edits"]
    assert set(edits) >= {"no edit", "circle x1", "random plane x1 (control)", "replace with target mean (control)",
                          "circle x4 radius", "random plane x4 radius (control)", "circle probe x4 radius"}
    assert all(0.0 <= e["success"] <= 1.0 for e in edits.values())
    assert edits["no edit"]["kept_source"] > 0.9  # the model copies the day it was told
    assert all(r["order_matches"] for r in res["circle"])  # days on a circle at every layer checked
    assert all(0 <= r["probe_loco_angle_error"] <= 3.15 for r in res["circle"])
    for png in ("circle_scores_by_layer.png", "probe_f1_vs_k.png", "intervention.png", "circle_layer10.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## 3. Rotating the circle" in report and "| circle x1 |" in report
    assert res["command"] == "interp demo --quick" and res["scale"] is None


@pytest.mark.parametrize("argv,command", [
    (["--quick"], "interp demo --quick"),
    (["--layer", "12", "--scale", "2", "--quick"], "interp demo --layer 12 --scale 2 --quick"),
    (["--items", "months", "--model", "/home/me/models/x", "--out", "o"], "interp demo --model MODEL --items months"),
])
def test_the_recorded_command_repeats_the_run(argv, command):
    """The command results.json and report.md record dropped --layer and --scale: rerun, it edited another layer
    at another scale."""
    from interp.cli import build_parser
    from interp.cli.demo import _command

    assert _command(build_parser().parse_args(["demo", *argv])) == command


def test_demo_rejects_a_layer_out_of_range(tmp_path, capsys):
    assert main(["demo", "--layer", "99", "--out", str(tmp_path)]) == 1
    assert "out of range" in capsys.readouterr().err
