"""``interp sae train`` and ``interp sae eval`` (and, from another module, ``interp sae publish``).

Options come from flags or from ``--config FILE.json`` whose keys are the flags' names with
underscores (``{"arch": "topk", "d_sae": 9216, "k": 32, ...}``); a flag given on the command line
wins over the file. Activations come from a disk cache (``--cache DIR``, written by
``interp capture``) or live from the model (``--model`` without ``--cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from saes.base import SAEError

# name: (type, default, help). None defaults are resolved in code.
_TRAIN_OPTS: dict[str, tuple[Any, Any, str]] = {
    "model": (str, "smollm2-135m", "embedded model name, HF name or local path (live activations, eval)"),
    "sites": (str, None, "sites to train on, one SAE each (e.g. blocks.12.hook_resid_post); nargs=+"),
    "cache": (str, None, "activation cache folder from `interp capture` (omit: live from --model)"),
    "dataset": (str, None, "text for live activations (omit: the offline default corpus)"),
    "context_size": (int, 128, "tokens per window (live activations)"),
    "arch": (str, "topk", "architecture: relu, topk, batchtopk, jumprelu (any registered name)"),
    "d_sae": (int, None, "latents (default: expansion * d_model)"),
    "expansion": (int, 16, "d_sae / d_model when --d-sae is not given"),
    "k": (int, 32, "active latents (topk, batchtopk; k-like architectures)"),
    "sae_option": (str, None, "extra architecture field as NAME=JSON (repeatable), e.g. l1_coeff=0.001"),
    "tokens": (int, 10_000_000, "training tokens"),
    "batch_tokens": (int, 4096, "rows per step"),
    "lr": (float, None, "learning rate (default: 2e-4 / sqrt(d_sae / 16384))"),
    "warmup_frac": (float, 0.01, "fraction of steps of linear LR warm-up"),
    "decay_frac": (float, 0.2, "fraction of steps of linear LR decay at the end"),
    "b_dec_init": (str, "geometric_median", "geometric_median, mean or zeros"),
    "dead_tokens": (int, 10_000_000, "rows without firing before a latent counts as dead"),
    "checkpoint_every": (int, 0, "steps between resume checkpoints (0: only at the end)"),
    "out": (str, None, "output folder (SAEs, history, checkpoints)"),
    "device": (str, None, "cpu, cuda, cuda:1 ... (default: cuda when available)"),
    "seed": (int, 0, "seed of the SAE init, data order and RNGs"),
    "wandb_project": (str, None, "log to wandb when installed"),
}


def _add_opts(p: argparse.ArgumentParser, opts: dict[str, tuple[Any, Any, str]]) -> None:
    for name, (typ, default, help_) in opts.items():
        flag = "--" + name.replace("_", "-")
        extra: dict[str, Any] = {}
        if name in ("sites",):
            extra["nargs"] = "+"
        if name == "sae_option":
            extra["action"] = "append"
        shown = f" (default {default})" if default is not None else ""
        p.add_argument(flag, dest=name, type=typ, default=None, help=help_ + shown, **extra)


def _merged(args: argparse.Namespace, opts: dict[str, tuple[Any, Any, str]]) -> dict[str, Any]:
    """Flags over config file over defaults."""
    from_file: dict[str, Any] = {}
    if getattr(args, "config", None):
        from_file = json.loads(Path(args.config).read_text())
        unknown = set(from_file) - set(opts) - {"resume", "bf16"}
        if unknown:
            raise SAEError(f"{args.config}: unknown keys {sorted(unknown)}; valid keys: {sorted(opts)}")
    out = {}
    for name, (_typ, default, _h) in opts.items():
        v = getattr(args, name, None)
        out[name] = v if v is not None else from_file.get(name, default)
    for flag in ("resume", "bf16"):
        out[flag] = bool(getattr(args, flag, False) or from_file.get(flag, False))
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="train, evaluate (and publish) sparse autoencoders")
    ssub = p.add_subparsers(dest="sae_command", metavar="SAE_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = ssub.add_parser("train", help="train SAEs (one per site) on cached or live activations")
    t.add_argument("--config", help="JSON file of options (flags override it)")
    _add_opts(t, _TRAIN_OPTS)
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the SAE forward")
    t.set_defaults(func=run_train)

    e = ssub.add_parser("eval", help="evaluate a saved SAE: reconstruction, sparsity, downstream loss")
    e.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors)")
    e.add_argument("--site", help="site the SAE reads (default: the hook_name in its cfg.json)")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--cache", help="activation cache folder (omit: live activations from --model)")
    e.add_argument("--dataset", default=None)
    e.add_argument("--tokens", type=int, default=200_000, help="rows for reconstruction metrics")
    e.add_argument("--windows", type=int, default=64, help="token windows for downstream CE (0: skip)")
    e.add_argument("--context-size", type=int, default=128)
    e.add_argument("--eval-seed", type=int, default=1234, help="data order of the evaluation set")
    e.add_argument("--device", default=None)
    e.add_argument("--out", help="folder for eval.json, sparsity.safetensors, feature_density.png")
    e.set_defaults(func=run_eval)

    # `interp sae publish` lives in saes/publish_cli.py (another issue): it registers itself here.
    if importlib.util.find_spec("saes.publish_cli") is not None:
        from saes import publish_cli

        publish_cli.register(ssub)


def _sae_kwargs(o: dict[str, Any], d_model: int) -> dict[str, Any]:
    from saes.base import get_architecture

    cls = get_architecture(o["arch"])
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    kw: dict[str, Any] = {"d_model": d_model, "d_sae": o["d_sae"] or o["expansion"] * d_model}
    if "k" in fields:
        kw["k"] = o["k"]
    for item in o["sae_option"] or []:
        name, _, val = item.partition("=")
        if name not in fields:
            raise SAEError(f"--sae-option {item!r}: {o['arch']} has no field {name!r}; fields: {sorted(fields)}")
        kw[name] = json.loads(val)
    return kw


def run_train(args: argparse.Namespace) -> int:
    import torch

    import saes  # noqa: F401  (registers the architectures)
    from saes.base import build
    from saes.trainer import TrainConfig, Trainer

    o = _merged(args, _TRAIN_OPTS)
    if not o["out"]:
        raise SAEError("interp sae train needs --out FOLDER (or \"out\" in --config)")
    device = torch.device(o["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    if o["cache"]:
        from interp.cache import CachedActivations

        data = CachedActivations(o["cache"], batch_tokens=o["batch_tokens"], seed=o["seed"], epochs=None,
                                 sites=o["sites"])
        sites = list(data.sites)
        d_models = {s: int(data.d_model) for s in sites}
    else:
        if not o["sites"]:
            raise SAEError("interp sae train needs --sites when reading live activations (no --cache)")
        from interp.models import load_model
        from interp.store import ActivationStore

        model, tok = load_model(o["model"], device=device)
        bt = o["batch_tokens"]
        data = ActivationStore(model, tok, o["sites"], dataset=o["dataset"], context_size=o["context_size"],
                               batch_tokens=bt, buffer_tokens=min(32 * bt, max(4 * bt, o["tokens"])),
                               seed=o["seed"], device=device)
        sites = list(o["sites"])
        d_models = dict(data.d_models)
    torch.manual_seed(o["seed"])
    models = {s: build(o["arch"], **_sae_kwargs(o, d_models[s])).to(device) for s in sites}
    cfg = TrainConfig(total_tokens=o["tokens"], batch_tokens=o["batch_tokens"], lr=o["lr"],
                      warmup_frac=o["warmup_frac"], decay_frac=o["decay_frac"], b_dec_init=o["b_dec_init"],
                      dead_tokens=o["dead_tokens"], checkpoint_every=o["checkpoint_every"], bf16=o["bf16"],
                      seed=o["seed"], wandb_project=o["wandb_project"])
    out = Path(o["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(o, indent=1))
    tr = Trainer(models, cfg, out_dir=out).fit(data, resume=o["resume"])
    print(json.dumps({"steps": tr.steps_, "final": tr.history_[-1] if tr.history_ else None,
                      "saved": [str(out / s) for s in sites]}, indent=1))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from saes.checkpoint import read
    from saes.evaluate import evaluate

    ck = read(args.sae, device=args.device or "cpu")
    sae = ck.sae
    site = args.site or ck.metadata.get("hook_name")
    if not site:
        raise SAEError(f"{args.sae}: cfg.json names no hook_name; pass --site")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sae = sae.to(device)
    from interp.models import load_model

    model, tok = load_model(args.model, device=device)
    bt = min(4096, args.tokens)
    if args.cache:
        from interp.cache import CachedActivations

        data = CachedActivations(args.cache, batch_tokens=bt, seed=args.eval_seed, sites=[site], device=device)
    else:
        from interp.store import ActivationStore

        data = ActivationStore(model, tok, [site], dataset=args.dataset, context_size=args.context_size,
                               batch_tokens=bt, buffer_tokens=min(16 * bt, max(bt, args.tokens)),
                               seed=args.eval_seed, device=device)
    windows = mask = None
    if args.windows:
        windows, mask = eval_windows(tok, args.windows, args.context_size, args.dataset, args.eval_seed)
    into_checkpoint = args.out is not None and Path(args.out).resolve() == Path(ck.path).resolve()
    report = evaluate(sae, data, site=site, n_batches=max(1, args.tokens // bt), model=model if args.windows else None,
                      windows=windows, splice_mask=mask, out_dir=None if into_checkpoint else args.out)
    if into_checkpoint:  # a stray sparsity file would break the checkpoint: rewrite it whole instead
        from saes.checkpoint import annotate

        annotate(args.out, metrics=report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("feature_density", "l0_histogram")}, indent=1))
    return 0


def eval_windows(tokenizer, n: int, context_size: int, dataset=None, seed: int = 1234):
    """``n`` packed token windows and the positions an SAE trained on the store saw (not position
    0, not special tokens): the splice mask for downstream metrics."""
    import itertools

    import torch

    from interp.data import load_texts, pack, token_mask

    wins = list(itertools.islice(pack(load_texts(dataset, shuffle_seed=seed), tokenizer, context_size), n))
    if not wins:
        raise SAEError("the evaluation text produced no full window of tokens")
    ids = torch.stack(wins)
    return ids, token_mask(ids, tokenizer)
