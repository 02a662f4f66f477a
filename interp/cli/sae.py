"""``interp sae train``, ``interp sae eval`` and ``interp sae publish``: text to a published SAE.

    interp capture --sites blocks.12.hook_resid_post --tokens 2000000 --out cache/
    interp sae train --cache cache/ --arch topk --k 32 --out sae/
    interp sae train --cache cache/ --arch topk --variants k32:k=32 k64:k=64,d_sae=18432 --out sae/
    interp sae eval sae/blocks.12.hook_resid_post --cache heldout-cache/
    interp sae publish sae/ me/my-saes --dry-run

Training flags come from :class:`TrainRun` (data and output), :class:`saes.TrainConfig` (the
optimisation) and every registered architecture's config (``--k``, ``--l1-coeff`` ...): a flag that
the chosen architecture does not have is an error naming it. ``--config FILE.json`` takes the same
options by their underscored names; a flag on the command line wins over the file. ``--variants``
trains several SAEs per site (other sizes, ``k`` ...) from the same activations, each exactly as it
would train alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.cli import options as opt
from interp.data import DEFAULT_CONTEXT_SIZE
from interp.models import EMBEDDED, resolve_device


@dataclass(frozen=True, kw_only=True)
class TrainRun:
    """Where ``interp sae train`` reads activations and writes its SAEs."""

    out: str
    """Output folder: one SAE folder per site, train_history.json, checkpoints/ for --resume."""
    cache: str | None = None
    """Activation cache folder written by 'interp capture' (omit: live activations from --model)."""
    sites: tuple[str, ...] = ()
    """Sites to train on, one SAE each (default with --cache: every site the cache holds)."""
    model: str = EMBEDDED
    """Model name or local path for live activations (recorded in the checkpoint)."""
    dataset: str | None = None
    """Text for live activations: a local file or folder, or a Hugging Face dataset name (omit: the offline corpus)."""
    context_size: int = DEFAULT_CONTEXT_SIZE
    """Tokens per window (live activations)."""
    arch: str = "topk"
    """SAE architecture: relu, topk, batchtopk, jumprelu, mpsae (any registered name)."""
    d_sae: int | None = None
    """Number of latents (default: --expansion times the site's width)."""
    expansion: int = 16
    """d_sae / width when --d-sae is not given."""
    variants: tuple[str, ...] = ()
    """Several SAEs per site from the same activations, one per NAME:FIELD=VALUE[,FIELD=VALUE...] that
    changes d_sae or architecture options for that SAE, e.g. k32:k=32 k64:k=64,d_sae=18432; each is saved
    as SITE_NAME (default: one SAE per site, saved as SITE)."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (default: cuda when available)."""
    resume: bool = False
    """Continue from the newest resume checkpoint in --out (settings that change the result must match it)."""
    accept_changes: bool = False
    """With --resume: accept settings that differ from the checkpoint's (recorded in train_history.json)."""
    overwrite: bool = False
    """Without --resume: delete the resume checkpoints an earlier run left in --out."""


def _train_options() -> tuple[list[opt.Option], list[opt.Option], dict[str, list[str]]]:
    """(run + TrainConfig options, architecture options, {architecture option: architectures having it})."""
    import saes

    run = opt.dataclass_options(TrainRun)
    train = opt.dataclass_options(saes.TrainConfig, exclude=("progress",), rename={"total_tokens": "tokens"})
    owners: dict[str, list[str]] = {}
    arch: dict[str, opt.Option] = {}
    for name, cls in sorted(saes.REGISTRY.items()):
        for o in opt.dataclass_options(cls.config_class, exclude=("d_model", "d_sae")):
            owners.setdefault(o.name, []).append(name)
            arch.setdefault(o.name, o)
    return run + train, list(arch.values()), owners


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sae", help="train, evaluate and publish sparse autoencoders")
    ssub = p.add_subparsers(dest="sae_command", metavar="SAE_COMMAND", parser_class=opt.Parser)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = ssub.add_parser("train", help="train SAEs (one per site) on cached or live activations",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="JSON file of options by their underscored names (flags override it)")
    base, arch, owners = _train_options()
    opt.add_options(t, base, note={"tokens": "default with --cache: the rows the cache holds; required otherwise"})
    g = t.add_argument_group("architecture options (each applies only to the architectures named)")
    for o in arch:
        o = dataclasses.replace(o, help=f"{o.help} [{', '.join(owners[o.name])}]")
        opt.add_options(g, [o])
    t.set_defaults(func=run_train)

    e = ssub.add_parser("eval", help="evaluate a saved SAE and record the metrics in its checkpoint")
    e.add_argument("sae", help="SAE folder (or a folder with one SAE per site: name it with --site)")
    e.add_argument("--site", help="site the SAE reads (default: the hook_name in its cfg.json)")
    e.add_argument("--model", help="model (default: the model_name the checkpoint records, else the embedded model)")
    e.add_argument("--cache", help="activation cache to evaluate on (omit: live activations from the model)")
    e.add_argument("--dataset", help="text for live activations and for the downstream loss (default: the "
                   "dataset the checkpoint records, else the offline corpus)")
    e.add_argument("--tokens", type=int, default=200_000, help="rows for the reconstruction metrics, exactly (from "
                   "a cache holding fewer: all of its rows, with a warning) (default: 200000)")
    e.add_argument("--windows", type=int, default=64, help="token windows for the downstream loss, 0 to skip "
                   "(default: 64)")
    e.add_argument("--context-size", type=int, help="tokens per window (default: what the checkpoint records, "
                   f"else {DEFAULT_CONTEXT_SIZE})")
    e.add_argument("--eval-seed", type=int, default=1234, help="data order of the evaluation set (default: 1234)")
    e.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    e.add_argument("--out", help="write eval.json, sparsity.safetensors and latent_density.png here instead of "
                   "recording the metrics in the checkpoint")
    e.add_argument("--overwrite", action="store_true", help="replace the results an earlier evaluation wrote in --out "
                   "(default: refuse)")
    from probes.absorption import AbsorptionConfig

    words = AbsorptionConfig().words_per_letter
    e.add_argument("--absorption", action="store_true", help="also measure first-letter feature absorption (Chanin "
                   "et al.; SAEBench's metric): prompts the model with the vocabulary's single-token words, fits "
                   "probes, and records the absorption rates under 'absorption'")
    e.add_argument("--absorption-words", type=int, default=words, help="words per first letter for --absorption "
                   f"(default: {words}; fewer runs faster)")
    e.set_defaults(func=run_eval)

    u = ssub.add_parser("publish", help="validate a folder of SAEs, write its model card, upload it to the Hub",
                        description="Validate every SAE under FOLDER (it loads; model, site, training tokens, L0, "
                        "explained variance and CE loss recovered are recorded: run 'interp sae eval' first), write "
                        "README.md (the model card) and the density plot into FOLDER, then upload the checkpoint "
                        "files, the card and the plot to REPO_ID.")
    u.add_argument("folder", help="folder holding one SAE, or one subfolder per site")
    u.add_argument("repo_id", help="Hub repository, 'owner/name'")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.add_argument("--dry-run", action="store_true", help="validate and write the card and plot; upload nothing")
    u.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    u.set_defaults(func=run_publish)


# ------------------------------------------------------------------------------------------ train
def run_train(args: argparse.Namespace) -> int:
    import saes
    from saes.base import SAEError

    base, arch_opts, owners = _train_options()
    names = [o.name for o in base] + [o.name for o in arch_opts]
    from_file = opt.read_config(args.config, names)
    got = opt.given(args, names, from_file)
    run_names = {f.name for f in dataclasses.fields(TrainRun)}
    if "out" not in got:
        raise SAEError("no output folder: give --out FOLDER (or \"out\" in --config)")
    run = TrainRun(**{k: v for k, v in got.items() if k in run_names})
    cls = saes.get_architecture(run.arch)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    foreign = [o.name for o in arch_opts if o.name in got and o.name not in fields]
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        have = sorted({a for n in foreign for a in owners[n]})
        raise SAEError(f"{flags} does not apply to architecture {run.arch!r} (it has no such field); drop it, or "
                       f"choose an architecture that has it: {', '.join(have)}")
    device = resolve_device(run.device)
    data, widths, source = _train_data(run, got, device)
    tokens = got.get("tokens")
    if tokens is None:
        if run.cache is None:
            raise SAEError("no --tokens: live activations (no --cache) need --tokens N, the rows to train on")
        tokens = source["rows"]
    if run.cache is not None and tokens > source["rows"]:
        warnings.warn(f"training on {tokens} tokens but the cache {run.cache} holds {source['rows']} rows: each row "
                      f"is seen about {tokens / source['rows']:.1f} times; grow the cache with 'interp capture ... "
                      f"--tokens {tokens}'", stacklevel=1)
    train_fields = {f.name for f in dataclasses.fields(saes.TrainConfig)}
    cfg = saes.TrainConfig(total_tokens=tokens, **{k: v for k, v in got.items() if k in train_fields})
    import torch

    arch_kw = {k: v for k, v in got.items() if k in fields and k not in ("d_model", "d_sae")}  # set just below
    variants = parse_variants(run.variants, run.arch, fields)
    models, sites = {}, {}
    for s, w in widths.items():
        for vname, change in (variants or {"": {}}).items():
            name = f"{s}/{vname}" if vname else s
            kw = {**arch_kw, "d_sae": run.d_sae or run.expansion * w, **change}
            torch.manual_seed(cfg.seed)  # each SAE starts from the weights it would have trained alone
            models[name], sites[name] = saes.build(run.arch, d_model=w, **kw).to(device), s
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"model_name": source["model"], "context_size": source["context_size"],
                "prepend_bos": source.get("prepend_bos", False), "dataset_path": source.get("dataset")}
    tr = saes.Trainer(models, cfg, sites=sites, out_dir=out, metadata=metadata, data_summary=source).fit(
        data, resume=run.resume, overwrite=run.overwrite, accept_changes=run.accept_changes)
    from saes.run_folder import folder_name

    print(json.dumps({"steps": tr.steps_, "tokens": tr.tokens_,
                      "final": tr.history_[-1] if tr.history_ else None,
                      "saved": [str(out / folder_name(n)) for n in models]}, indent=1))
    return 0


