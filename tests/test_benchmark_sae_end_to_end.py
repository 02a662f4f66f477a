"""benchmarks/sae_end_to_end.py --quick: every row runs (or records why not) in every round, on a tiny
random Llama (the code path only: tests never assert a time)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["interp", "saelens", "sparsify"]


def test_quick_run_records_every_row_in_every_round(tmp_path, text_file):
    out = tmp_path / "e2e.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sae_end_to_end.py"), "--quick", "--device", "cpu",
                           "--text", str(text_file), "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["rows"] == ROWS and len(res["rounds"]) == 2
    assert [[r["row"] for r in rnd] for rnd in res["rounds"]] == [ROWS, ROWS[::-1]]  # alternating order
    s = res["settings"]
    for rnd in res["rounds"]:
        for r in rnd:
            assert r["status"] in ("ok", "failed"), r
            if r["status"] == "failed":  # a peer that cannot run says why, in one line
                assert r["reason"].strip() and "\n" not in r["reason"], r
                continue
            # each row trained the same number of steps of (about) the same batch, from model forwards
            assert 0.9 * s["steps"] * s["batch"] <= r["tokens_trained"] <= s["steps"] * s["batch"], r
            assert r["model_tokens"] >= r["tokens_trained"] and r["model_forwards"] >= 1, r
            assert r["train_s"] > 0 and r["setup_s"] > 0 and r["tokens_per_s"] > 0, r
            assert math.isfinite(r["final_fvu"]) and r["final_fvu"] > 0, r
    summary = res["summary"]
    assert summary["rows"]["interp"]["ok_rounds"] == 2  # this project's own path never fails
    for peer in ROWS[1:]:
        if summary["rows"][peer]["ok_rounds"] == 2:
            assert len(summary["tokens_per_s_ratio"][f"interp_over_{peer}"]["per_round"]) == 2
        else:
            assert summary["rows"][peer]["ok_rounds"] or summary["rows"][peer]["reasons"]
    assert s["hook_name"] == "model.layers.2" and s["hookpoint"] == "layers.2"  # the same block for every row
    assert "interp_over_saelens" in done.stdout or summary["rows"]["saelens"]["ok_rounds"] == 0


def test_summary_keeps_the_reason_of_a_row_that_failed(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sae_end_to_end as bench

    ok = {"status": "ok", "tokens_per_s": 100.0, "tokens_per_s_with_setup": 50.0, "model_tokens_per_s": 130.0,
          "train_s": 2.0, "setup_s": 2.0, "imports_s": 1.0, "final_fvu": 0.5, "model_tokens_per_trained_token": 1.3,
          "peak_rss_mb": 10.0, "tokens_trained": 200}
    rounds = [[{**ok, "row": "interp"}, {"row": "sparsify", "status": "failed", "reason": "ValueError: no"}],
              [{"row": "sparsify", "status": "ok", **{**ok, "tokens_per_s": 50.0}}, {**ok, "row": "interp"}]]
    got = bench.summarize(rounds, ["interp", "sparsify"])
    assert got["rows"]["sparsify"]["ok_rounds"] == 1 and got["rows"]["sparsify"]["rounds"] == 2
    # the ratio pairs rows of the same round only: round 0 has no sparsify figure
    assert got["tokens_per_s_ratio"]["interp_over_sparsify"]["per_round"] == [2.0]
    rounds[1][0] = {"row": "sparsify", "status": "failed", "reason": "ValueError: no"}
    got = bench.summarize(rounds, ["interp", "sparsify"])
    assert got["rows"]["sparsify"] == {"ok_rounds": 0, "rounds": 2, "reasons": ["ValueError: no"]}
    assert got["tokens_per_s_ratio"] == {}
    sys.modules.pop("sae_end_to_end", None)
