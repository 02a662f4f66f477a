"""A training run's output folder: its lock, its resume checkpoints and the SAEs it exports.

:class:`saes.trainer.Trainer` trains; this module is what a run writes to ``out_dir`` and reads back from it:

* the folder's lock (:func:`own_output`), held by rank 0 while the run writes, with the temporary files a killed run
  left removed;
* resume checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`; the format is :mod:`saes.resume`'s), which
  carry the settings that change the result (:func:`settings`) so that a resume with other settings is refused;
* the trained SAEs, one folder each (:func:`folder_name`), and ``train_history.json`` (:func:`export`); a new run
  (not a resume) in a folder holding an earlier run's (:func:`earlier_outputs`) is refused, or, with ``overwrite``,
  starts by deleting them with the earlier run's checkpoints, so a folder never holds SAEs of two runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from interp.atomic import write_json
from interp.folders import folder_lock, remove_temps
from saes import distributed as ddp
from saes import resume as resume_ckpt
from saes.base import SAE, SAEError

if TYPE_CHECKING:
    from saes.trainer import Trainer

LOCK_NAME = ".interp-lock"
"""The lock file a training run holds in its output folder (see :mod:`interp.folders`)."""


def folder_name(name: str) -> str:
    """The folder under ``out_dir`` that holds the SAE named ``name``."""
    return name.replace("/", "_") or "sae"


HISTORY_NAME = "train_history.json"
EXPORT_KEYS = ("steps", "input_scale_folded", "final_metrics")
"""Keys :func:`export` writes into every SAE's training summary: a folder whose ``cfg.json`` holds them is a
training run's output (what :func:`earlier_outputs` finds)."""


def earlier_outputs(out_dir: Path) -> list[Path]:
    """What an earlier run exported to ``out_dir``: its ``train_history.json`` and every SAE folder that
    :func:`export` wrote (a subfolder holding only checkpoint files, whose ``cfg.json`` is this project's with the
    training summary of a run). Anything else in the folder is not a run's output and is never listed."""
    import json

    from saes.locate import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME

    if not out_dir.is_dir():
        return []
    found = []
    for p in sorted(out_dir.iterdir()):
        if p.is_symlink() or not p.is_dir() or not (p / CFG_FILENAME).is_file():
            continue
        try:  # another process of the run may be deleting it
            if any(c.name not in (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME) for c in p.iterdir()):
                continue
            training = json.loads((p / CFG_FILENAME).read_text(encoding="utf-8"))["interp"]["training"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(training, dict) and all(k in training for k in EXPORT_KEYS):
            found.append(p)
    history = out_dir / HISTORY_NAME
    return found + ([history] if history.is_file() and not history.is_symlink() else [])


def remove_outputs(paths: list[Path]) -> None:
    """Delete what :func:`earlier_outputs` listed; each folder is renamed to a temporary name first, so a run
    killed while deleting leaves no partial SAE folder (the next start removes the temporary one)."""
    import shutil
    import tempfile

    from interp.folders import temp_name

    for p in paths:
        if p.is_dir():
            tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=temp_name(p.name)))
            tmp.rmdir()
            p.replace(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def check_folders(saes: dict[str, SAE]) -> None:
    """Refuse SAE names that would be saved to the same folder."""
    seen: dict[str, str] = {}
    for name in saes:
        folder = folder_name(name)
        if folder in seen:
            raise SAEError(f"SAEs named {seen[folder]!r} and {name!r} would be saved to the same folder {folder!r} "
                           "('/' becomes '_'): rename one")
        seen[folder] = name


def jsonable(cfg) -> dict[str, Any]:
    """A config dataclass as JSON values (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


@contextlib.contextmanager
def own_output(out_dir: Path | None, rank: int) -> Iterator[None]:
    """Hold ``out_dir``'s lock while training (rank 0) and remove temporary files a killed run left."""
    if out_dir is None or rank != 0:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, LOCK_NAME, f"the training output folder {out_dir}", error=SAEError):
        remove_temps(out_dir)
        if (out_dir / "checkpoints").is_dir():
            remove_temps(out_dir / "checkpoints")
        yield