def parse_variants(specs: tuple[str, ...], arch: str, fields: set[str]) -> dict[str, dict[str, Any]]:
    """``--variants k32:k=32 k64:k=64,d_sae=18432`` -> ``{"k32": {"k": 32}, "k64": {"k": 64, "d_sae": 18432}}``
    (values read as JSON where they parse, else as text; the architecture's config checks them)."""
    from saes.base import SAEError

    valid = sorted((fields | {"d_sae"}) - {"d_model"})
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        name, sep, body = spec.partition(":")
        if not sep or not name or not body:
            raise SAEError(f"--variants {spec!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE...], "
                           "e.g. k64:k=64,d_sae=18432")
        if name in out:
            raise SAEError(f"--variants: the name {name!r} is given twice; give each variant its own name")
        change: dict[str, Any] = {}
        for item in body.split(","):
            key, eq, value = item.partition("=")
            if not eq or key not in valid:
                raise SAEError(f"--variants {spec!r}: {item!r} is not FIELD=VALUE with a field of architecture "
                               f"{arch!r}; its fields: {', '.join(valid)}")
            try:
                change[key] = json.loads(value)
            except ValueError:
                change[key] = value
        out[name] = change
    return out


def _train_data(run: TrainRun, got: dict[str, Any], device) -> tuple[Any, dict[str, int], dict[str, Any]]:
    """(activation source, {site: width}, a summary of the source to record in the checkpoint)."""
    import saes

    batch = got.get("batch_tokens", opt.defaults(opt.dataclass_options(saes.TrainConfig))["batch_tokens"])
    seed = got.get("seed", 0)
    if run.cache is not None:
        from interp.cache import CachedActivations

        data = CachedActivations(run.cache, batch_tokens=batch, seed=seed, epochs=None, sites=list(run.sites) or None)
        info = data.describe()
        return data, dict(data.d_models), {**info, "cache": str(Path(run.cache).resolve())}
    if not run.sites:
        raise saes.SAEError("no --sites: live activations (no --cache) need --sites, e.g. blocks.12.hook_resid_post")
    from interp.models import load_model
    from interp.store import ActivationStore

    model, tok = load_model(run.model, device=device)
    tokens = got.get("tokens", batch)
    data = ActivationStore(model, tok, list(run.sites), dataset=run.dataset, context_size=run.context_size,
                           batch_tokens=batch, buffer_tokens=min(32 * batch, max(4 * batch, tokens)), seed=seed,
                           device=device, epochs=None)
    return data, dict(data.d_models), {**data.describe(), "model": run.model}


