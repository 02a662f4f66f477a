"""Publish a folder of SAEs (one subfolder per site) to the Hugging Face Hub.

``publish(folder, repo_id)`` validates every SAE first (it loads strictly; its metadata names
the model and site, and every SAE reads the same model; its training summary holds the token count and the
evaluation metrics; its sparsity is saved), writes the model card ``README.md`` and ``latent_density.png`` into the
folder, and only then uploads the checkpoint files, the card and the plot (and the feature dashboards
that ``interp dashboard sae ... --out FOLDER/dashboard`` wrote there, linked from the card): the
upload is the one ``huggingface_hub`` call at the end of :func:`publish`. ``interp sae publish`` runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.atomic import write_text
from interp.errors import InterpError
from saes.base import SAEError
from saes.card import CARD_METRICS, DENSITY_PLOT, is_finite_number, plot_latent_density, render_card, same_model
from saes.checkpoint import Checkpoint, read
from saes.locate import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME, list_sites

REQUIRED_METADATA = ("model_name", "hook_name")
CARD_FILENAME = "README.md"


class PublishError(SAEError):
    """A folder that is not ready to be published (each problem is listed)."""


@dataclass(frozen=True)
class PublishPlan:
    """What :func:`publish` uploads."""

    folder: Path
    repo_id: str
    sites: list[str]
    files: list[str]
    """Paths relative to ``folder`` (POSIX), the only ones uploaded."""
    card: str


def validate(folder: str | os.PathLike) -> dict[str, Checkpoint]:
    """``{site: Checkpoint}`` for every SAE under ``folder``, or a PublishError listing every problem."""
    folder = Path(folder)
    sites = list_sites(folder) if folder.is_dir() else []
    if not sites:
        read(folder)  # says what is there instead (a file, a pickle, weights without cfg.json)
        raise PublishError(f"{folder}: no SAE found (expected {CFG_FILENAME} here or in site subfolders)")
    found: dict[str, Checkpoint] = {}
    problems: list[str] = []
    for site in sites:
        where = folder / site
        try:
            ckpt = read(where)
        except InterpError as e:
            problems.append(f"{where}: does not load: {e}")
            continue
        found[site] = ckpt
        problems += [f"{where}: {p}" for p in _missing(ckpt)]
    parts = []
    if problems:
        parts.append("; ".join(problems) + ". Add what is missing (evaluate with 'interp sae eval', or "
                     "saes.checkpoint.annotate(folder, metrics={...}, sparsity=..., metadata={...})), then publish "
                     "again.")
    models = {site: ck.metadata.get("model_name") for site, ck in found.items() if ck.metadata.get("model_name")}
    if any(not same_model(m, next(iter(models.values()))) for m in models.values()):
        named = ", ".join(f"{site or '.'}: {m!r}" for site, m in models.items())
        parts.append(f"{folder}: the SAEs read different models ({named}), and a repository's card names one base "
                     "model; publish the SAEs of each model from a folder of their own.")
    if parts:
        raise PublishError("not ready to publish: " + " ".join(parts))
    return found


def _missing(ckpt: Checkpoint) -> list[str]:
    out = [f"metadata[{k!r}] is not set" for k in REQUIRED_METADATA if not ckpt.metadata.get(k)]
    n = ckpt.training.get("n_tokens")
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        out.append(f"training['n_tokens'] is {n!r}; expected the number of training tokens")
    metrics = ckpt.training.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    out += [f"training['metrics'][{k!r}] is {metrics.get(k)!r}; expected a finite number (evaluate the SAE)"
            for k, _ in CARD_METRICS if not is_finite_number(metrics.get(k))]
    if ckpt.sparsity is None:
        out.append(f"no {SPARSITY_FILENAME} (firing frequency of each latent, for the density plot)")
    return out


def dashboard_folders(folder: Path) -> list[str]:
    """Feature dashboards in ``folder/dashboard`` (itself, or one level of subfolders, e.g. one per site):
    the folders holding a finished ``interp dashboard`` site (``index.html`` and ``data.json``)."""
    root = folder / "dashboard"
    found = [p for p in [root, *sorted(root.glob("*"))] if p.is_dir() and (p / "index.html").is_file()
             and (p / "data.json").is_file()]
    return [p.relative_to(folder).as_posix() for p in found]


def prepare(folder: str | os.PathLike, repo_id: str) -> PublishPlan:
    """Validate ``folder``, write its model card and density plot; upload nothing."""
    folder = Path(folder)
    checkpoints = validate(folder)
    plot_latent_density(checkpoints, folder / DENSITY_PLOT)
    dashboards = dashboard_folders(folder)
    card = render_card(checkpoints, repo_id, plot=DENSITY_PLOT, dashboards=tuple(dashboards))
    write_text(folder / CARD_FILENAME, card)
    files = [CARD_FILENAME, DENSITY_PLOT]
    for d in dashboards:
        files += sorted(p.relative_to(folder).as_posix() for p in (folder / d).rglob("*") if p.is_file()
                        and p.suffix in (".html", ".json", ".safetensors") and not p.name.startswith("."))
    for site in checkpoints:
        prefix = f"{site}/" if site else ""
        files += [prefix + name for name in (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME)
                  if (folder / site / name).is_file()]
    return PublishPlan(folder, repo_id, list(checkpoints), files, card)


def publish(folder: str | os.PathLike, repo_id: str, *, private: bool = False, api: Any = None,
            token: str | None = None, commit_message: str | None = None) -> PublishPlan:
    """Validate, write the card and plot, then upload to ``repo_id`` (created if needed).

    ``api`` is a ``huggingface_hub.HfApi`` (default: a new one with ``token``).
    """
    plan = prepare(folder, repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(plan.folder), allow_patterns=plan.files,
                      commit_message=commit_message or f"Upload {len(plan.sites)} SAE(s): {', '.join(plan.sites)}")
    return plan
