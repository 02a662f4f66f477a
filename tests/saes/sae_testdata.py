"""Test data for the SAE tests: synthetic activation sources (no model needed) and a corpus of bad
checkpoints that every reader of SAE checkpoints must refuse."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saes.locate import (
    CFG_FILENAME,
    SPARSIFY_WEIGHTS,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
)


class SyntheticSource:
    """Sparse combinations of a fixed random dictionary plus an offset, as an iterable with a
    resumable position (``state_dict`` / ``load_state_dict``), like the activation store."""

    def __init__(self, d_model: int = 16, n_atoms: int = 64, rows: int = 128, seed: int = 0,
                 sites: tuple[str, ...] | None = None, density: float = 0.06):
        g = torch.Generator().manual_seed(seed)
        self.dic = torch.randn(n_atoms, d_model, generator=g)
        self.offset = torch.randn(d_model, generator=g)
        self.rows, self.seed, self.sites, self.density = rows, seed, sites, density
        self.position = 0
        self.d_model = d_model

    def batch(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        z = (torch.rand(self.rows, self.dic.shape[0], generator=g) < self.density).float()
        z = z * torch.rand(self.rows, self.dic.shape[0], generator=g) * 2
        x = z @ self.dic + self.offset
        if self.sites is None:
            return x
        return {s: x * (j + 1) for j, s in enumerate(self.sites)}

    def __iter__(self):
        while True:
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])


# ----------------------------------------------------------------------------- bad checkpoints
# A corpus of checkpoints that saes.read must refuse, each with its own one-line CheckpointError.
# Every builder takes an empty folder and returns the path to hand to the reader (site not named).
# Import it as ``from sae_testdata import BAD_CHECKPOINTS`` from tests/saes, or as
# ``from tests.saes.sae_testdata import BAD_CHECKPOINTS`` from anywhere with the repository root on
# sys.path (``python -m pytest`` from the root), to hold any other reader of SAEs to the same corpus.

D_MODEL, D_SAE = 8, 32


def ours(folder: Path, arch: str = "topk") -> Path:
    """A checkpoint written by this project."""
    from saes import REGISTRY, save

    cls = REGISTRY[arch]
    save(cls(cls.config_class(d_model=D_MODEL, d_sae=D_SAE, **({"k": 4} if arch == "topk" else {}))), folder)
    return folder


def saelens_style(folder: Path, arch: str = "standard", tensors: dict[str, Tensor] | None = None,
                  **cfg_changes) -> Path:
    """A folder as SAELens writes it (no project block), built by hand."""
    folder.mkdir(parents=True)
    if tensors is None:
        tensors = {"W_enc": torch.randn(D_MODEL, D_SAE), "b_enc": torch.zeros(D_SAE),
                   "W_dec": torch.randn(D_SAE, D_MODEL), "b_dec": torch.zeros(D_MODEL)}
    save_file(tensors, str(folder / WEIGHTS_FILENAME))
    cfg = {"d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "architecture": arch,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_pre"}}
    cfg.update(cfg_changes)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))
    return folder


def sparsify_style(folder: Path, tensors: dict[str, Tensor] | None = None, **cfg_changes) -> Path:
    """A ``<hookpoint>`` folder as sparsify writes it, built by hand."""
    folder.mkdir(parents=True)
    if tensors is None:
        tensors = {"encoder.weight": torch.randn(D_SAE, D_MODEL), "encoder.bias": torch.zeros(D_SAE),
                   "W_dec": torch.randn(D_SAE, D_MODEL), "b_dec": torch.zeros(D_MODEL)}
    save_file(tensors, str(folder / SPARSIFY_WEIGHTS))
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": D_SAE,
           "k": 4, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_MODEL}
    cfg.update(cfg_changes)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))
    return folder


def rows_at_norm(norm: float, d_sae: int = D_SAE, d_model: int = D_MODEL, seed: int = 0) -> Tensor:
    """A random ``W_dec [d_sae, d_model]`` whose rows all have the given norm."""
    w = torch.randn(d_sae, d_model, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=1, keepdim=True) * norm


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


def bad_sha256(tmp: Path) -> Path:
    """One byte of a weight changed: same size, another checksum."""
    f = ours(tmp / "s")
    data = bytearray((f / WEIGHTS_FILENAME).read_bytes())
    data[-1] ^= 0x01
    (f / WEIGHTS_FILENAME).write_bytes(bytes(data))
    return f


def wrong_shape(tmp: Path) -> Path:
    return saelens_style(tmp / "s", d_sae=D_SAE * 2)


def wrong_bias_shape(tmp: Path) -> Path:
    return saelens_style(tmp / "s", tensors={"W_enc": torch.randn(D_MODEL, D_SAE), "b_enc": torch.zeros(D_SAE + 1),
                                             "W_dec": torch.randn(D_SAE, D_MODEL), "b_dec": torch.zeros(D_MODEL)})


def wrong_k(tmp: Path) -> Path:
    return saelens_style(tmp / "s", arch="topk", k=D_SAE + 1)


def k_disagrees(tmp: Path) -> Path:
    """Our checkpoint whose SAELens-facing ``k`` no longer matches the project block's."""
    f = ours(tmp / "s")
    edit_cfg(f, lambda c: c.update(k=5))
    return f


