"""Resume checkpoints of a training run: safetensors + JSON, written atomically.

Layout under the run's ``checkpoints/`` folder::

    step_000000120/state.safetensors   weights, Adam moments, dead-latent counters, RNG state
    step_000000120/state.json          step, tokens, scales, optimizer hyper-parameters, scheduler,
                                       data-source position, python RNG, the history so far and the
                                       run's settings (what a resume compares)
    latest.json                        {"step": 120, "dir": "step_000000120"}

A checkpoint folder is written under a temporary name (``.interp-tmp-step_...``) and renamed into
place; ``latest.json`` is replaced atomically afterwards, so a run killed at any moment leaves the
previous checkpoint intact and readable. Checkpoints are ordered by step number: pruning keeps the
one just written and the newest ones before it, never the other way round. If ``latest.json`` is
missing or names a folder that does not load, the newest step folder that loads is used, with a
warning. (The published SAE format is :mod:`saes.checkpoint`'s, not this one.)

A resume compares the saved settings (:func:`settings`) with the new run's: :func:`differences`
lists every one that changes the result, and :func:`default_rate_changes` a default learning rate that changed
between versions while the settings (``lr=None``) stayed the same.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from interp.atomic import save_file, write_json
from interp.folders import inside, temp_name
from saes import optim
from saes.base import SAEError

LATEST = "latest.json"
_STEP = re.compile(r"^step_(\d{9,})$")

NOT_RESULT = ("progress", "log_every", "wandb_project", "checkpoint_every", "keep_checkpoints", "nonfinite_guard")
"""TrainConfig fields that do not change the trained weights (a resume may change them freely)."""
INIT_ONLY = ("enc_init_scale", "dec_init_norm")
"""SAE config fields that only set the initial weights, which a resume replaces by the checkpoint's: not
compared (a checkpoint written before such a field existed resumes under the new default)."""
FIXED_CONFIG = ("config.batch_tokens",)
"""Settings a resume never accepts changed: the trainer counts steps in batches (``total_tokens // batch_tokens``
from step 0, the learning-rate schedule included), so a resume with another batch size would train past
``total_tokens`` or stop short of it."""
CONFIG_INIT_ONLY = ("b_dec_init",)
"""TrainConfig fields that only set the initial weights (read on the first batch of a fresh run): not compared,
so a run started under an earlier default resumes under the new one."""


def step_dir(step: int) -> str:
    return f"step_{step:09d}"


def found(root: str | Path) -> list[int]:
    """Step numbers of the checkpoint folders under `root`, ascending (``[]`` when there are none)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name)))


def holds_checkpoints(root: str | Path) -> bool:
    root = Path(root)
    return bool(found(root)) or (root / LATEST).exists()


def clear(root: str | Path) -> None:
    """Delete every checkpoint folder and ``latest.json`` under `root` (``overwrite=True``)."""
    root = Path(root)
    (root / LATEST).unlink(missing_ok=True)
    for step in found(root):
        shutil.rmtree(root / step_dir(step))


