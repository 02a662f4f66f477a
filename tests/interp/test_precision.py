"""Half precision where its matrix products take torch's slow path: measured, and said once before the work."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import saes
from interp import precision
from saes.trainer import TrainConfig, Trainer


def ours(got) -> list:
    """The :class:`precision.SlowPrecisionWarning` records among ``got`` (pytest.warns records every warning)."""
    return [w for w in got if issubclass(w.category, precision.SlowPrecisionWarning)]


@pytest.fixture
def slow(monkeypatch):
    """This machine as one whose half-precision products run 50x float32's time (AVX2-only CPUs measure 18-130x)."""
    monkeypatch.setattr(precision, "matmul_slowdown", lambda kind, dtype: 50.0)
    monkeypatch.setattr(precision, "_warned", set())


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(precision, "matmul_slowdown", lambda kind, dtype: 0.8)
    monkeypatch.setattr(precision, "_warned", set())


def test_the_probe_measures_this_cpu():
    assert precision.matmul_slowdown("cpu", torch.float32) == 1.0
    for dtype in (torch.bfloat16, torch.float16):
        ratio = precision.matmul_slowdown("cpu", dtype)
        assert math.isfinite(ratio) and ratio > 0
    assert precision.matmul_slowdown("meta", torch.bfloat16) == 1.0  # not measured there


def test_warns_once_naming_what_and_the_remedy(slow):
    with pytest.warns(precision.SlowPrecisionWarning) as got:
        assert precision.warn_if_slow("cpu", "the widget", "use float32 here")
        assert precision.warn_if_slow("cpu", "the widget", "use float32 here")  # the same use: said once
    assert len(ours(got)) == 1
    msg = str(ours(got)[0].message)
    assert "the widget" in msg and "bfloat16" in msg and "50x" in msg and msg.endswith("use float32 here")
    assert "\n" not in msg
    with pytest.warns(precision.SlowPrecisionWarning, match="float16"):
        precision.warn_if_slow("cpu", "the widget", "use float32 here", dtype=torch.float16)


def test_no_warning_where_half_precision_is_fast(fast):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not precision.warn_if_slow("cpu", "the widget", "use float32 here")


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(64, 32, generator=g) for _ in range(n)]


def test_bf16_training_warns_at_the_callers_line(slow):
    sae = saes.build("topk", d_model=32, d_sae=128, k=4)
    with pytest.warns(precision.SlowPrecisionWarning, match="bf16=True") as got:
        Trainer(sae, TrainConfig(total_tokens=256, batch_tokens=64, bf16=True, progress=False)).fit(_batches())
    assert ours(got)[0].filename == __file__
    assert "drop --bf16" in str(ours(got)[0].message)


def test_fp32_training_does_not_probe(monkeypatch):
    def probe(kind, dtype):
        raise AssertionError("probed without bf16")

    monkeypatch.setattr(precision, "matmul_slowdown", probe)
    sae = saes.build("topk", d_model=32, d_sae=128, k=4)
    Trainer(sae, TrainConfig(total_tokens=256, batch_tokens=64, progress=False)).fit(_batches())


def test_bf16_mp_pursuit_and_gram_warn(slow):
    sae = saes.build("mpsae", d_model=32, d_sae=128, k=4, pursuit_dtype="bfloat16")
    with pytest.warns(precision.SlowPrecisionWarning, match="pursuit_dtype='float32'") as got:
        sae.encode(torch.randn(8, 32))
    assert ours(got)[0].filename == __file__
    sae = saes.build("mpsae", d_model=32, d_sae=128, k=4, train_gram_dtype="bfloat16", correlation_update="gram")
    with pytest.warns(precision.SlowPrecisionWarning, match="train_gram_dtype='float32'"):
        Trainer(sae, TrainConfig(total_tokens=256, batch_tokens=64, progress=False)).fit(_batches())


def test_bf16_model_load_warns(slow, tiny_dir):
    from interp.models import load_model

    with pytest.warns(precision.SlowPrecisionWarning, match="drop --model-dtype") as got:
        model, _ = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert ours(got)[0].filename == __file__
    assert next(model.parameters()).dtype == torch.bfloat16  # warned, not refused: the values are right


def test_benchmarks_leave_slow_rows_out_with_the_reason(slow):
    why = precision.skip_reason("cpu", "--bf16 rows")
    assert why.startswith("--bf16 rows left out") and "50x" in why and "\n" not in why


def test_benchmarks_run_the_rows_where_half_precision_is_fast(fast):
    assert precision.skip_reason("cpu", "--bf16 rows") is None