# ------------------------------------------------------------------------------------------ eval
EVAL_BATCH = 4096
"""Most rows per evaluation batch (``--tokens`` is split into equal batches of at most this many)."""


def run_eval(args: argparse.Namespace) -> int:
    from interp.data import DEFAULT, sample_windows
    from interp.models import load_model
    from saes.base import SAEError
    from saes.checkpoint import annotate
    from saes.evaluate import evaluate, save_report

    ck = read_one(args.sae, args.site)
    meta, training = ck.metadata or {}, ck.training or {}
    site = args.site or meta.get("hook_name")
    if not site:
        raise SAEError(f"{args.sae}: its cfg.json names no hook_name; pass --site")
    if args.out is None and ck.source != "interp":
        raise SAEError(f"{args.sae} was written by {ck.source}, so its metrics cannot be recorded in it; pass "
                       "--out DIR to write them there")
    if args.tokens < 1:
        raise SAEError(f"--tokens {args.tokens}: expected the number of activation rows to evaluate (>= 1), "
                       "e.g. --tokens 200000")
    model_name = args.model or meta.get("model_name") or EMBEDDED
    if args.out is None:
        _check_recorded_place(args, meta, ck.path)
    if args.out is not None and (Path(args.out) / "eval.json").exists() and not args.overwrite:
        raise SAEError(f"{args.out} already holds eval.json from an earlier evaluation; pass --overwrite to replace "
                       "it, or another --out")
    device = resolve_device(args.device)
    sae = ck.sae.to(device)
    dataset = args.dataset or meta.get("dataset_path")
    context = args.context_size or meta.get("context_size") or DEFAULT_CONTEXT_SIZE
    bos = bool(meta.get("prepend_bos", False))  # the windows the SAE was trained on began with BOS, or did not
    model, tok = load_model(model_name, device=device)
    rows = args.tokens
    evaluated_on: dict[str, Any] = {"site": site, "model": model_name, "seed": args.eval_seed,
                                    "tokens_requested": args.tokens}
    if args.cache:
        from interp.cache import CachedActivations

        held = CachedActivations(args.cache, batch_tokens=1, sites=[site]).n_tokens
        if held < rows:
            warnings.warn(f"--tokens {rows} but the cache {args.cache} holds {held} rows: evaluating on all {held}; "
                          f"capture more rows ('interp capture ... --tokens {rows}') or ask for fewer", stacklevel=1)
            rows = held
    n_batches = -(-rows // EVAL_BATCH)
    bt = -(-rows // n_batches)  # equal batches; first_rows cuts the last one to `rows` in all
    if args.cache:
        # two epochs, so that the last batch is served whole; only the first `rows` rows, all of them of the first
        # epoch, are read
        data = CachedActivations(args.cache, batch_tokens=bt, seed=args.eval_seed, sites=[site], device=device,
                                 epochs=2)
        _warn_in_sample(args.cache, training.get("data") or {}, rows)
        # the folder's name, not its path: the record goes into the checkpoint and the published card
        evaluated_on.update(cache=Path(args.cache).resolve().name, cache_model=data.header.get("model"),
                            dataset=data.header.get("dataset"))
    else:
        from interp.store import ActivationStore

        data = ActivationStore(model, tok, [site], dataset=dataset, context_size=context, batch_tokens=bt,
                               buffer_tokens=min(16 * bt, max(bt, rows)), seed=args.eval_seed, device=device,
                               prepend_bos=bos)
        evaluated_on.update(cache=None, dataset=dataset or DEFAULT, context_size=context)
    windows = mask = None
    if args.windows:
        windows, mask = sample_windows(tok, args.windows, context, dataset, seed=args.eval_seed, prepend_bos=bos)
        evaluated_on.update(windows=int(windows.shape[0]), windows_dataset=dataset or DEFAULT,
                            windows_context_size=context)
    report = evaluate(sae, first_rows(data, site, rows), site=site, n_batches=n_batches,
                      model=model if args.windows else None, windows=windows, splice_mask=mask)
    if report["n_rows"] < args.tokens and not args.cache:
        warnings.warn(f"--tokens {args.tokens} but the dataset {dataset or DEFAULT} gave {report['n_rows']} rows at "
                      f"{site}: the metrics are over those {report['n_rows']}; give a larger --dataset or fewer "
                      "--tokens", stacklevel=1)
    evaluated_on["rows"] = report["n_rows"]
    report["evaluation"] = evaluated_on
    if args.out is not None:
        save_report(report, args.out)
    if args.absorption:
        report["absorption"] = _absorption(ck, model, tok, site, args)
        if args.out is not None:
            from interp.atomic import write_json

            write_json(Path(args.out) / "absorption.json", report["absorption"])
    if args.out is None:
        annotate(ck.path, metrics=report)  # replaces the metrics of any earlier evaluation as a whole
    shown = {k: v for k, v in report.items() if not hasattr(v, "shape") and k not in ("l0_histogram", "absorption")}
    if args.absorption:
        shown["absorption"] = {k: v for k, v in report["absorption"].items() if k not in ("letters", "config")}
    print(json.dumps(shown, indent=1))
    print(f"metrics recorded in {ck.path / 'cfg.json'}" if args.out is None else f"wrote {args.out}")
    return 0


def first_rows(batches, site: str, n: int):
    """The first `n` rows of `batches` (``{site: tensor}`` each), the last batch cut short where it holds more."""
    left = n
    for b in batches:
        x = b[site]
        yield {site: x[:left]}
        left -= min(left, x.shape[0])
        if not left:
            return


def _check_recorded_place(args: argparse.Namespace, meta: dict[str, Any], path: Path) -> None:
    """Refuse an evaluation at another site or of another model than the checkpoint records, when its metrics
    would be written into that checkpoint (they would be read as the SAE's own)."""
    from saes.base import SAEError
    from saes.card import same_model

    hook, recorded = meta.get("hook_name"), meta.get("model_name")
    if args.site and hook and args.site != hook:
        raise SAEError(f"--site {args.site}: this SAE reads {hook} (the hook_name in {path / 'cfg.json'}), so "
                       f"metrics measured at {args.site} cannot be recorded in it; drop --site, or pass --out DIR "
                       "to write them there (the site is recorded with them)")
    if args.model and recorded and not same_model(args.model, str(recorded)):
        raise SAEError(f"--model {args.model}: this SAE was trained on {recorded} (the model_name in "
                       f"{path / 'cfg.json'}), so metrics measured on {args.model} cannot be recorded in it; drop "
                       "--model, or pass --out DIR to write them there (the model is recorded with them)")


def _absorption(ck, model, tok, site: str, args: argparse.Namespace) -> dict[str, Any]:
    """First-letter absorption of the checkpoint's dictionary (probes.absorption), on the words' activations."""
    from probes.absorption import AbsorptionConfig, first_letter_absorption, first_letter_data

    cfg = AbsorptionConfig(words_per_letter=args.absorption_words, seed=args.eval_seed)
    data = first_letter_data(model, tok, site, cfg)
    encode, sae = ck.encoder(), ck.sae
    return first_letter_absorption(lambda x: encode(x.to(sae.device, sae.dtype)), ck.decoder(), data, cfg)


def _warn_in_sample(cache: str, trained: dict[str, Any], rows: int) -> None:
    """Warn when the evaluation cache is the one the SAE trained on (`rows`: the rows the evaluation reads)."""
    if trained.get("cache") and Path(trained["cache"]) == Path(cache).resolve():
        seen = min(int(trained.get("tokens_trained", 0)), int(trained.get("rows", 0)))
        warnings.warn(f"evaluating on {cache}, the cache this SAE trained on ({seen} of its {trained.get('rows')} rows "
                      f"were training rows; {rows} are read now): the metrics are in-sample; capture a held-out cache "
                      "with another --seed or --dataset", stacklevel=1)


def read_one(path: str, site: str | None):
    """The checkpoint at `path`, or its subfolder for `site` when `path` holds one SAE per site (the
    layout 'interp sae train' writes), through saes.read and all its validation."""
    from saes.checkpoint import read
    from saes.locate import CFG_FILENAME

    return read(path, site=None if (Path(path) / CFG_FILENAME).is_file() else site)


# ------------------------------------------------------------------------------------------ publish
def run_publish(args: argparse.Namespace) -> int:
    from saes.publish import prepare, publish

    if args.dry_run:
        plan = prepare(args.folder, args.repo_id)
    else:
        plan = publish(args.folder, args.repo_id, private=args.private, token=args.token)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(plan.files)} files for {len(plan.sites)} SAE(s) to {plan.repo_id}:")
    for f in plan.files:
        print(f"  {f}")
    return 0
