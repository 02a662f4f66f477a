"""Save and load SAEs: one folder per SAE, SAELens' v6 layout, safetensors + JSON only.

A folder holds ``cfg.json``, ``sae_weights.safetensors`` and, when known, ``sparsity.safetensors``
(SAELens' ``{"sparsity": log10 firing frequency}``). ``cfg.json`` carries SAELens' keys
(``d_in``, ``d_sae``, ``dtype``, ``architecture``, ``apply_b_dec_to_input``,
``normalize_activations``, ``metadata{model_name, hook_name, context_size, prepend_bos ...}``)
so that ``sae_lens.SAE.load_from_disk`` reads it, plus this project's block under ``"interp"``:
format and library versions, the full ``cfg.to_dict()`` (so a round trip loses nothing), the
training summary, and the size and SHA-256 of every file written. Several SAEs (one per site)
live in one repository, one subfolder each.

Writes go to a hidden temporary folder that is renamed into place, and the checksums in
``cfg.json`` tie the files together: a crash never leaves a half-written checkpoint that loads.
Loads are strict and never unpickle: see :func:`read`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.atomic import save_file
from interp.folders import remove_temps, temp_name
from interp.provenance import file_sha256
from saes import peers
from saes.base import REGISTRY, SAE, SAEError
from saes.locate import (
    CFG_FILENAME,
    SPARSIFY_WEIGHTS,
    SPARSITY_FILENAME,
    WEIGHTS_FILENAME,
    confine,
    is_sparsify_layout,
    list_sites,
    locate,
    no_checkpoint,
    read_cfg,
)
from saes.safetensors_check import CheckpointError, load_tensors, read_header

__all__ = ["Checkpoint", "CheckpointError", "save", "load", "read", "annotate", "list_sites", "FORMAT_VERSION"]

PROJECT_KEY = "interp"
FORMAT_VERSION = 1
SAELENS_LAYOUT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: SAELens then reads the file as its v6 layout."""
CHECKPOINT_FILES = (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME)
SPARSITY_EPS = 1e-10
"""Added before log10, as SAELens does."""


@dataclass(frozen=True)
class Checkpoint:
    """An SAE read from disk or the Hub, with what its folder says about it."""

    sae: SAE
    metadata: dict[str, Any]
    """SAELens metadata: ``model_name``, ``hook_name``, ``context_size``, ``prepend_bos`` ..."""
    training: dict[str, Any]
    """This project's training summary (``n_tokens``, ``metrics{l0, explained_variance,
    ce_loss_recovered}`` ...); empty for checkpoints written elsewhere."""
    sparsity: Tensor | None
    """Firing frequency of each latent (fraction of tokens), ``[d_sae]``, or None if not saved."""
    source: str
    """Who wrote it: ``"interp"``, ``"saelens"`` or ``"sparsify"``."""
    path: Path
    library_version: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The whole ``cfg.json``, as read."""

    def decoder(self) -> Float[Tensor, "d_sae d_model"]:
        """The direction each latent writes, detached: ``decode(codes) = codes @ decoder() + decode(0)``.
        That is ``W_dec``, except for an MP-SAE, which decodes with its rows divided by their norm."""
        with torch.no_grad():
            atoms = getattr(self.sae, "atoms", None)
            return (atoms() if callable(atoms) else self.sae.W_dec).detach()

    def encoder(self, sparse: bool = False) -> Callable[[Float[Tensor, "... d_model"]], Tensor]:
        """``sae.encode`` without autograd: activations to codes, what feature finders and dashboards take.
        With `sparse`, ``sae.encode_sparse``: ``[n, d_model]`` to a sparse COO tensor of the same codes
        (what the dashboard pass reads fastest)."""
        sae = self.sae
        fn = sae.encode_sparse if sparse else sae.encode

        def encode(x: Float[Tensor, "... d_model"]) -> Tensor:
            with torch.no_grad():
                return fn(x)

        return encode


def library_version() -> str:
    try:
        return importlib_metadata.version("interp-toolkit")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------- save
def save(
    sae: SAE,
    folder: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    sparsity: Float[Tensor, " d_sae"] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to ``folder`` atomically; returns the folder.

    Args:
        sae: an SAE whose class is registered in ``saes.REGISTRY``.
        folder: the SAE's own folder (for several sites, one subfolder per site). An existing
            folder is replaced only if it holds nothing but checkpoint files.
        metadata: SAELens metadata, e.g. ``{"model_name": ..., "hook_name": "blocks.6.hook_resid_post",
            "context_size": 128, "prepend_bos": False}``; any JSON values.
        sparsity: firing frequency of each latent in [0, 1], shape ``[d_sae]``; stored as SAELens'
            log10 frequency.
        training: JSON summary of the run (``n_tokens``, ``metrics`` ...), kept under ``"interp"``.
    """
    if not isinstance(sae, SAE) or REGISTRY.get(sae.architecture) is not type(sae):
        raise SAEError(f"save() needs an SAE whose class is registered in saes.REGISTRY, got "
                       f"{type(sae).__name__} (architecture {getattr(sae, 'architecture', None)!r})")
    folder = Path(folder)
    peers.check_finite(sae, f"save({folder})")
    cfg_json = _cfg_json(sae, metadata, training)
    state = {k: v.to("cpu", copy=True).contiguous() for k, v in peers.file_tensors(sae, "interp").items()}
    sparsity_state = None if sparsity is None else {"sparsity": _log_sparsity(sparsity, sae.cfg.d_sae)}
    _check_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_temps(folder.parent, folder.name)  # left by a save of this folder that was killed
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_name(folder.name)))
    try:
        save_file(state, str(tmp / WEIGHTS_FILENAME), metadata={"format": "pt"})
        if sparsity_state is not None:
            save_file(sparsity_state, str(tmp / SPARSITY_FILENAME), metadata={"format": "pt"})
        cfg_json[PROJECT_KEY]["files"] = {
            p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())
        }
        _write_json(tmp / CFG_FILENAME, cfg_json)
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _cfg_json(sae: SAE, metadata: dict[str, Any] | None, training: dict[str, Any] | None) -> dict[str, Any]:
    for name, value in (("metadata", metadata), ("training", training)):
        if value is not None and not isinstance(value, dict):
            raise SAEError(f"{name} must be a dict or None, got {type(value).__name__}")
    theirs = peers.saelens_architecture(sae)
    meta: dict[str, Any] = {"sae_lens_version": SAELENS_LAYOUT_VERSION, "model_name": None, "hook_name": None,
                            "hook_head_index": None, "context_size": None, "prepend_bos": None}
    meta.update(metadata or {})
    cfg = {
        "d_in": sae.cfg.d_model,
        "d_sae": sae.cfg.d_sae,
        "dtype": peers.dtype_name(sae.dtype),
        "device": "cpu",
        "architecture": theirs,
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **peers.saelens_fields(sae.cfg, theirs),
        "metadata": meta,
        PROJECT_KEY: {
            "format_version": FORMAT_VERSION,
            "library_version": library_version(),
            "architecture": sae.architecture,
            "config": sae.cfg.to_dict(),
            "training": training or {},
        },
    }
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SAEError(f"the SAE config, metadata and training summary must be plain JSON values "
                       f"(no NaN/inf, tensors or objects): {e}") from None
    return cfg


