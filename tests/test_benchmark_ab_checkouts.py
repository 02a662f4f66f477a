"""benchmarks/ab_checkouts.py: pairs of runs of sae_step_phases.py from two checkouts, alternating which goes first,
every pair's rounds and the pairs' medians in one path-free JSON (timings are not tested); what it cannot compare is
refused with a line naming it."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import ROOT, load_script


@pytest.fixture
def ab(monkeypatch):
    return load_script(monkeypatch, "benchmarks/ab_checkouts.py")


def test_pairs_alternate_and_the_summary_is_of_the_pairs(ab, tmp_path):
    out = tmp_path / "ab.json"
    res = ab.main(["--before", str(ROOT), "--pairs", "2", "--what", "nothing", "--out", str(out), "--",
                   "--quick", "--rounds", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [p["order"] for p in res["pairs"]] == [["before", "after"], ["after", "before"]]
    for p in res["pairs"]:
        for side in ("before", "after"):
            run = p[side]
            assert len(run["rounds"]) == 1 and run["summary_ms"]["step"] > 0 and run["fraction_of_ceiling"] > 0
            assert {"step", "encoder_matmul", "top_k", "backward", "optimizer"} <= set(run["summary_ms"])
    s = res["summary"]
    ratios = [p["before"]["summary_ms"]["step"] / p["after"]["summary_ms"]["step"] for p in res["pairs"]]
    assert s["step_ratio_before_over_after_per_pair"] == pytest.approx(ratios)
    assert s["step_ratio_before_over_after_median"] == pytest.approx(statistics.median(ratios))
    gains = [p["after"]["fraction_of_ceiling"] - p["before"]["fraction_of_ceiling"] for p in res["pairs"]]
    assert s["fraction_gain_per_pair"] == pytest.approx(gains)
    assert s["pairs_where_after_has_the_higher_fraction"] == sum(g > 0 for g in gains)
    assert s["non_matmul_ms_median"]["after"] == pytest.approx(statistics.median(
        p["after"]["summary_ms"]["step"] - p["after"]["summary_ms"]["encoder_matmul"] for p in res["pairs"]))
    assert res["what"] == "nothing"
    assert res["command"] == "python benchmarks/ab_checkouts.py --before BEFORE --pairs 2 --what nothing --out OUT " \
                             "-- --quick --rounds 1"  # no machine path


@pytest.mark.parametrize(("ours", "theirs", "message"), [
    (["--before", "NOWHERE"], ["--quick"], "holds no benchmarks/sae_step_phases.py"),
    (["--before", "ROOT", "--pairs", "0"], ["--quick"], "--pairs is 0"),
    (["--before", "ROOT"], ["--quick", "--grad-kernels", "sparse", "dense"], "kernel A/Bs"),
    (["--before", "ROOT"], ["--quick", "--out=x.json"], "kernel A/Bs"),
])
def test_what_it_cannot_compare_is_refused(ab, tmp_path, capsys, ours, theirs, message):
    ours = [str(tmp_path) if a == "NOWHERE" else str(ROOT) if a == "ROOT" else a for a in ours]
    with pytest.raises(SystemExit):
        ab.main([*ours, "--out", str(tmp_path / "ab.json"), "--", *theirs])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ab.json").exists()


def test_a_failing_run_stops_with_its_last_line(ab, tmp_path):
    with pytest.raises(SystemExit, match="exited with 2: .*--cache is required"):
        ab.main(["--before", str(ROOT), "--pairs", "1", "--out", str(tmp_path / "ab.json"), "--", "--rounds", "1"])
