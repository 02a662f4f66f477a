"""``interp dashboard sae | probe | subspace``: the data pass and the static site of a set of units.

    interp dashboard sae sae/blocks.12.hook_resid_post --tokens 100000 --out dash/
    interp dashboard probe --model smollm2-135m --site blocks.6.mlp.hook_post --neurons 12,403 --out dash/
    interp dashboard subspace out/days/subspaces/blocks.10.hook_resid_post --site blocks.10.hook_resid_post \\
        --items days --out dash/

Each writes ``data.json`` + ``data.safetensors`` (fields in :mod:`interp.dashboard.collect`),
``index.html`` and ``units/<n>.html`` into ``--out`` (and, with ``--neuronpedia SET``,
``neuronpedia/batch-0.json``: fields in :mod:`interp.dashboard.neuronpedia`). Running the same command again resumes an
interrupted pass, and re-renders the pages of a finished one. The pass options come from
:class:`interp.dashboard.DashboardConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from interp.cli import options as opt
from interp.dashboard.collect import DashboardConfig
from interp.errors import InputError
from interp.models import EMBEDDED, resolve_device


def _indices(spec: str, n: int, flag: str) -> list[int]:
    """``"0-63"``, ``"3,17,40"`` or ``"0-100:10"`` (inclusive ranges) to indices in ``0..n-1``."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            rng, _, step = part.partition(":")
            lo, _, hi = rng.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1, int(step or 1))) if hi else [int(lo)]
    except ValueError:
        raise InputError(f"{flag} {spec!r}: expected numbers like '0-63', '3,17,40' or '0-1000:10'") from None
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise InputError(f"{flag} {spec!r}: {bad[:5] or 'nothing'} not in 0..{n - 1}; there are {n}")
    return list(dict.fromkeys(out))


def _config(args) -> DashboardConfig:
    names = [f.name for f in dataclasses.fields(DashboardConfig)]
    return DashboardConfig(**opt.given(args, names))


def _finish(args, model, tok, site: str, units, model_name: str, extra: dict | None = None) -> int:
    from interp.dashboard.collect import collect
    from interp.dashboard.render import render

    out = collect(model, tok, site, units, args.out, _config(args), model_name=model_name, extra=extra,
                  progress=not args.quiet)
    index = render(out)
    print(f"wrote {index} ({len(units.names)} {units.kind}s)")
    if args.neuronpedia:
        from interp.dashboard.neuronpedia import neuronpedia_batch

        print(f"wrote {neuronpedia_batch(out, sae_set=args.neuronpedia, model_id=args.neuronpedia_model)}")
    return 0


def run_sae(args: argparse.Namespace) -> int:
    from interp.cli.sae import read_one
    from interp.dashboard.units import sae_units
    from interp.models import load_model

    ckpt = read_one(args.checkpoint, args.site)  # saes.read: every validation of the checkpoint format applies
    meta = ckpt.metadata or {}
    site = args.site or meta.get("hook_name")
    model_name = args.model or meta.get("model_name") or EMBEDDED
    if not site:
        raise InputError(f"{args.checkpoint}: its cfg.json names no hook_name; pass --site")
    decoder = ckpt.decoder()
    latents = _indices(args.latents, decoder.shape[0], "--latents") if args.latents else None
    device = resolve_device(args.device)
    ckpt.sae.to(device)
    units = sae_units(ckpt.encoder(sparse=True), decoder.to(device), latents)  # sparse codes: the pass's fastest
    model, tok = load_model(model_name, device=device)
    return _finish(args, model, tok, site, units, model_name)


def _probe_neurons(args) -> list[int]:
    if bool(args.neurons) == bool(args.results):
        raise InputError("name the neurons: give --neurons (e.g. 12,403) or --results results.json from "
                         "'interp probe' (with --n-neurons), not both")
    if args.neurons:
        return _indices(args.neurons, 1 << 30, "--neurons")
    try:
        res = json.loads(Path(args.results).read_text())
        records = [r for r in res["records"] if r["site"] == args.site]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--results {args.results}: not a results.json of 'interp probe' ({e})") from None
    sizes = sorted({int(r["n_neurons"]) for r in records})
    if not sizes:
        raise InputError(f"--results {args.results} holds no probe at site {args.site}; pass the site it swept")
    n = args.n_neurons if args.n_neurons is not None else (sizes[0] if len(sizes) == 1 else None)
    if n not in sizes:
        raise InputError(f"--results {args.results}: choose --n-neurons among {sizes} (the probes at {args.site})")
    return [int(i) for i in next(r for r in records if int(r["n_neurons"]) == n)["neurons"]]