def _log_sparsity(sparsity: Tensor, d_sae: int) -> Tensor:
    s = torch.as_tensor(sparsity).detach().to("cpu", torch.float32)
    if tuple(s.shape) != (d_sae,):
        raise SAEError(f"sparsity must have shape [d_sae={d_sae}], got {list(s.shape)}")
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise SAEError("sparsity must be firing frequencies in [0, 1] (fraction of tokens where each latent "
                       f"is nonzero); got values in [{s.min().item()}, {s.max().item()}]")
    return torch.log10(s + SPARSITY_EPS).contiguous()


def _check_target(folder: Path) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: exists and is not a folder; choose another path")
        other = sorted(p.name for p in folder.iterdir() if p.name not in CHECKPOINT_FILES)
        if other:
            raise CheckpointError(f"{folder}: will not replace a folder that holds other things ({other[:5]}); "
                                  "save each SAE to its own (sub)folder")


def _swap_in(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_name(folder.name)))
    old.rmdir()
    os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------- load
def load(path_or_repo_id: str | os.PathLike, site: str | None = None,
         device: str | torch.device | None = None) -> SAE:
    """Load an SAE written here, by SAELens or by sparsify, from a folder or a Hub repo id.

    ``site`` picks a subfolder when the folder or repo holds several SAEs (it may be omitted
    when there is only one). From the Hub only that site's files are downloaded. The SAE is
    returned in eval mode (call ``.train()`` to fine-tune it).
    """
    return read(path_or_repo_id, site=site, device=device).sae


