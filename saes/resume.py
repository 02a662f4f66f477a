"""Resume checkpoints of a training run: safetensors + JSON, written atomically.

Layout under the run's ``checkpoints/`` folder::

    step_000120/state.safetensors   weights, Adam moments, dead-latent counters, RNG state
    step_000120/state.json          step, tokens, scales, optimizer hyper-parameters,
                                    scheduler, data-source position, python RNG
    latest.json                     {"step": 120, "dir": "step_000120"}

A checkpoint folder is written under a temporary name and renamed into place; ``latest.json`` is
replaced atomically afterwards, so a run killed at any moment leaves the previous checkpoint
intact and readable. (The published SAE format is :mod:`saes.checkpoint`'s, not this one.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saes.base import SAEError


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write(root: str | Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` and keep only the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:09d}"
    final = root / name
    tmp = root / f".{name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_json(root / "latest.json", {"step": step, "dir": name})
    olds = sorted(p for p in root.glob("step_*") if p.is_dir())
    for p in olds[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def read_latest(root: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The newest complete checkpoint under ``root`` (None when there is none)."""
    root = Path(root)
    latest = root / "latest.json"
    if not latest.exists():
        return None
    try:
        folder = root / json.loads(latest.read_text())["dir"]
        return load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise SAEError(f"resume checkpoint under {root} is unreadable ({e}); delete {latest} to start "
                       "from the previous step folder, or start afresh without --resume") from e


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{prefix}{pid}.{key}"] = val
            else:
                scalars[f"{pid}.{key}"] = val
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any],
                        prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, val in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = val
    for key, val in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    import random

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    st = random.getstate()
    return tensors, {"python": [st[0], list(st[1]), st[2]]}


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
