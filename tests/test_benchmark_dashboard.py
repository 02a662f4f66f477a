"""benchmarks/dashboard.py --quick runs end to end (the code path only: tests never assert a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_its_rounds_and_memory(tmp_path, text_file):
    out = tmp_path / "dashboard.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dashboard.py"), "--quick", "--dataset",
                           str(text_file), "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] and len(result["rounds"]) == 2
    assert [r["order"][0] for r in result["rounds"]] == ["capture", "dashboard"]  # alternating order
    for r in result["rounds"]:
        assert r["capture_s"] > 0 and r["dashboard_s"] > 0 and r["tokens"] >= result["tokens"]
    assert [m["tokens"] for m in result["memory"]] == [result["tokens"] // 4, result["tokens"]]
    for r in result["rounds"]:  # where the time went: every phase ran, and the phases add up to the run
        assert set(r["capture_phases"]) == {"read", "capture", "other"}
        assert {"read", "capture", "encode", "track", "logits", "neighbors", "write"} <= set(r["dashboard_phases"])
        assert all(r["dashboard_phases"][k] > 0 for k in ("capture", "encode", "track", "logits", "write"))
        assert sum(r["dashboard_phases"].values()) == pytest.approx(r["dashboard_s"])
    # two rounds: the medians are means, so the overhead's parts add up to the difference of the medians
    assert result["overhead_s"] == pytest.approx(result["median_dashboard_s"] - result["median_capture_s"])
    assert "dashboard / capture" in done.stdout
    # the memory children measure the pass itself (the warm-up pass's peak is reset), and --memory-only
    # reruns them into the same file, refusing a file measured with other settings
    for m in result["memory"]:
        assert m["peak_reset"] and m["peak_rss_mb"] >= m["rss_before_mb"] and m["peak_delta_mb"] > 0
    args = [sys.executable, str(ROOT / "benchmarks" / "dashboard.py"), "--quick", "--dataset", str(text_file),
            "--memory-only", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(out.read_text())
    assert again["rounds"] == result["rounds"] and "--memory-only" in again["memory_command"]
    assert [m["tokens"] for m in again["memory"]] == [result["tokens"] // 4, result["tokens"]]
    done = subprocess.run(args[:-2] + ["--batch-windows", "3", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode != 0 and "other settings" in done.stderr and "'batch_windows': (8, 3)" in done.stderr
