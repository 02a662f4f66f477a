"""benchmarks/mp_sae.py: where bf16 matrix products take torch's slow path, a run at real settings (not
``--quick``) leaves its bf16 rows and ratios out and records why; where they are fast it runs them. Tiny sizes
stand in for the real ones, with the slowdown probe replaced (timings are not tested)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

TINY = ["--d-model", "32", "--d-sae", "128", "--n-steps", "4", "--batch", "64", "--reps", "1", "--rounds", "2"]


@pytest.fixture
def mp_sae(monkeypatch):
    return load_script(monkeypatch, "benchmarks/mp_sae.py")


def bf16_keys(res: dict) -> tuple[list[str], list[str]]:
    rows = [r["impl"] for r in res["rows"] if "bf16" in r["impl"] or "bfloat16" in r["impl"]]
    return rows, [k for k in res["speedup"] if "bf16" in k]


def test_bf16_rows_are_left_out_with_the_reason_where_bf16_products_are_slow(mp_sae, monkeypatch, tmp_path):
    from interp import precision

    monkeypatch.setattr(precision, "matmul_slowdown", lambda kind, dtype: 50.0)
    out = tmp_path / "mp.json"
    res = mp_sae.main([*TINY, "--out", str(out)])
    why = res["config"]["bf16_skipped"]
    assert why.startswith("the bf16 rows left out") and "50x" in why
    assert bf16_keys(res) == ([], [])
    assert json.loads(out.read_text())["config"]["bf16_skipped"] == why
    assert any(r["impl"].startswith("ours (nonneg, accumulate) train step") for r in res["rows"])  # fp32 still ran


def test_bf16_rows_run_where_bf16_products_are_fast(mp_sae, monkeypatch, tmp_path):
    from interp import precision

    monkeypatch.setattr(precision, "matmul_slowdown", lambda kind, dtype: 0.7)
    res = mp_sae.main([*TINY, "--out", str(tmp_path / "mp.json")])
    assert "bf16_skipped" not in res["config"]
    rows, ratios = bf16_keys(res)
    assert len(rows) == 3 and {"encode_bf16_pursuit_vs_fp32_warm", "train_step_bf16_autocast_vs_fp32"} <= set(ratios)
    low = next(r for r in res["rows"] if r["impl"] == "ours encode warm, pursuit_dtype=bfloat16")
    assert 0 <= abs(low["fvu_relative_change"]) < 0.1 and low["fvu_fp32"] > 0