def read(path_or_repo_id: str | os.PathLike, site: str | None = None,
         device: str | torch.device | None = None) -> Checkpoint:
    """Like :func:`load`, also returning metadata, training summary and sparsity.

    Reads this project's checkpoints, SAELens' (as its runner saves them, TopK with
    ``rescale_acts_by_decoder_norm`` and unit-norm decoder rows included) and sparsify's (a run
    folder with one hookpoint needs no ``site``). Strict: an unknown architecture, a missing or
    extra tensor, a shape or dtype that disagrees with the config, a config SAELens would read as
    another SAE, a file whose checksum differs, or a pickle-based checkpoint is a one-line
    :class:`CheckpointError` naming the file and the key.
    """
    folder = locate(path_or_repo_id, site)
    if not (folder / CFG_FILENAME).is_file():
        raise no_checkpoint(folder)
    if Path(path_or_repo_id).exists():  # a local folder (Hub downloads are links into the Hub cache)
        confine(folder)
    where = str(folder / CFG_FILENAME)
    cfg = read_cfg(folder / CFG_FILENAME)
    if PROJECT_KEY in cfg:
        ckpt = _read_ours(folder, cfg, where)
    else:
        if is_sparsify_layout(cfg):
            entries, _ = read_header(folder / SPARSIFY_WEIGHTS)
            first = entries.get("encoder.weight")
            dtype = first.torch_dtype if first is not None and first.torch_dtype in peers.DTYPE_NAMES.values() \
                else torch.float32
            hookpoint = peers.sparsify_hookpoint(folder)
            imported, weights = peers.from_sparsify(cfg, hookpoint, dtype, where), SPARSIFY_WEIGHTS
        else:
            imported, weights = peers.from_saelens(cfg, where), WEIGHTS_FILENAME
        sae = _fill(imported, folder / weights)
        sparsity = _read_sparsity(folder, sae.cfg.d_sae) if imported.layout == "saelens" else None
        ckpt = Checkpoint(sae, imported.metadata, {}, sparsity, imported.layout, folder, None, cfg)
    ckpt.sae.eval()  # a loaded SAE is for inference (MP-SAE's stopping rules apply in eval mode)
    if device is not None:
        ckpt.sae.to(device)
    return ckpt


def _read_ours(folder: Path, cfg: dict[str, Any], where: str) -> Checkpoint:
    block = cfg[PROJECT_KEY]
    if not isinstance(block, dict):
        raise CheckpointError(f"{where}: {PROJECT_KEY!r} must be an object, got {type(block).__name__}")
    for key in ("format_version", "architecture", "config", "files"):
        if key not in block:
            raise CheckpointError(f"{where}: missing config key '{PROJECT_KEY}.{key}'")
    version = block["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: '{PROJECT_KEY}.format_version' is {version!r}; expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {version} is newer than this library reads "
                              f"({FORMAT_VERSION}); upgrade interp-toolkit")
    arch, config = block["architecture"], block["config"]
    if not isinstance(arch, str) or arch not in REGISTRY:
        raise CheckpointError(f"{where}: unknown architecture {arch!r}; registered: {sorted(REGISTRY)}")
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: '{PROJECT_KEY}.config' must be an object, got {type(config).__name__}")
    try:
        sae_cfg = REGISTRY[arch].config_class.from_dict(config)
    except (SAEError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: '{PROJECT_KEY}.config' does not build a {arch!r} SAE: {e}") from e
    for key, want in (("d_in", sae_cfg.d_model), ("d_sae", sae_cfg.d_sae)):
        if cfg.get(key) != want:
            raise CheckpointError(f"{where}: {key}={cfg.get(key)!r} disagrees with '{PROJECT_KEY}.config' ({want})")
    files = block["files"]
    _verify_files(folder, files, where)
    dtype = peers.dtype_from_name(cfg.get("dtype"), where)
    sae = _fill(peers.Imported(sae_cfg, dtype, {}, "interp"), folder / WEIGHTS_FILENAME)
    _check_saelens_view(sae, cfg, where)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    training = block.get("training") if isinstance(block.get("training"), dict) else {}
    sparsity = _read_sparsity(folder, sae_cfg.d_sae) if SPARSITY_FILENAME in files else None
    version_written = block.get("library_version")
    return Checkpoint(sae, dict(meta), dict(training), sparsity, "interp", folder,
                      version_written if isinstance(version_written, str) else None, cfg)


def _check_saelens_view(sae: SAE, cfg: dict[str, Any], where: str) -> None:
    """The keys SAELens reads (``architecture``, ``k``, ``apply_b_dec_to_input`` ...) describe the SAE
    read here from the same file: otherwise the two readers would compute different SAEs."""
    written = _cfg_json(sae, None, None)
    for key, want in written.items():
        if key not in ("dtype", "device", "metadata", PROJECT_KEY) and cfg.get(key) != want:
            raise CheckpointError(f"{where}: {key}={cfg.get(key)!r} disagrees with '{PROJECT_KEY}' ({want!r}), so "
                                  "SAELens would read another SAE from this file; save it again with saes.save")


def _verify_files(folder: Path, files: Any, where: str) -> None:
    """Every file the config lists is there with its size and SHA-256, and no other is."""
    if not isinstance(files, dict) or WEIGHTS_FILENAME not in files:
        raise CheckpointError(f"{where}: '{PROJECT_KEY}.files' must list {WEIGHTS_FILENAME} with its size "
                              "and checksum; the checkpoint was not written completely")
    unlisted = sorted(n for n in CHECKPOINT_FILES[1:] if n not in files and (folder / n).exists())
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: not listed in {where}; it is from another save")
    for name, info in files.items():
        path = folder / str(name)
        if not isinstance(info, dict) or name not in CHECKPOINT_FILES[1:] or not path.is_file():
            raise CheckpointError(f"{path}: listed in {where} but missing or not a checkpoint file")
        if path.stat().st_size != info.get("bytes") or file_sha256(path) != info.get("sha256"):
            raise CheckpointError(f"{path}: size or SHA-256 differs from {where}; the file is truncated, "
                                  "corrupt or from another save")


def _fill(imported: peers.Imported, weights: Path) -> SAE:
    """Build the SAE and load the file's tensors, checking names, shapes and dtypes before reading."""
    cls = REGISTRY[imported.cfg.architecture]
    with torch.device("meta"):  # shapes only: a config cannot make us allocate before the file agrees
        expected = peers.file_tensors(cls(imported.cfg).to(imported.dtype), imported.layout)
    entries, _ = read_header(weights)
    extra = sorted(set(entries) - set(expected))
    if extra:
        raise CheckpointError(f"{weights}: unexpected tensor {extra[0]!r} (all extra: {extra}); a "
                              f"{cls.architecture!r} SAE holds {sorted(expected)}")
    missing = sorted(set(expected) - set(entries))
    if missing:
        raise CheckpointError(f"{weights}: missing tensor {missing[0]!r} (all missing: {missing})")
    for name, want in expected.items():
        got = entries[name]
        if got.shape != tuple(want.shape):
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {list(got.shape)}, the config "
                                  f"needs {list(want.shape)}")
        if got.torch_dtype != want.dtype:
            raise CheckpointError(f"{weights}: tensor {name!r} has dtype {got.dtype}, the config needs "
                                  f"{str(want.dtype).removeprefix('torch.')}")
    sae = cls(imported.cfg).to(imported.dtype)
    state = peers.module_state(sae, imported.layout, load_tensors(weights), str(weights))
    sae.load_state_dict(state, strict=True)
    peers.check_weights(imported, sae, str(weights))
    return sae