def start(root: Path | None, *, resume: bool, overwrite: bool,
          is_main: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The checkpoint a run starts from (None: step 0), after checking the folder is the run's own.

    Without `resume`, checkpoints already under `root` and the SAE folders and history an earlier run exported
    beside it (:func:`saes.run_folder.earlier_outputs` of ``root.parent``) are from an earlier run: refused, or
    deleted with `overwrite` (by the main process), so that the folder never holds the SAEs of two runs. With
    `resume` and no checkpoint, a warning; an earlier run's output is then refused too (no checkpoint resumes it),
    or deleted with `overwrite`."""
    if root is None:
        return None
    if not resume:
        from saes.run_folder import earlier_outputs, remove_outputs  # it imports this module

        earlier = earlier_outputs(root.parent)
        if holds_checkpoints(root) or earlier:
            if not overwrite:
                what = (f"{root} holds resume checkpoints of an earlier run (steps {found(root)[-3:]})"
                        if holds_checkpoints(root) else f"{root.parent} holds the output of an earlier run "
                        f"({_names(earlier)})")
                raise SAEError(f"{what}; continue it with resume=True (--resume), discard them with overwrite=True "
                               "(--overwrite), or write to another output folder")
            if is_main:
                clear(root)
                remove_outputs(earlier)
        return None
    loaded = read_latest(root)
    if loaded is None:
        from saes.run_folder import earlier_outputs, remove_outputs

        earlier = earlier_outputs(root.parent)
        if earlier and not overwrite:
            raise SAEError(f"{root.parent} holds the output of an earlier run ({_names(earlier)}) but no resume "
                           f"checkpoint under {root} to continue it from; discard it with overwrite=True "
                           "(--overwrite), or write to another output folder")
        if is_main:
            remove_outputs(earlier)
        warnings.warn(f"no resume checkpoint under {root}: starting from step 0", stacklevel=4)
    return loaded


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:4]) + (" ..." if len(paths) > 4 else "")


def write(root: str | Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root``, point ``latest.json`` at it, and keep the ``keep``
    newest checkpoints up to it (0: keep all). Folders of later steps (left by a run killed after
    writing them but before ``latest.json`` named them) are removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=temp_name(name)))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        final = root / name
        if final.exists():  # left by an earlier attempt at this step; latest.json names an older one
            shutil.rmtree(final)
        tmp.replace(final)
    except OSError as e:  # a full disk: say where, as the other writes do (the newest good checkpoint is untouched)
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"writing the resume checkpoint {root / name} failed: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(root / LATEST, {"step": step, "dir": name})
    if keep > 0:
        older = [s for s in found(root) if s < step]
        kept = set(older[len(older) - (keep - 1):] if keep > 1 else []) | {step}
        for s in found(root):
            if s not in kept:
                shutil.rmtree(root / step_dir(s), ignore_errors=True)
    return final


def _load(folder: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())


def read_latest(root: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The checkpoint ``latest.json`` names under ``root`` (None when there is no checkpoint at all).

    When ``latest.json`` is missing or unreadable, or names a folder that does not load, the newest
    step folder that loads is used instead, with a warning; when none loads, :class:`SAEError`."""
    root = Path(root)
    latest = root / LATEST
    problem = None
    if latest.exists():
        try:
            name = json.loads(latest.read_text())["dir"]
            if not isinstance(name, str) or not _STEP.match(name):
                raise ValueError(f"'dir' is {name!r}, not a step folder name")
            return _load(inside(root, name, str(latest), error=SAEError))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            problem = f"{latest} is unreadable or names a checkpoint that does not load ({e})"
    steps = found(root)
    if not steps:
        if problem:
            raise SAEError(f"{problem}, and no step folder is left under {root}; start afresh without resume "
                           "(overwrite=True, --overwrite)")
        return None
    errors = []
    for step in reversed(steps):
        try:
            got = _load(root / step_dir(step))
        except (OSError, ValueError, SafetensorError) as e:
            errors.append(f"{step_dir(step)}: {e}")
            continue
        why = problem or f"{latest} is missing"
        warnings.warn(f"{why}; resuming from the newest step folder that loads, {root / step_dir(step)}",
                      stacklevel=3)
        return got
    raise SAEError(f"no resume checkpoint under {root} loads ({'; '.join(errors[:3])}); start afresh without "
                   "resume (overwrite=True, --overwrite)")


def settings(config: dict[str, Any], sae_configs: dict[str, dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """What a resume must find unchanged: the training config (minus :data:`NOT_RESULT` and
    :data:`CONFIG_INIT_ONLY`), every site's SAE architecture and config (minus :data:`INIT_ONLY`), and the data
    source's description."""
    sites = {name: {k: v for k, v in c.items() if k not in INIT_ONLY} for name, c in sae_configs.items()}
    skip = NOT_RESULT + CONFIG_INIT_ONLY
    return {"config": {k: v for k, v in config.items() if k not in skip}, "sites": sites, "data": data}


def differences(saved: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, list]:
    """``{"config.lr": [saved, new], ...}`` for every leaf that differs (a missing key is None)."""
    out: dict[str, list] = {}
    for key in sorted(set(saved) | set(new), key=str):
        a, b = saved.get(key), new.get(key)
        name = f"{prefix}{key}" if prefix else str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(differences(a, b, f"{name}."))
        elif a != b:
            out[name] = [a, b]
    return out


def default_rate_changes(sites: dict[str, Any], meta_sites: dict[str, Any]) -> dict[str, list]:
    """``{"sites.NAME.default_lr": [saved, new]}`` for every SAE whose own learning rate (its optimizer's first
    group; other groups are that rate times a factor the settings hold) differs between the checkpoint
    (``meta_sites``: :func:`pack_sites`'s JSON) and this run (``sites``, schedules built). Where neither run set
    ``lr``, that rate is the architecture's default, which is not among the settings and may change between
    versions (``default_lr_factor``)."""
    out: dict[str, list] = {}
    for name, st in sites.items():
        saved, now = meta_sites[name]["optimizer"]["param_groups"][0].get("initial_lr"), float(st.sched.base_lrs[0])
        if saved is None or not math.isclose(saved, now, rel_tol=1e-9):
            out[f"sites.{name}.default_lr"] = [saved, now]
    return out


def check_settings(meta: dict[str, Any], new: dict[str, Any], accept_changes: bool,
                   default_rates: dict[str, list] | None = None) -> dict[str, list]:
    """The differences between a checkpoint's settings and `new` (:func:`settings`); raises
    :class:`SAEError` listing them unless `accept_changes` (never for an SAE of another shape, nor for another
    batch size: :data:`FIXED_CONFIG`).
    ``default_rates`` (:func:`default_rate_changes`) count as differences where neither run set ``lr``: a default
    rate that changed would otherwise change the run silently."""
    sites = meta["sites"]
    missing = [name for name in new["sites"] if name not in sites]
    if missing:
        raise SAEError(f"the resume checkpoint has sites {sorted(sites)}, not {missing}")
    saved = meta.get("settings")
    if saved is None:  # written before settings were saved: compare what it has, its data is unknown
        saved = settings(meta["config"], {n: {"architecture": m["architecture"], **m["sae_cfg"]}
                                          for n, m in sites.items()}, {})
        new = {**new, "data": {}}
    diff = differences(saved, new)
    if default_rates and saved["config"].get("lr") is None and new["config"].get("lr") is None:
        diff.update(default_rates)
    shapes = [k for k in diff if k.startswith("sites.") and k.rsplit(".", 1)[-1] in ("architecture", "d_model",
                                                                                      "d_sae")]
    batch = [k for k in diff if k in FIXED_CONFIG]
    if diff and (not accept_changes or shapes or batch):
        if shapes:
            hint = "these cannot be accepted: the weights differ in shape"
        else:
            hint = ("resume with the same settings, accept them with accept_changes=True (--accept-changes; "
                    "recorded in the history), or start afresh in another output folder")
            if batch:
                fixed = (f"{batch[0]} cannot be accepted: a run counts its steps in batches of the first run's "
                         "size, so with another the steps left would not train total_tokens; resume with "
                         f"batch_tokens={diff[batch[0]][0]} (--batch-tokens), or start afresh in another output folder")
                hint = f"{hint}; but {fixed}" if not accept_changes else fixed
        raise SAEError(f"the resume checkpoint (step {meta['step']}) was made with other settings: "
                       f"{describe_differences(diff)}; {hint}")
    return diff


def pack_sites(sites: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and JSON of every SAE's training state (``site.sae``, ``.opt``, ``.sched``,
    ``.since_fired``, ``.scale``, its own RNG streams ``.rng`` / ``.device_rng``), keyed by the SAE's
    name: ``<name>/sae.*``, ``<name>/opt.*``, ``<name>/since_fired``, ``<name>/rng``, ``<name>/rng.device``."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for name, st in sites.items():
        for k, v in st.sae.state_dict().items():
            tensors[f"{name}/sae.{k}"] = v
        tensors[f"{name}/since_fired"] = st.since_fired
        if getattr(st, "rng", None) is not None:
            tensors[f"{name}/rng"] = st.rng
        if getattr(st, "device_rng", None) is not None:
            tensors[f"{name}/rng.device"] = st.device_rng
        t, opt_meta = optimizer_to_flat(st.opt, f"{name}/opt.")
        tensors.update(t)
        sched = {k: v for k, v in st.sched.state_dict().items() if k != "lr_lambdas"}
        meta[name] = {"scale": st.scale, "optimizer": opt_meta, "scheduler": sched,
                      "architecture": st.sae.architecture, "sae_cfg": st.sae.cfg.to_dict()}
    return tensors, meta


def unpack_sites(sites: dict[str, Any], tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`pack_sites` saved into the trainer's sites (nothing, where an optimizer's groups differ
    from the checkpoint's)."""
    for name, st in sites.items():
        check_groups(st.opt, meta[name]["optimizer"])
    for name, st in sites.items():
        m = meta[name]
        prefix = f"{name}/sae."
        st.sae.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        st.since_fired.copy_(tensors[f"{name}/since_fired"])
        dev = st.sae.device
        base = list(st.sched.base_lrs)  # this run's learning rates, which a resume with accepted changes must keep
        optimizer_from_flat(st.opt, {k: v.to(dev) if v.dim() else v for k, v in tensors.items()},
                            m["optimizer"], f"{name}/opt.")
        st.sched.load_state_dict({**m["scheduler"], "lr_lambdas": [None]})
        keep_learning_rates(st.opt, st.sched, base)
        st.scale = m["scale"]
        # None (a checkpoint from before SAEs had their own streams): the trainer starts it from the global one
        st.rng = tensors.get(f"{name}/rng")
        st.device_rng = tensors.get(f"{name}/rng.device")


def describe_differences(diff: dict[str, list]) -> str:
    return ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in diff.items())


def _short(v: Any, n: int = 70) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[: n // 3] + "..." + s[-(2 * n // 3 - 3):]  # a path's end tells most


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


def check_groups(opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Refuse an optimizer checkpoint (``meta``: :func:`optimizer_to_flat`'s JSON) whose parameter groups differ in
    number or size from ``opt``'s."""
    saved, have = [len(g["params"]) for g in meta["param_groups"]], [len(g["params"]) for g in opt.param_groups]
    if saved != have:
        raise SAEError(f"the resume checkpoint's optimizer holds its parameters in groups of {saved}, this run's in "
                       f"{have}: a parameter's learning-rate factor changed to or from 1 (such as JumpReLU's "
                       "threshold_lr_factor); resume with the checkpoint's factor, or start afresh in another output "
                       "folder")


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
    opt.load_state_dict({"state": state, "param_groups": optim.keep_implementation(opt, groups)})
    optim.align_layouts(opt)  # tensors come back contiguous: a fused step needs the parameters' strides


def keep_learning_rates(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                        base: list[float]) -> None:
    """Give ``opt`` and ``sched``, just loaded from a checkpoint, this run's base learning rates ``base`` at the
    schedule's position (the checkpoint's rates would otherwise stay, whatever a resume with accepted changes of
    ``lr`` or of a learning-rate factor records). Where nothing changed, the rates are the ones loaded."""
    sched.base_lrs = list(base)
    for g, b, fn in zip(opt.param_groups, base, sched.lr_lambdas):
        g["initial_lr"] = b
        g["lr"] = b * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


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