def rescaled_topk_off_unit_norm(tmp: Path) -> Path:
    """SAELens TopK with ``rescale_acts_by_decoder_norm`` whose decoder norms were never folded in."""
    return saelens_style(tmp / "s", arch="topk", k=4, rescale_acts_by_decoder_norm=True,
                         tensors={"W_enc": torch.randn(D_MODEL, D_SAE), "b_enc": torch.zeros(D_SAE),
                                  "W_dec": rows_at_norm(1.05), "b_dec": torch.zeros(D_MODEL)})


def matching_pursuit_off_unit_norm(tmp: Path) -> Path:
    return saelens_style(tmp / "s", arch="matching_pursuit", max_iterations=4,
                         tensors={"W_dec": rows_at_norm(0.5), "b_dec": torch.zeros(D_MODEL)})


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


def sparsify_wrong_shape(tmp: Path) -> Path:
    return sparsify_style(tmp / "layers.0", num_latents=D_SAE * 2)


def sparsify_skip_connection(tmp: Path) -> Path:
    return sparsify_style(tmp / "layers.0", skip_connection=True)


BAD_CHECKPOINT_MESSAGES: dict[str, str] = {
    "truncated": r"outside the \d+-byte data buffer",
    "truncated_ours": r"size or SHA-256 differs",
    "bad_sha256": r"sae_weights.safetensors: size or SHA-256 differs from .*cfg.json",
    "wrong_shape": r"tensor 'W_enc' has shape \[8, 32\], the config needs \[8, 64\]",
    "wrong_bias_shape": r"tensor 'b_enc' has shape \[33\], the config needs \[32\]",
    "wrong_k": r"does not build a TopKConfig: TopKConfig.k must be an integer in \[1, d_sae=32\], got 33",
    "k_disagrees": r"k=5 disagrees with 'interp' \(4\)",
    "rescaled_topk_off_unit_norm": r"W_dec row norms are in \[1\.0[45]\d*, 1\.05\d*\], not within 1e-06 of 1; "
                                   r"with rescale_acts_by_decoder_norm=true .*fold_W_dec_norm",
    "matching_pursuit_off_unit_norm": r"W_dec row norms are in \[0\.[45]\d*, 0\.5\d*\].*SAELens' matching pursuit",
    "bogus_header_length": r"header length field says 4611686018427387904 bytes",
    "header_not_json": r"header is not valid UTF-8 JSON",
    "overlapping_offsets": r"overlaps the previous tensor",
    "shape_disagrees_with_bytes": r"tensor 'b_dec' of shape \[8000\] and dtype F32 needs 32000 bytes",
    "missing_config_key": r"missing config key 'd_sae'",
    "missing_project_key": r"missing config key 'interp.config'",
    "unknown_architecture": r"unknown architecture 'gated'",
    "unknown_project_architecture": r"unknown architecture 'transcoder'; registered",
    "newer_format": r"format version 99 is newer",
    "bad_config_value": r"does not build a 'topk' SAE: .*k must be",
    "extra_tensor": r"unexpected tensor 'W_skip'",
    "missing_tensor": r"missing tensor 'threshold'",
    "wrong_dtype": r"tensor 'W_enc' has dtype F32, the config needs bfloat16",
    "pickle_file": r"refusing a pickle-based checkpoint \(\.pt\)",
    "pickle_folder": r"pytorch_model.bin: refusing a pickle-based checkpoint",
    "cfg_not_json": r"cfg.json: not valid JSON",
    "stray_sparsity": r"sparsity.safetensors: not listed in .*from another save",
    "bad_normalization": r"normalize_activations='layer_norm' is applied at inference",
    "bad_dtype_name": r"'dtype' is 'float128'",
    "weights_missing": r"sae_weights.safetensors: file not found",
    "only_weights": r"no cfg.json here \(found \['sae_weights.safetensors'\]\)",
    "sparsify_wrong_shape": r"sae.safetensors: tensor 'encoder.weight' has shape \[32, 8\], the config needs \[64, 8\]",
    "sparsify_skip_connection": r"sparsify skip_connection=True has no equivalent",
}
"""What each bad checkpoint's error says (a regular expression)."""

BAD_CHECKPOINTS: list[tuple[str, Callable[[Path], Path]]] = [(name, globals()[name])
                                                             for name in BAD_CHECKPOINT_MESSAGES]
"""``(name, build)`` for every bad checkpoint: ``build(empty_folder)`` writes it and returns the path
to read. Every reader of SAE checkpoints must refuse each one with one line naming the file."""