def _read_sparsity(folder: Path, d_sae: int) -> Tensor | None:
    path = folder / SPARSITY_FILENAME
    if not path.is_file():
        return None
    entries, _ = read_header(path)
    if set(entries) != {"sparsity"} or entries["sparsity"].shape != (d_sae,):
        found = {k: list(e.shape) for k, e in entries.items()}
        raise CheckpointError(f"{path}: expected one tensor 'sparsity' of shape [{d_sae}], found {found}")
    log = load_tensors(path)["sparsity"].float()
    return (10.0 ** log - SPARSITY_EPS).clamp(0.0, 1.0)


def annotate(
    folder: str | os.PathLike,
    *,
    metrics: dict[str, Any] | None = None,
    sparsity: Float[Tensor, " d_sae"] | None = None,
    metadata: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Add evaluation results to a saved SAE (e.g. before :func:`saes.publish.publish`).

    ``metrics`` (e.g. the report of :func:`saes.evaluate.evaluate`: ``l0_mean``,
    ``explained_variance``, ``ce_loss_recovered`` ...) replace ``training["metrics"]`` as a whole: the
    metrics of one evaluation are never mixed with another's (an evaluation that skipped the downstream
    loss leaves no ``ce_loss_recovered`` behind from an earlier one). ``interp sae eval`` puts what they
    were measured on under ``metrics["evaluation"]`` (cache or dataset, seed, rows, site, model). Its
    ``latent_density`` tensor (``feature_density`` in older reports), if any, becomes the sparsity
    unless ``sparsity`` is given.
    ``metadata`` and ``training`` merge into theirs; ``sparsity`` (firing frequencies) replaces the
    saved one. The folder is rewritten as a whole, atomically.
    """
    metrics = dict(metrics or {})
    density = metrics.pop("latent_density", metrics.pop("feature_density", None))
    if sparsity is None and isinstance(density, Tensor):
        sparsity = density
    ckpt = read(folder)
    if ckpt.source != "interp":
        raise CheckpointError(f"{folder}: annotate() rewrites this project's checkpoints; this one was "
                              f"written by {ckpt.source} (load it and save() it here first)")
    new_training = {**ckpt.training, **(training or {})}
    if metrics:
        new_training["metrics"] = metrics
    new_meta = {k: v for k, v in {**ckpt.metadata, **(metadata or {})}.items() if k != "sae_lens_version"}
    return save(ckpt.sae, Path(folder), metadata=new_meta, training=new_training,
                sparsity=sparsity if sparsity is not None else ckpt.sparsity)
