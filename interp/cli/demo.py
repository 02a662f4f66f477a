"""``interp demo``: the whole story on one model in a few minutes.

1. capture the residual stream at weekday (or month) tokens in many prompts, every other layer;
2. find the circle: class-mean PCA and a circle fit per layer (cyclic order, leave-one-class-out
   angle error, radius spread), beside the circle probe's leave-one-class-out error (a linear
   read-out of each item's angle, which does not assume evenly spaced items);
3. probe for item tokens with k-sparse probes on the MLP neurons (F1 against k, best single neurons);
4. rotate the item's circle coordinates at the item token of prompts that make the model repeat it,
   and count how often the model then says the target item: a pure rotation, ``Rotate``'s defaults
   (the target's point at 4 x the circle radius) in the class-mean and the probe's planes, against
   controls measured in the same run (no edit, a random plane turned by the same angles and put as far
   out, ``interp.controls.random_control``; the whole activation replaced by the target's mean);
5. write ``report.md`` + PNG plots + ``results.json`` to a folder and print where it is.

``results.json`` fields: ``model``, ``items_name`` (days or months), ``items``, ``layer`` (the edited
layer), ``scale`` (``--scale``; null: Rotate's default), ``device``, ``command`` (every option that differs from its
default), ``seconds``; ``circle``: one row per layer (``layer``,
``order_matches``, ``cyclic_order``, ``loco_angle_error`` in radians, ``probe_loco_angle_error`` (the
circle probe's), ``radius_cv``, ``top2_explained``); ``probe``: ``n_examples``, ``n_positive``, ``table`` (F1 by
layer and neuron
count, as text), ``best_k1`` (the best single neuron: ``site``, ``f1``, ``neuron``); ``intervention``: ``site``,
``position``, ``rows`` (prompt, target pairs), ``templates`` and ``edits`` (per edit: ``success``,
the fraction of rows whose top item is the target, and ``kept_source``, the fraction still naming the
original item).

It lives in the command layer, the one place that joins ``interp`` and ``probes``; it uses only
public APIs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from interp.atomic import write_json
from interp.models import EMBEDDED

REPEAT_TEMPLATES = {
    "days": ["I will see you on {}. To repeat, I will see you on", "The party is on {}. Remember, the party is on",
             "Her flight lands on {}. Her flight lands on", "The report is due on {}. Again: the report is due on"],
    "months": ["I was born in {}. To repeat, I was born in", "The party is in {}. Remember, the party is in",
               "Her flight lands in {}. Her flight lands in", "The report is due in {}. Again: the report is due in"],
}


DEFAULT_LAYER = 10
"""The layer the demo edits unless ``--layer`` says otherwise."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="capture, find the weekday circle, probe, intervene, write a report")
    p.add_argument("--model", default=EMBEDDED,
                   help=f"embedded model name, HF name or local path (default: {EMBEDDED})")
    p.add_argument("--items", default="days", choices=["days", "months"], help="item family (default: days)")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER,
                   help=f"layer whose hook_resid_post is edited (default: {DEFAULT_LAYER})")
    p.add_argument("--scale", type=float, default=None, help="circle edit: multiple of the circle radius the "
                   "target's point is put at (default: Rotate's, 4)")
    p.add_argument("--out", default="interp-demo", help="report folder (default: interp-demo)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="fewer layers and prompts (for tests)")
    p.set_defaults(func=run)


def _command(args: argparse.Namespace) -> str:
    """``interp demo`` with every option that changes what the run measures and differs from its default (a
    model given as a machine path is written ``--model MODEL``)."""
    from interp.provenance import machine_path

    parts = ["interp demo"]
    if args.model != EMBEDDED:
        parts.append(f"--model {'MODEL' if machine_path(str(args.model)) else args.model}")
    if args.items != "days":
        parts.append(f"--items {args.items}")
    if args.layer != DEFAULT_LAYER:
        parts.append(f"--layer {args.layer}")
    if args.scale is not None:
        parts.append(f"--scale {args.scale:g}")
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)


def _item_token_ids(tok, items: list[str]) -> list[int]:
    ids = [tok(" " + it, add_special_tokens=False)["input_ids"] for it in items]
    if any(len(i) != 1 for i in ids):
        from interp.errors import InputError

        raise InputError(f"the demo needs items that are single tokens with a leading space; token counts: "
                         f"{dict(zip(items, map(len, ids)))}")
    return [i[0] for i in ids]