def settings(tr: Trainer, data) -> dict[str, Any]:
    """The settings of ``tr``'s run that change its result (:func:`saes.resume.settings`)."""
    described = tr.data_summary or (data.describe() if callable(getattr(data, "describe", None)) else {})
    # the site is recorded where it differs from the name (runs of one SAE per site keep their old settings)
    return resume_ckpt.settings(jsonable(tr.cfg), {n: {"architecture": st.sae.architecture, **st.sae.cfg.to_dict(),
                                                       **({"site": tr.site_of[n]} if tr.site_of[n] != n else {})}
                                                   for n, st in tr.sites.items()}, described)


def save_checkpoint(tr: Trainer, root: Path, step: int, data) -> None:
    """Write ``tr``'s resume checkpoint of ``step`` under ``root`` (rank 0; every rank waits for it)."""
    if tr.rank == 0:
        tensors, meta = resume_ckpt.rng_state()
        meta = {"rng": meta, "step": step, "tokens": tr.tokens_, "world_size": tr.world,
                "config": jsonable(tr.cfg), "settings": settings(tr, data), "history": tr.history_,
                "data": data.state_dict() if hasattr(data, "state_dict") else {"batches_consumed": step}}
        site_tensors, meta["sites"] = resume_ckpt.pack_sites(tr.sites)
        tensors.update(site_tensors)
        resume_ckpt.write(root, step, tensors, meta, keep=tr.cfg.keep_checkpoints)
    tr._last_saved = step
    ddp.barrier()


def load_checkpoint(tr: Trainer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], data,
                    accept_changes: bool) -> int:
    """Restore ``tr`` (every SAE's state, the RNGs, the data source's position, tokens and history) from a resume
    checkpoint; the step it was written at. Changed settings are refused unless ``accept_changes``."""
    step = int(meta["step"])
    if meta["world_size"] != tr.world:
        warnings.warn(f"resuming a {meta['world_size']}-process run on {tr.world} processes", stacklevel=4)
    diff = resume_ckpt.check_settings(meta, settings(tr, data), accept_changes,
                                      resume_ckpt.default_rate_changes(tr.sites, meta["sites"]))
    resume_ckpt.unpack_sites(tr.sites, tensors, meta["sites"])
    for st in tr.sites.values():
        st.since_bound = int(st.since_fired.max()) if st.since_fired.numel() else 0
    if hasattr(data, "load_state_dict"):
        data.load_state_dict(meta["data"])
    resume_ckpt.set_rng_state(tensors, meta["rng"])
    for st in tr.sites.values():  # a checkpoint written before SAEs had their own streams: the global one
        if st.rng is None:
            st.seed_rng()
    tr.tokens_ = int(meta.get("tokens", step * meta["config"]["batch_tokens"]))
    tr.history_ = list(meta.get("history", []))
    if diff:
        tr.history_.append({"step": step, "tokens": tr.tokens_, "event": "resume", "changes": diff})
    return step


def export(tr: Trainer) -> None:
    """Save every trained SAE of ``tr`` to its folder under ``out_dir``, and ``train_history.json``."""
    from saes.checkpoint import save  # lazy: the trainer does not need it to train

    for name, sae in tr.saes_.items():
        data = {**tr.data_summary, "tokens_trained": tr.tokens_} if tr.data_summary else {}
        site = tr.site_of[name]
        save(sae, tr.out_dir / folder_name(name), metadata={**tr.metadata, **({"hook_name": site} if site else {})},
             training={"n_tokens": tr.tokens_, "steps": tr.steps_, **({"data": data} if data else {}),
                       "input_scale_folded": tr.scales_[name], "config": jsonable(tr.cfg),
                       "final_metrics": tr.final_metrics(name)})
    write_json(tr.out_dir / HISTORY_NAME, tr.history_)
