"""benchmarks/dashboard.py --quick runs end to end (the code path only: tests never assert a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert "dashboard / capture" in done.stdout
