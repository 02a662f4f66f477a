"""``interp features circles`` and ``interp features clusters``: write JSON + PNG (+ Subspace folders).

``circles.json``: ``model``, ``items``, ``family`` (days, months or custom), ``n_templates``,
``n_prompts``, ``rank``, ``torch`` (version), ``command``, and ``sites``: one row per site with
``site``, ``layer``, ``order_matches`` (the circle's cyclic order is the items' order),
``cyclic_order``, ``loco_angle_error`` (leave-one-class-out angle error, radians), ``angle_error``,
``radius_cv`` (spread of the class means' distances to the centre), ``top2_explained`` and
``explained_variance`` (of the class means, per direction) and ``angles`` (each item's angle); beside
them the circle probe's (Engels et al.: a linear read-out of each item's (cos, sin) from the top
principal components, :func:`interp.features.circle_probe`): ``probe_loco_angle_error`` (leave one
item out), ``probe_loto_angle_error`` (leave one template out, per prompt), ``probe_order_matches``,
``probe_r2`` and ``probe_angles``. The class-mean LOCO error assumes evenly spaced items; the probe's
does not. Each site's class-mean plane is saved as a Subspace folder under ``subspaces/<site>`` and
plotted as ``<site>.png``; the probe's plane under ``subspaces/<site>.probe``.

``clusters.json``: ``sae``, ``d_sae``, ``architecture``, ``n_clusters`` (spectral: the number used,
``d_sae / 25`` unless ``--n-clusters``), ``cluster_config`` and ``config`` (the settings used), ``tokens``
(``--tokens``, the most rows to read), ``rows_read`` (the activation rows read: fewer where the data ended, or every
cluster had ``max_points`` rows first), ``n_scored`` and ``clusters``: one entry per
scored cluster, most irreducible first, with ``latents``, ``n_points``, ``explained_variance`` (of
the cluster's reconstructions, per principal component), ``pairs`` (scores of each pair of
components), ``best_pair``, ``separability`` (bits), ``mixture`` (epsilon-mixture index),
``irreducibility``, ``circle`` (the circle fit of the best pair), ``is_circle`` and ``label_angles``.
Circles among the top ``--top`` are saved as Subspace folders under ``subspaces/``.

    interp features circles --model smollm2-135m --layers 4-20 --items days --out out/days
    interp features clusters --sae sae/blocks.12.hook_resid_post --cache cache/ --out out/clusters
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from interp.atomic import write_json
from interp.cli.options import add_options, dataclass_options, given, parse_layers
from interp.errors import InputError
from interp.features.clusters import ClusterConfig, ClusterWarning, default_n_clusters
from interp.features.multidim import MultiDimConfig
from interp.models import EMBEDDED
from interp.provenance import machine_path, placeholder


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=2)


def _sites(args) -> list[str]:
    sites = list(args.site or [])
    if args.layers:
        sites += [f"blocks.{layer}.{args.hook}" for layer in parse_layers(args.layers)]
    if not sites:
        raise InputError("name at least one --site (e.g. blocks.12.hook_resid_post) or --layers (e.g. 4-20)")
    return list(dict.fromkeys(sites))


def run_circles(args) -> int:
    import torch

    from interp.features.circle_probe import circle_probe
    from interp.features.items import item_activations, resolve_items
    from interp.features.plot import plot_layer_scores
    from interp.features.supervised import class_mean_subspace
    from interp.models import load_model

    items, templates, family = resolve_items(args.items)
    sites = _sites(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device=args.device)
    acts, labels, tids = item_activations(model, tok, items, templates, sites, device="cpu")
    rows = []
    order = items if family != "custom" else None
    for site in sites:
        sub = class_mean_subspace(acts[site], labels, rank=args.rank, circle=True, order=order, name=f"{family}@{site}")
        probe = circle_probe(acts[site], labels, order=order, groups=tids, name=f"{family}@{site} probe")
        m, pm = sub.meta, probe.meta
        layer = int(site.split(".")[1]) if site.startswith("blocks.") else None
        rows.append({"site": site, "layer": layer, "order_matches": m["order_matches"],
                     "cyclic_order": m["cyclic_order"], "loco_angle_error": m.get("loco_angle_error"),
                     "angle_error": m["angle_error"], "radius_cv": m["radius_cv"],
                     "top2_explained": sum(m["explained_variance"][:2]), "explained_variance": m["explained_variance"],
                     "angles": sub.coord_map.angles, "probe_loco_angle_error": pm["loco_angle_error"],
                     "probe_loto_angle_error": pm["loto_angle_error"], "probe_order_matches": pm["order_matches"],
                     "probe_r2": pm["r2"], "probe_angles": probe.coord_map.angles})
        safe = site.replace("/", "_")
        sub.plot(acts[site], labels, order=items, path=out / f"{safe}.png", title=f"{args.model} {site}: {family}")
        sub.save(out / "subspaces" / safe)
        probe.save(out / "subspaces" / f"{safe}.probe")
    summary = {"model": args.model, "items": items, "family": family, "n_templates": len(templates),
               "n_prompts": len(labels), "rank": args.rank, "sites": rows,
               "torch": torch.__version__, "command": "interp features circles " + " ".join(args.argv_)}
    _write_json(out / "circles.json", summary)
    if len(rows) > 1 and all(r["layer"] is not None for r in rows):
        plot_layer_scores(rows, out / "scores.png", title=f"{args.model}: {family} circle by layer")
    print(f"{'site':32s} {'order ok':>8s} {'LOCO err':>9s} {'probe LOCO':>10s} {'probe LOTO':>10s} "
          f"{'radius cv':>9s} {'top-2 var':>9s}  (angle errors in radians)")
    for r in rows:
        loco = r["loco_angle_error"]
        print(f"{r['site']:32s} {str(r['order_matches']):>8s} {loco if loco is None else round(loco, 3)!s:>9s} "
              f"{r['probe_loco_angle_error']:10.3f} {r['probe_loto_angle_error']:10.3f} "
              f"{r['radius_cv']:9.3f} {r['top2_explained']:9.3f}")
    print(f"wrote {out / 'circles.json'}")
    return 0


def run_clusters(args) -> int:
    import dataclasses

    from interp.cli.sae import read_one
    from interp.features.multidim import find_multidim_features
    from interp.features.plot import plot_clusters

    ckpt = read_one(args.sae, args.site)  # saes.read: every validation of the checkpoint format applies
    meta = ckpt.metadata or {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    site = args.site or meta.get("hook_name")
    if args.cache:
        from interp.cache import CachedActivations

        data = CachedActivations(args.cache, batch_tokens=args.batch_tokens, sites=[site] if site else None)
        if len(data.sites) != 1:
            raise InputError(f"the cache {args.cache} holds sites {data.sites}; name the SAE's with --site")
    else:
        from interp.models import load_model
        from interp.store import ActivationStore

        model_name = args.model or meta.get("model_name")
        if not model_name or not site:
            raise InputError("give --cache CACHE_DIR, or --model and --site (the SAE's cfg.json metadata names "
                             f"neither: model_name={model_name!r}, hook_name={site!r})")
        model, tok = load_model(model_name, device=args.device)
        data = ActivationStore(model, tok, [site], dataset=args.dataset, batch_tokens=args.batch_tokens, epochs=1,
                               buffer_tokens=max(args.batch_tokens, min(32 * args.batch_tokens, args.tokens)))
    ccfg = ClusterConfig(**given(args, [f.name for f in dataclasses.fields(ClusterConfig)]))
    mcfg = MultiDimConfig(**given(args, [f.name for f in dataclasses.fields(MultiDimConfig)]))
    decoder = ckpt.decoder()
    with warnings.catch_warnings(record=True) as caught:  # a clustering that finds nothing: one line, what to change
        warnings.simplefilter("always", ClusterWarning)
        read = [0]

        def counted(batches):
            for b in batches:
                read[0] += len(next(iter(b.values())) if isinstance(b, dict) else b)
                yield b

        feats = find_multidim_features(decoder, counted(data), encode=ckpt.encoder(), cluster_config=ccfg,
                                       config=mcfg, max_rows=args.tokens)
    for w in caught:
        if issubclass(w.category, ClusterWarning):
            print(f"hint: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    summary = {"sae": str(args.sae), "d_sae": int(decoder.shape[0]), "architecture": ckpt.sae.architecture,
               "n_clusters": (ccfg.n_clusters or default_n_clusters(int(decoder.shape[0])))
               if ccfg.method == "spectral" else None, "cluster_config": dataclasses.asdict(ccfg),
               "config": dataclasses.asdict(mcfg), "tokens": args.tokens, "rows_read": read[0],
               "n_scored": len(feats), "clusters": [f.to_dict() for f in feats]}
    _write_json(out / "clusters.json", summary)
    if feats:
        plot_clusters(feats, out / "clusters.png", top=args.top)
    for i, f in enumerate(feats[: args.top]):
        if f.is_circle:
            f.subspace.save(out / "subspaces" / f"cluster{i}")
    print(f"{'#':>3s} {'latents':>7s} {'points':>7s} {'S (bits)':>8s} {'M_eps':>6s} {'irred.':>6s} circle")
    for i, f in enumerate(feats[: args.top]):
        print(f"{i:3d} {len(f.latents):7d} {f.n_points:7d} {f.separability:8.3f} {f.mixture:6.3f} "
              f"{f.irreducibility:6.3f} {f.is_circle}")
    print(f"wrote {out / 'clusters.json'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="find circular / multi-dimensional features and linear subspaces")
    sub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND")
    sub.required = True

    c = sub.add_parser("circles", help="class-mean PCA + fitted circle of an item family (days, months) per site")
    c.add_argument("--model", default=EMBEDDED, help=f"model name or path (default: {EMBEDDED})")
    c.add_argument("--site", action="append", help="site name; repeatable")
    c.add_argument("--layers", help="layers, e.g. '4-20', '3,6,9' or '0-29:3' (sites blocks.L.<--hook>)")
    c.add_argument("--hook", default="hook_resid_post", help="site kind used with --layers (default: "
                   "hook_resid_post)")
    c.add_argument("--items", default="days", help="'days', 'months', or comma-separated items (default: days)")
    c.add_argument("--rank", type=int, default=2, help="principal directions of the class means to keep (default: 2)")
    c.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    c.add_argument("--out", required=True, help="output folder (circles.json, PNGs, subspaces/)")
    c.set_defaults(func=_with_argv(run_circles))

    k = sub.add_parser("clusters", help="cluster an SAE's decoder and rank clusters by irreducibility")
    k.add_argument("--sae", required=True, help="SAE checkpoint folder (this project's, SAELens' or sparsify's)")
    k.add_argument("--cache", help="activation cache folder from 'interp capture' (omit: live activations)")
    k.add_argument("--model", help="model for live activations (default: the SAE's metadata)")
    k.add_argument("--site", help="site of the activations (default: the SAE's hook_name)")
    k.add_argument("--dataset", help="text for live activations (default: the offline corpus)")
    k.add_argument("--tokens", type=int, default=200_000, help="activation rows to read (default: 200000)")
    k.add_argument("--batch-tokens", type=int, default=4096, help="rows per batch read (default: 4096)")
    k.add_argument("--top", type=int, default=12, help="clusters to plot, print and save (default: 12)")
    k.add_argument("--device", default=None, help="device of the model for live activations")
    k.add_argument("--out", required=True, help="output folder (clusters.json, clusters.png, subspaces/)")
    add_options(k.add_argument_group("clustering options"), dataclass_options(ClusterConfig))
    add_options(k.add_argument_group("scoring options"), dataclass_options(MultiDimConfig))
    k.set_defaults(func=_with_argv(run_clusters))


def _with_argv(fn):
    def run(args: argparse.Namespace) -> int:
        args.argv_ = recorded_flags(args)
        return fn(args)

    return run


def recorded_flags(args: argparse.Namespace) -> list[str]:
    """The options of a parsed command line as a result records them, so that the command runs again: one
    ``--flag value`` per item of a repeated flag, a bare ``--flag`` for a switch that is on, 0 kept, and a
    machine path written as the flag's name in capitals (``--model MODEL``, as :mod:`interp.provenance` does)."""
    out = []
    for k, v in sorted(vars(args).items()):
        if k in ("func", "command", "features_command", "argv_") or v is None or v is False:
            continue
        flag = f"--{k.replace('_', '-')}"
        for item in v if isinstance(v, list) else [v]:
            text = str(item)
            out.append(flag if item is True else f"{flag} {placeholder(flag) if machine_path(text) else text}")
    return out
