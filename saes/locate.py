"""Find one SAE's folder: a local folder, a site subfolder of it, or one site of a Hub repository.

A repository holds one SAE per site, one subfolder each (``blocks.6.hook_resid_post/cfg.json``
...); a folder holding ``cfg.json`` itself is a single SAE. From the Hub only the chosen site's
files are downloaded (config, weights, and the sparsity file where there is one), never the
whole repository. Pickle-based checkpoints are refused here with the reason.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from interp.folders import inside
from interp.models import looks_local
from saes.safetensors_check import CheckpointError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
MAX_CFG_BYTES = 10 * 1024 * 1024
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def list_sites(folder: str | os.PathLike) -> list[str]:
    """Subfolders of ``folder`` that hold an SAE (``[""]`` if ``folder`` itself is one).
    Hidden folders (temporary writes in progress) are skipped."""
    folder = Path(folder)
    if (folder / CFG_FILENAME).is_file():
        return [""]
    found = [p.parent.relative_to(folder).as_posix() for p in folder.rglob(CFG_FILENAME)
             if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found)


def locate(path_or_repo_id: str | os.PathLike, site: str | None) -> Path:
    """The folder of the SAE to load (downloading that one site first for a Hub repo id)."""
    path = Path(path_or_repo_id)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path)
    if path.suffix == ".safetensors" or path.name == CFG_FILENAME:
        raise CheckpointError(f"{path}: pass the SAE's folder (holding {CFG_FILENAME}), not one of its files")
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected an SAE folder ({CFG_FILENAME} + safetensors), got a file")
        return _pick_site(path, site, list_sites(path))
    if isinstance(path_or_repo_id, str) and _REPO_ID.match(path_or_repo_id) and not looks_local(path_or_repo_id):
        return download(path_or_repo_id, site)
    raise CheckpointError(f"{path_or_repo_id}: no such folder, and not a Hub repo id ('owner/name'); a path that "
                          "can only be local is never looked up on the Hub")


def _pick_site(root: Path, site: str | None, sites: list[str]) -> Path:
    if site is not None:
        if site not in sites:
            raise CheckpointError(f"{root}: no SAE for site {site!r}; sites here: {sites or 'none'}")
        return root / site
    if not sites:
        raise no_checkpoint(root)
    return root / only_site(sites, str(root))


def only_site(sites: list[str], where: str) -> str:
    if len(sites) != 1:
        raise CheckpointError(f"{where}: holds SAEs for {len(sites)} sites {sites[:20]}; pass site=one of them")
    return sites[0]


def download(repo_id: str, site: str | None) -> Path:
    """Fetch one site's files from the Hub into the local cache; returns that site's folder."""
    import huggingface_hub as hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        if site is None:
            files = hub.list_repo_files(repo_id)
            sites = sorted(f.rsplit("/", 1)[0] if "/" in f else "" for f in files
                           if f == CFG_FILENAME or f.endswith("/" + CFG_FILENAME))
            site = only_site(sites, repo_id)
        prefix = f"{site.strip('/')}/" if site else ""
        cfg_path = Path(hub.hf_hub_download(repo_id, prefix + CFG_FILENAME))
        if is_sparsify_layout(read_cfg(cfg_path)):
            hub.hf_hub_download(repo_id, prefix + SPARSIFY_WEIGHTS)
        else:
            hub.hf_hub_download(repo_id, prefix + WEIGHTS_FILENAME)
            try:
                hub.hf_hub_download(repo_id, prefix + SPARSITY_FILENAME)
            except EntryNotFoundError:
                pass  # the sparsity file is optional
    except CheckpointError:
        raise
    except (HfHubHTTPError, OSError, ValueError) as e:  # not found, offline, gated, bad id ...
        raise CheckpointError(f"{repo_id}: no such local folder, and fetching site {site!r} from the Hugging Face "
                              f"Hub failed ({type(e).__name__}: {e})") from e
    return cfg_path.parent


def confine(folder: Path) -> None:
    """Every checkpoint file in `folder` lies inside it: a link to a file elsewhere is refused."""
    for name in (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME, SPARSIFY_WEIGHTS):
        if (folder / name).is_symlink():
            inside(folder, name, str(folder), error=CheckpointError)


def is_sparsify_layout(cfg: dict[str, Any]) -> bool:
    """sparsify's cfg.json has ``d_in`` and none of SAELens' ``d_sae``/``architecture``."""
    return "d_in" in cfg and "d_sae" not in cfg and "architecture" not in cfg


def no_checkpoint(folder: Path) -> CheckpointError:
    names: list[str] = []
    if folder.is_dir():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            return pickle_error(folder / pickles[0])
        names = sorted(p.name for p in folder.iterdir())[:8]
    return CheckpointError(f"{folder}: no {CFG_FILENAME} here (found {names}); an SAE folder holds "
                           f"{CFG_FILENAME} + {WEIGHTS_FILENAME} (or sparsify's {SPARSIFY_WEIGHTS})")


def pickle_error(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: refusing a pickle-based checkpoint ({path.suffix}); unpickling runs "
                           "arbitrary code chosen by the file's author. Ask for safetensors, or convert it "
                           "yourself where you trust the source")


def read_cfg(path: Path) -> dict[str, Any]:
    """``cfg.json`` as a dict (size-limited, UTF-8 JSON object), or a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_CFG_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is too large for a config (limit {MAX_CFG_BYTES})")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg
