"""A corpus of bad checkpoints, each refused with its own clear error; fuzzing of the parsers."""

from __future__ import annotations

import json
import pickle
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from saes import REGISTRY
from saes.checkpoint import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME, load, save
from saes.safetensors_check import MAX_HEADER_BYTES, CheckpointError, parse_header, read_header

D_MODEL, D_SAE = 8, 32


def ours(folder: Path, arch: str = "topk") -> Path:
    cls = REGISTRY[arch]
    save(cls(cls.config_class(d_model=D_MODEL, d_sae=D_SAE, **({"k": 4} if arch == "topk" else {}))), folder)
    return folder


def saelens_style(folder: Path, arch: str = "standard", **cfg_changes) -> Path:
    """A folder as SAELens writes it (no project block), built by hand."""
    folder.mkdir(parents=True)
    tensors = {"W_enc": torch.randn(D_MODEL, D_SAE), "b_enc": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_MODEL), "b_dec": torch.zeros(D_MODEL)}
    save_file(tensors, str(folder / WEIGHTS_FILENAME))
    cfg = {"d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "architecture": arch,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_pre"}}
    cfg.update(cfg_changes)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))
    return folder


def edit_cfg(folder: Path, fn) -> None:
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    fn(cfg)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))


def rewrite_header(path: Path, fn) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def truncated(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    data = (f / WEIGHTS_FILENAME).read_bytes()
    (f / WEIGHTS_FILENAME).write_bytes(data[: len(data) - 100])
    return f


def truncated_ours(tmp: Path) -> Path:
    f = ours(tmp / "s")
    data = (f / WEIGHTS_FILENAME).read_bytes()
    (f / WEIGHTS_FILENAME).write_bytes(data[: len(data) // 2])
    return f


def wrong_shape(tmp: Path) -> Path:
    return saelens_style(tmp / "s", d_sae=D_SAE * 2)


def bogus_header_length(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    raw = (f / WEIGHTS_FILENAME).read_bytes()
    (f / WEIGHTS_FILENAME).write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    return f


def header_not_json(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    raw = bytearray((f / WEIGHTS_FILENAME).read_bytes())
    raw[8:12] = b"\xff\xfe{["
    (f / WEIGHTS_FILENAME).write_bytes(bytes(raw))
    return f


def overlapping_offsets(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")

    def overlap(h):  # b_dec claims the first bytes, which another tensor already owns
        h["b_dec"]["data_offsets"] = [0, 4 * D_MODEL]

    rewrite_header(f / WEIGHTS_FILENAME, overlap)
    return f


def shape_disagrees_with_bytes(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    rewrite_header(f / WEIGHTS_FILENAME, lambda h: h["b_dec"].update(shape=[D_MODEL * 1000]))
    return f


def missing_config_key(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    edit_cfg(f, lambda c: c.pop("d_sae"))
    return f


def missing_project_key(tmp: Path) -> Path:
    f = ours(tmp / "s")
    edit_cfg(f, lambda c: c["interp"].pop("config"))
    return f


def unknown_architecture(tmp: Path) -> Path:
    return saelens_style(tmp / "s", arch="gated")


def unknown_project_architecture(tmp: Path) -> Path:
    f = ours(tmp / "s")
    edit_cfg(f, lambda c: c["interp"].update(architecture="transcoder"))
    return f


def newer_format(tmp: Path) -> Path:
    f = ours(tmp / "s")
    edit_cfg(f, lambda c: c["interp"].update(format_version=99))
    return f


def bad_config_value(tmp: Path) -> Path:
    f = ours(tmp / "s")
    edit_cfg(f, lambda c: c["interp"]["config"].update(k=10**6))
    return f


def extra_tensor(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    t = load_file(str(f / WEIGHTS_FILENAME))
    t["W_skip"] = torch.zeros(D_MODEL, D_MODEL)
    save_file(t, str(f / WEIGHTS_FILENAME))
    return f


def missing_tensor(tmp: Path) -> Path:
    return saelens_style(tmp / "s", arch="jumprelu")  # no 'threshold' tensor


def wrong_dtype(tmp: Path) -> Path:
    return saelens_style(tmp / "s", dtype="bfloat16")


def pickle_file(tmp: Path) -> Path:
    (tmp / "sae.pt").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    return tmp / "sae.pt"


def pickle_folder(tmp: Path) -> Path:
    (tmp / "s").mkdir()
    (tmp / "s" / "pytorch_model.bin").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    return tmp / "s"


def cfg_not_json(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    (f / CFG_FILENAME).write_text("{'d_in': 8,")
    return f


def stray_sparsity(tmp: Path) -> Path:
    f = ours(tmp / "s")
    save_file({"sparsity": torch.zeros(D_SAE)}, str(f / SPARSITY_FILENAME))
    return f


def bad_normalization(tmp: Path) -> Path:
    return saelens_style(tmp / "s", normalize_activations="layer_norm")


def bad_dtype_name(tmp: Path) -> Path:
    return saelens_style(tmp / "s", dtype="float128")


def weights_missing(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    (f / WEIGHTS_FILENAME).unlink()
    return f


def only_weights(tmp: Path) -> Path:
    f = saelens_style(tmp / "s")
    (f / CFG_FILENAME).unlink()
    return f


CORPUS = {
    truncated: r"outside the \d+-byte data buffer",
    truncated_ours: r"size or SHA-256 differs",
    wrong_shape: r"tensor 'W_enc' has shape \[8, 32\], the config needs \[8, 64\]",
    bogus_header_length: r"header length field says 4611686018427387904 bytes",
    header_not_json: r"header is not valid UTF-8 JSON",
    overlapping_offsets: r"overlaps the previous tensor",
    shape_disagrees_with_bytes: r"tensor 'b_dec' of shape \[8000\] and dtype F32 needs 32000 bytes",
    missing_config_key: r"missing config key 'd_sae'",
    missing_project_key: r"missing config key 'interp.config'",
    unknown_architecture: r"unknown architecture 'gated'",
    unknown_project_architecture: r"unknown architecture 'transcoder'; registered",
    newer_format: r"format version 99 is newer",
    bad_config_value: r"does not build a 'topk' SAE: .*k must be",
    extra_tensor: r"unexpected tensor 'W_skip'",
    missing_tensor: r"missing tensor 'threshold'",
    wrong_dtype: r"tensor 'W_enc' has dtype F32, the config needs bfloat16",
    pickle_file: r"refusing a pickle-based checkpoint \(\.pt\)",
    pickle_folder: r"pytorch_model.bin: refusing a pickle-based checkpoint",
    cfg_not_json: r"cfg.json: not valid JSON",
    stray_sparsity: r"sparsity.safetensors: not listed in .*from another save",
    bad_normalization: r"normalize_activations='layer_norm' is applied at inference",
    bad_dtype_name: r"'dtype' is 'float128'",
    weights_missing: r"sae_weights.safetensors: file not found",
    only_weights: r"no cfg.json here \(found \['sae_weights.safetensors'\]\)",
}


@pytest.mark.parametrize("make_bad", list(CORPUS), ids=lambda f: f.__name__)
def test_bad_checkpoint_is_refused_with_its_own_message(tmp_path, make_bad):
    target = make_bad(tmp_path)
    with pytest.raises(CheckpointError, match=CORPUS[make_bad]) as info:
        load(target)
    assert str(tmp_path) in str(info.value)  # every message names the file


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
        folder = Path(tmp) / "layers.0"
        folder.mkdir()
        save_file({"encoder.weight": torch.randn(D_SAE, D_MODEL), "encoder.bias": torch.zeros(D_SAE),
                   "W_dec": torch.randn(D_SAE, D_MODEL), "b_dec": torch.zeros(D_MODEL)},
                  str(folder / "sae.safetensors"))
        cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE,
               "k": 4, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_MODEL}
        cfg.update(changes)
        (folder / CFG_FILENAME).write_text(json.dumps(cfg))
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