def find_circles(model, tok, items, templates, layers, out: Path) -> tuple[dict, list[dict]]:
    """Class-mean PCA + circle fit at every layer; returns ({layer: Subspace}, score rows)."""
    from interp.features import circle_probe, class_mean_subspace, item_activations
    from interp.features.plot import plot_layer_scores

    sites = [f"blocks.{L}.hook_resid_post" for L in layers]
    acts, labels, tids = item_activations(model, tok, items, templates, sites)
    subspaces, rows = {}, []
    for L, s in zip(layers, sites):
        sub = class_mean_subspace(acts[s], labels, rank=2, circle=True, order=items, name=f"{s} circle")
        probe = circle_probe(acts[s], labels, order=items, groups=tids, name=f"{s} circle probe")
        subspaces[L] = (sub, acts[s], labels, probe)
        m = sub.meta
        rows.append({"layer": L, "order_matches": bool(m["order_matches"]),
                     "loco_angle_error": round(m["loco_angle_error"], 4),
                     "probe_loco_angle_error": round(probe.meta["loco_angle_error"], 4),
                     "radius_cv": round(m["radius_cv"], 4),
                     "top2_explained": round(sum(m["explained_variance"][:2]), 4)})
    plot_layer_scores(rows, out / "circle_scores_by_layer.png", title=f"{items[0]}.. circle, per layer",
                      keys=("loco_angle_error", "probe_loco_angle_error", "radius_cv", "top2_explained"))
    return subspaces, rows


def probe_items(model, tok, items, templates, layers, progress: bool, n_docs: int = 120) -> tuple[dict, object]:
    """k-sparse probes for 'this token is an item' on MLP neurons; documents split train/test."""
    import probes
    from interp.data import load_texts

    texts = [t.format(it) + "." for t in templates for it in items]
    texts += [d[:400] for d in list(load_texts())[:n_docs]]  # prose with (almost) no items: negatives
    names = set(items)
    sites = [f"blocks.{L}.mlp.hook_post" for L in layers]
    ds = probes.token_dataset(model, tok, texts, sites, label_fn=lambda toks, i: toks[i].strip() in names,
                              max_length=96, progress=progress)
    result = probes.sweep(ds.acts, ds.labels, groups=ds.groups, n_neurons=(1, 2, 4, 8, 16, 32), method="f_stat",
                          progress=progress)
    return {"n_examples": len(ds), "n_positive": int(sum(bool(y) for y in ds.labels))}, result