def run_probe(args: argparse.Namespace) -> int:
    import torch

    from interp.capture import site_widths
    from interp.dashboard.units import neuron_units
    from interp.models import load_model

    neurons = _probe_neurons(args)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    width = site_widths(model, [args.site])[args.site]
    units = neuron_units(neurons, width)  # checks the indices against the width
    if "resid" in args.site and width == model.get_input_embeddings().weight.shape[1]:
        units = neuron_units(neurons, width, torch.eye(width)[neurons])  # a residual neuron writes its basis vector
    return _finish(args, model, tok, args.site, units, args.model)


def run_subspace(args: argparse.Namespace) -> int:
    from interp.dashboard.units import subspace_units
    from interp.models import load_model
    from interp.subspace import CircleMap, Subspace, TableMap

    sub = Subspace.load(args.subspace)
    model, tok = load_model(args.model, device=resolve_device(args.device))
    extra: dict = {}
    if args.items:
        from interp.features.items import item_activations, resolve_items

        items, templates, _ = resolve_items(args.items)
        acts, labels, _ = item_activations(model, tok, items, templates, [args.site], device="cpu")
        coords = sub.project(acts[args.site].float())
        extra["class_means"] = {c: coords[[i for i, lab in enumerate(labels) if lab == c]].mean(0).tolist()
                                for c in items}
    elif isinstance(sub.coord_map, CircleMap):
        extra["class_means"] = {c: sub.to_coords(c).tolist() for c in sub.coord_map.angles}
    elif isinstance(sub.coord_map, TableMap):
        extra["class_means"] = {c: sub.to_coords(c).tolist() for c in sub.coord_map.labels}
    if sub.rank < 2:
        extra.pop("class_means", None)
    return _finish(args, model, tok, args.site, subspace_units(sub), args.model, extra)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="browse what SAE latents, probe neurons or a subspace respond to (static "
                       "HTML pages)")
    dsub = p.add_subparsers(dest="dashboard_command", metavar="DASHBOARD_COMMAND", parser_class=opt.Parser)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
    pass_opts = opt.dataclass_options(DashboardConfig)

    def common(c: argparse.ArgumentParser) -> None:
        c.add_argument("--out", required=True, help="output folder: data.json, data.safetensors, index.html, units/")
        c.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
        c.add_argument("--quiet", action="store_true", help="no progress bar")
        c.add_argument("--neuronpedia", metavar="SET", help="also write neuronpedia/batch-0.json for this Neuronpedia "
                       "set name (e.g. res-topk), the layout Neuronpedia imports")
        c.add_argument("--neuronpedia-model", help="Neuronpedia's model id (default: the model name)")
        opt.add_options(c.add_argument_group("data pass options"), pass_opts)

    s = dsub.add_parser("sae", help="pages of an SAE's latents", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help="SAE folder (this project's, SAELens' or sparsify's), or a folder of one SAE "
                   "per site with --site")
    s.add_argument("--site", help="site the SAE reads (default: the hook_name in its cfg.json)")
    s.add_argument("--model", help="model (default: the model_name the checkpoint records, else the embedded model)")
    s.add_argument("--latents", help="only these latents, e.g. '0-63' or '3,17,40' (default: all)")
    common(s)
    s.set_defaults(func=run_sae)

    b = dsub.add_parser("probe", help="pages of chosen neurons of a site (e.g. a sparse probe's support)")
    b.add_argument("--model", default=EMBEDDED, help=f"model name or path (default: {EMBEDDED})")
    b.add_argument("--site", required=True, help="site of the neurons, e.g. blocks.6.mlp.hook_post")
    b.add_argument("--neurons", help="neuron indices, e.g. '12,403' or '0-15'")
    b.add_argument("--results", help="results.json of 'interp probe': take the support of its probe at --site")
    b.add_argument("--n-neurons", type=int, help="with --results: which probe size (default: the only one)")
    common(b)
    b.set_defaults(func=run_probe)

    u = dsub.add_parser("subspace", help="pages of a subspace's coordinates (and a circle's named angles)")
    u.add_argument("subspace", help="Subspace folder (Subspace.save, 'interp features circles')")
    u.add_argument("--model", default=EMBEDDED, help=f"model name or path (default: {EMBEDDED})")
    u.add_argument("--site", required=True, help="site the subspace lives in, e.g. blocks.10.hook_resid_post")
    u.add_argument("--items", help="'days', 'months' or comma-separated items: plot their class means (default: "
                   "the circle's own named points)")
    common(u)
    u.set_defaults(func=run_subspace)
