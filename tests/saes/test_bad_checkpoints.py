"""The corpus of bad checkpoints (sae_testdata.BAD_CHECKPOINTS), each refused with its own clear
one-line error; fuzzing of the parsers."""

from __future__ import annotations

import json
import pickle
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sae_testdata import (
    BAD_CHECKPOINT_MESSAGES,
    BAD_CHECKPOINTS,
    edit_cfg,
    ours,
    pickle_file,
    saelens_style,
    sparsify_style,
)

import saes
from saes import SAEError
from saes.checkpoint import CFG_FILENAME, load
from saes.safetensors_check import (
    MAX_HEADER_BYTES,
    CheckpointError,
    parse_header,
    read_header,
)


@pytest.mark.parametrize("name,make_bad", BAD_CHECKPOINTS, ids=[name for name, _ in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_refused_with_its_own_message(tmp_path, name, make_bad):
    target = make_bad(tmp_path)
    with pytest.raises(SAEError) as info:
        saes.read(target)
    err = info.value
    assert isinstance(err, CheckpointError)
    assert re.search(BAD_CHECKPOINT_MESSAGES[name], str(err)), str(err)
    assert "\n" not in str(err)  # one line
    assert str(tmp_path) in str(err)  # every message names the file


def test_corpus_is_importable_as_name_builder_pairs():
    names = [name for name, _ in BAD_CHECKPOINTS]
    assert len(names) == len(set(names)) == len(BAD_CHECKPOINT_MESSAGES)
    assert all(callable(build) and build.__name__ == name for name, build in BAD_CHECKPOINTS)


def test_pickle_is_never_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError):
        load(pickle_file(tmp_path))


def test_oversized_header_length_is_not_allocated(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(CheckpointError, match="header length field"):
        read_header(path)


def test_tiny_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="fewer than the 8-byte header length"):
        read_header(path)


# ----------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "I64", "U8", "X9"]) | json_values,
    "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=8), entry | json_values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), data_size=st.integers(0, 2**40))
def test_parse_header_fuzz_bytes(raw, data_size):
    try:
        parse_header(raw, data_size)
    except CheckpointError:
        pass


@settings(max_examples=150, deadline=None)
@given(header=headers, data_size=st.integers(0, 256))
def test_parse_header_fuzz_structured(header, data_size):
    try:
        entries, _ = parse_header(json.dumps(header).encode(), data_size)
    except CheckpointError:
        return
    assert sum(e.end - e.begin for e in entries.values()) == data_size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_cfg_bytes_fuzz(raw):
    with tempfile.TemporaryDirectory() as tmp:
        folder = saelens_style(Path(tmp) / "s")
        (folder / CFG_FILENAME).write_bytes(raw)
        try:
            load(folder)
        except CheckpointError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(
    st.sampled_from(["d_in", "d_sae", "dtype", "architecture", "apply_b_dec_to_input", "normalize_activations",
                     "reshape_activations", "metadata", "k", "rescale_acts_by_decoder_norm", "interp"]),
    json_values, max_size=4))
def test_config_fuzz_saelens_layout(changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = saelens_style(Path(tmp) / "s", arch="topk", k=4)
        edit_cfg(folder, lambda c: c.update(changes))
        try:
            load(folder)
        except CheckpointError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(
    st.sampled_from(["format_version", "architecture", "config", "files", "training", "library_version"]),
    json_values, max_size=3),
    config_changes=st.dictionaries(st.sampled_from(["d_model", "d_sae", "k", "k_aux", "aux_coeff", "bogus"]),
                                   json_values, max_size=3))
def test_config_fuzz_project_block(changes, config_changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = ours(Path(tmp) / "s")
        edit_cfg(folder, lambda c: (c["interp"]["config"].update(config_changes), c["interp"].update(changes)))
        try:
            load(folder)
        except CheckpointError:
            pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(
    st.sampled_from(["d_in", "k", "num_latents", "expansion_factor", "activation", "skip_connection", "transcode"]),
    json_values, max_size=4))
def test_config_fuzz_sparsify_layout(changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = sparsify_style(Path(tmp) / "layers.0", **changes)
        try:
            load(folder)
        except CheckpointError:
            pass


def test_huge_config_is_refused_before_allocating(tmp_path):
    """d_in and d_sae claiming a 4e12-element matrix: the header check fails first, nothing is allocated."""
    f = saelens_style(tmp_path / "s", d_in=2_000_000, d_sae=2_000_000)
    want = r"tensor 'W_enc' has shape \[8, 32\], the config needs \[2000000, 2000000\]"
    with pytest.raises(CheckpointError, match=want):
        load(f)
