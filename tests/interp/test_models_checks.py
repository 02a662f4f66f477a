"""load_model's dtype and device arguments: torch_dtype honoured, bad values and absent CUDA refused in one line."""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError, ModelLoadError
from interp.models import load_model, looks_local, resolve_device


def test_torch_dtype_is_honoured(tiny_dir):
    model, _ = load_model(str(tiny_dir), device="cpu", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(str(tiny_dir), device="cpu", dtype="bfloat16", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ModelLoadError, match="dtype=torch.float32 and torch_dtype=torch.bfloat16"):
        load_model(str(tiny_dir), device="cpu", dtype=torch.float32, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("bad", ["auto", "int8", "nn"])
def test_bad_dtype_names_the_value_given(bad, tiny_dir):
    with pytest.raises(ModelLoadError, match=f"got '{bad}'") as e:
        load_model(str(tiny_dir), device="cpu", dtype=bad)
    assert "\n" not in str(e.value)


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for dev in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(InputError, match="has none") as e:
            resolve_device(dev)
        assert "\n" not in str(e.value)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(InputError, match="not a device"):
        resolve_device("gpu")


def test_cuda_index_past_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match="GPU 3"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_load_model_refuses_cuda_before_loading(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(InputError, match="asks for CUDA"):
        load_model(str(tiny_dir), device="cuda")


@pytest.mark.parametrize("name", ["docs.jsonl", "data.csv", "data.parquet"])
def test_corpus_file_suffixes_look_local(name):
    assert looks_local(name)
    assert not looks_local("wikitext") and not looks_local("owner/name")