def _top_items(model, batch, item_ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[:, -1].float()
    return logits[:, item_ids].argmax(-1).cpu()


def intervene_items(model, tok, items, circle, probe, fit_acts, fit_labels, layer, scale, n_templates, seed=0):
    """Success rates of the circle edits (class-mean and probe planes) and the controls on repeat prompts."""
    from interp.capture import tokenize
    from interp.controls import random_control
    from interp.edits import ROTATE_SCALE, Replace, Rotate
    from interp.intervene import intervene

    item_ids = _item_token_ids(tok, items)
    family = "days" if items[0] == "Monday" else "months"
    rows = [(t, src, tgt) for t in REPEAT_TEMPLATES[family][:n_templates]
            for src in items for tgt in items if tgt != src]
    texts = [t.format(src) for t, src, _ in rows]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        batch = tokenize(tok, texts)
    finally:
        tok.padding_side = side
    ids = batch["input_ids"]
    item_pos = torch.tensor([int((ids[i] == item_ids[items.index(src)]).nonzero()[0, 0])
                             for i, (_, src, _) in enumerate(rows)])
    targets = torch.tensor([items.index(tgt) for _, _, tgt in rows])
    sources = torch.tensor([items.index(src) for _, src, _ in rows])
    site = f"blocks.{layer}.hook_resid_post"
    means = torch.stack([fit_acts[[lab == it for lab in fit_labels]].mean(0) for it in items])
    to = [items[t] for t in targets.tolist()]
    pure = Rotate(circle, to=to, scale=1.0, radius=None)  # turn each row's point, keeping its distance
    default = Rotate(circle, to=to, scale=scale)  # the target's point at `scale` x the circle radius
    s = scale or ROTATE_SCALE
    edits = {"no edit": None, "circle x1": pure, "random plane x1 (control)": random_control(pure, seed=seed),
             f"circle x{s:g} radius": default,
             f"random plane x{s:g} radius (control)": random_control(default, seed=seed),
             f"circle probe x{s:g} radius": Rotate(probe, to=to, scale=scale),
             "replace with target mean (control)": Replace(means[targets])}
    results = {}
    for name, edit in edits.items():
        if edit is None:
            top = _top_items(model, batch, item_ids)
        else:
            with intervene(model, {site: edit}, positions=item_pos[:, None]):
                top = _top_items(model, batch, item_ids)
        results[name] = {"success": round(float((top == targets).float().mean()), 4),
                         "kept_source": round(float((top == sources).float().mean()), 4)}
    return {"site": site, "position": "item token", "rows": len(rows),
            "templates": REPEAT_TEMPLATES[family][:n_templates], "edits": results}


def _bar_plot(inter: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(inter["edits"])
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    colours = {"no edit": "#999", "replace with target mean (control)": "#58c"}
    ax.barh(names, [inter["edits"][n]["success"] for n in names],
            color=[colours.get(n, "#c55" if "random" in n else "#2a7") for n in names])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("success: the model's top item is the target")
    ax.set_title(f"circle rotation at {inter['site']}, {inter['rows']} (prompt, target) rows", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(out: Path, res: dict) -> Path:
    circ = res["circle"]
    lines = [f"# interp demo: {res['items_name']} on {res['model']}", "",
             f"Run `{res['command']}` on {res['device']}, {res['seconds']:.0f} s. Figures below are this run's.", "",
             "## 1. The circle (class-mean PCA + circle fit, per layer)", "",
             "The leave-one-class-out error of the class-mean circle assumes evenly spaced items; the circle probe's "
             "(a linear read-out of each item's (cos, sin) from the top 5 principal components) does not.", "",
             "| layer | cyclic order recovered | leave-one-class-out angle error (rad) | circle probe's (rad) "
             "| radius CV | top-2 explained |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {'yes' if r['order_matches'] else 'no'} | {r['loco_angle_error']:.3f} | "
              f"{r['probe_loco_angle_error']:.3f} | {r['radius_cv']:.3f} | {r['top2_explained']:.3f} |" for r in circ]
    lines += ["", "![scores](circle_scores_by_layer.png)", "", f"![circle](circle_layer{res['layer']}.png)", "",
              "## 2. Sparse probes for item tokens (MLP neurons)", "",
              f"{res['probe']['n_examples']} tokens ({res['probe']['n_positive']} item tokens), split by document. "
              "F1 on held-out documents:",
              "", "```", res["probe"]["table"], "```", "",
              f"Best single neuron: {res['probe']['best_k1']}", "", "![f1](probe_f1_vs_k.png)", "",
              "## 3. Rotating the circle changes the item the model repeats", "",
              f"Edited site: `{res['intervention']['site']}` at the item token; metric: the model's top item among "
              f"the {len(res['items'])} at the last token equals the target.", "",
              "| edit | success | kept the source |", "|---|---|---|"]
    lines += [f"| {k} | {v['success']:.3f} | {v['kept_source']:.3f} |" for k, v in res["intervention"]["edits"].items()]
    lines += ["", "![intervention](intervention.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(args) -> int:
    from interp import load_model
    from interp.features import ITEM_SETS, TEMPLATES
    from interp.features.plot import plot_projection

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device=args.device)
    items, templates = ITEM_SETS[args.items], TEMPLATES[args.items]
    n_layers = model.config.num_hidden_layers
    if not 0 <= args.layer < n_layers:
        from interp.errors import InputError

        raise InputError(f"--layer {args.layer} is out of range for a {n_layers}-layer model (0..{n_layers - 1})")
    step = 6 if args.quick else 2
    layers = sorted(set(range(0, n_layers, step)) | {args.layer})
    if args.quick:
        templates = templates[:6]
    _item_token_ids(tok, items)
    print(f"[1/4] capturing {len(items) * len(templates)} prompts at {len(layers)} layers, fitting circles")
    subspaces, circle_rows = find_circles(model, tok, items, templates, layers, out)
    circle, fit_acts, fit_labels, probe = subspaces[args.layer]
    plot_projection(circle, fit_acts, fit_labels, order=items, title=f"layer {args.layer}: {args.items} circle",
                    path=out / f"circle_layer{args.layer}.png")
    print("[2/4] sparse probes for item tokens on MLP neurons")
    probe_layers = layers[:: 2 if not args.quick else 1]
    info, sweep = probe_items(model, tok, items, templates, probe_layers, progress=True,
                              n_docs=40 if args.quick else 120)
    sweep.plot_f1(out / "probe_f1_vs_k.png")
    best = sweep.best(n_neurons=1)
    info.update(table=sweep.table(), best_k1={"site": best["site"], "f1": best["f1"], "neuron": best["neurons"]})
    print(f"[3/4] rotating the circle at layer {args.layer}, with controls")
    inter = intervene_items(model, tok, items, circle, probe, fit_acts, fit_labels, args.layer, args.scale,
                            n_templates=2 if args.quick else 4)
    _bar_plot(inter, out / "intervention.png")
    res = {"model": args.model, "items_name": args.items, "items": items, "layer": args.layer,
           "device": str(next(model.parameters()).device),
           "scale": args.scale, "command": _command(args),
           "circle": circle_rows, "probe": info, "intervention": inter,
           "seconds": time.perf_counter() - t0}
    write_json(out / "results.json", json.loads(json.dumps(res, default=str)))
    report = write_report(out, res)
    print("[4/4] done in {:.0f} s".format(res["seconds"]))
    best_circle = min(circle_rows, key=lambda r: r["loco_angle_error"])
    print(f"  circle: order recovered at {sum(r['order_matches'] for r in circle_rows)}/{len(circle_rows)} layers; "
          f"best leave-one-out angle error {best_circle['loco_angle_error']:.3f} rad "
          f"({math.degrees(best_circle['loco_angle_error']):.0f} deg) at layer {best_circle['layer']}")
    for k, v in inter["edits"].items():
        print(f"  {k:38s} success {v['success']:.3f}")
    print(f"report: {report.resolve()}")
    return 0
