"""Choose ``Rotate``'s defaults on fit templates only, then measure them once on held-out templates.

The task is the weekday intervention experiment's, for weekdays and for months: prompts make the
embedded model repeat an item ("The meeting is on Friday. Again, the meeting is on" -> " Friday"),
the item's circle is fitted at one layer on the item token of *fit* prompts
(``interp.features.class_mean_subspace``), and ``Rotate(circle, to=target)`` at the item token
should make the model repeat the target instead. A row is (a prompt the model copies correctly, a
target item); ``--targets`` targets per prompt are drawn with a fixed seed.

1. **Selection, fit templates only**: every candidate distance rule (``keep`` = each row's own
   distance times ``scale``, so ``keep x1`` is a pure rotation, the old default; ``circle`` = the
   circle's fitted radius times ``scale``, an absolute position) is scored by cross-validated success
   over folds of fit templates (circle fitted on the other folds), pooled over both families; the
   best pooled score is chosen (ties: the smaller scale).
2. **Held out, measured once**: the chosen rule, with its random control
   (``interp.controls.random_control``: a random plane turned by the same angles, as far out), the old
   default (a pure rotation) with its control, the circle probe's plane
   (``interp.features.circle_probe``) at the chosen rule, and no edit, on prompts from held-out
   templates written apart from the fit ones.

    python experiments/circle_edit_defaults.py --out experiments/results/circle_edit_defaults
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
import weekday_circle_intervention as W  # the sibling script: weekday templates and the logit read-out

from interp import capture, load_model, random_control
from interp.atomic import write_json
from interp.capture import last_token_index, tokenize
from interp.edits import ROTATE_RADIUS, ROTATE_SCALE, Rotate
from interp.features import circle_probe, class_mean_subspace
from interp.intervene import intervene

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTH_FIT = [
    "My birthday is in {x}. Yes, my birthday is in",
    "The trip is planned for {x}. Again, the trip is planned for",
    "The festival takes place in {x}. So the festival takes place in",
    "We moved house in {x}. I repeat, we moved house in",
    "The report is due in {x}. Once more, the report is due in",
    "School starts in {x}. That is right, school starts in",
    "The wedding is in {x}. Remember, the wedding is in",
    "Prices went up in {x}. Indeed, prices went up in",
    "The museum reopens in {x}. Again, the museum reopens in",
    "Her contract ends in {x}. Yes, her contract ends in",
    "The harvest begins in {x}. So the harvest begins in",
    "The race is held in {x}. Once again, the race is held in",
]
MONTH_HELD_OUT = [  # written with MONTH_FIT, before any run; used for nothing but the held-out measurement
    "I was born in {x}. To repeat, I was born in",
    "The party is in {x}. Remember, the party is in",
    "The exam is in {x}. Again: the exam is in",
    "Our lease expires in {x}. I said our lease expires in",
    "The garden blooms in {x}. As always, the garden blooms in",
    "The conference is in {x}. Just to confirm, the conference is in",
    "They got married in {x}. Note that they got married in",
    "The sale ends in {x}. Once more, the sale ends in",
]
FAMILIES = {
    "days": (W.DAYS, [t.replace("{d}", "{x}") for t in W.ALL_FIT], [t.replace("{d}", "{x}") for t in W.HELD_OUT]),
    "months": (MONTHS, MONTH_FIT, MONTH_HELD_OUT),
}
CANDIDATES = [("keep", 1.0), ("keep", 3.0), ("circle", 2.0), ("circle", 3.0), ("circle", 4.0)]


def build(tok, items, templates):
    """Left-padded prompts, their item labels, template ids, the item token's column and the last column."""
    ids = [tok.encode(" " + it, add_special_tokens=False) for it in items]
    if any(len(i) != 1 for i in ids):
        raise SystemExit(f"every item must be one token with a leading space; got {dict(zip(items, ids))}")
    item_ids = [i[0] for i in ids]
    texts = [t.format(x=it) for t in templates for it in items]
    labels = [it for _ in templates for it in items]
    tids = [ti for ti in range(len(templates)) for _ in items]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        batch = tokenize(tok, texts)
    finally:
        tok.padding_side = side
    pos = torch.tensor([int((batch["input_ids"][i] == item_ids[items.index(lab)]).nonzero()[0, 0])
                        for i, lab in enumerate(labels)])
    return {"batch": batch, "labels": labels, "tids": torch.tensor(tids), "pos": pos,
            "last": last_token_index(batch["attention_mask"]), "item_ids": item_ids}


def make_rows(model, data, items, rows_of, n_targets, seed):
    """(prompt copied correctly, target) rows among prompts `rows_of`; `n_targets` seeded targets per prompt."""
    sub = {k: v[rows_of] for k, v in data["batch"].items()}
    top, _ = W.top_days(model, sub, data["item_ids"], data["last"][rows_of])
    rng = random.Random(seed)
    pi, tgt = [], []
    for j, i in enumerate(rows_of.tolist()):
        src = items.index(data["labels"][i])
        if int(top[j]) != src:
            continue
        for t in rng.sample([k for k in range(len(items)) if k != src], n_targets):
            pi.append(i)
            tgt.append(t)
    pi = torch.tensor(pi, dtype=torch.long)
    return {"pi": pi, "tgt": torch.tensor(tgt, dtype=torch.long), "names": [items[t] for t in tgt],
            "batch": {k: v[pi] for k, v in data["batch"].items()}, "last": data["last"][pi],
            "where": [[int(p)] for p in data["pos"][pi]], "copy_accuracy": float(
                (top == torch.tensor([items.index(data["labels"][i]) for i in rows_of.tolist()])).float().mean())}


def success(model, rows, item_ids, edit, site) -> torch.Tensor:
    """Per row: the model's top item among the family is the target (after `edit` at the item token)."""
    if edit is None:
        top, _ = W.top_days(model, rows["batch"], item_ids, rows["last"])
    else:
        with intervene(model, {site: edit}, positions=rows["where"]):
            top, _ = W.top_days(model, rows["batch"], item_ids, rows["last"])
    return (top == rows["tgt"]).float()


def rotate(circle, names, mode, scale):
    return Rotate(circle, to=names, scale=scale, radius=circle.coord_map.radius if mode == "circle" else None)


def select(model, fam, items, data, acts, args, site):
    """Cross-validated success of every candidate on the fit templates (folds of templates)."""
    fold = data["tids"] % args.folds
    hits = {c: [] for c in CANDIDATES}
    for f in range(args.folds):
        train, test = (fold != f).nonzero()[:, 0], (fold == f).nonzero()[:, 0]
        circle = class_mean_subspace(acts[train], [data["labels"][i] for i in train], order=items)
        rows = make_rows(model, data, items, test, args.targets, args.seed + f)
        for c in CANDIDATES:
            hits[c].append(success(model, rows, data["item_ids"], rotate(circle, rows["names"], *c), site))
        print(f"{fam} fold {f + 1}/{args.folds}: {len(rows['pi'])} rows", flush=True)
    return {f"{m} x{s:g}": float(torch.cat(hits[(m, s)]).mean()) for m, s in CANDIDATES}, \
        len(torch.cat(hits[CANDIDATES[0]]))


def held_out(model, fam, items, fit, acts, held, choice, args, site):
    """The chosen rule, the old default and the probe's plane on held-out templates, with random controls."""
    labels = fit["labels"]
    circle = class_mean_subspace(acts, labels, order=items, name=f"{fam} circle")
    probe = circle_probe(acts, labels, order=items, groups=fit["tids"].tolist(), name=f"{fam} probe")
    rows = make_rows(model, held, items, torch.arange(len(held["labels"])), args.targets, args.seed + 100)
    ids = held["item_ids"]
    chosen = rotate(circle, rows["names"], *choice)
    old = Rotate(circle, to=rows["names"], scale=1.0, radius=None)
    out = {"rows": len(rows["pi"]), "copy_accuracy": rows["copy_accuracy"],
           "no_edit": float(success(model, rows, ids, None, site).mean()),
           "chosen": float(success(model, rows, ids, chosen, site).mean()),
           "chosen_random": [float(success(model, rows, ids, random_control(chosen, seed=s), site).mean())
                             for s in range(args.random_seeds)],
           "pure_rotation": float(success(model, rows, ids, old, site).mean()),
           "pure_rotation_random": float(success(model, rows, ids, random_control(old, seed=0), site).mean()),
           "probe_chosen": float(success(model, rows, ids, rotate(probe, rows["names"], *choice), site).mean()),
           "circle": {k: circle.meta[k] for k in ("order_matches", "loco_angle_error", "radius")},
           "probe": {k: probe.meta[k] for k in ("order_matches", "loco_angle_error", "loto_angle_error")}}
    out["chosen_random_mean"] = sum(out["chosen_random"]) / len(out["chosen_random"])
    print(f"{fam} held out ({out['rows']} rows): chosen {out['chosen']:.3f} (random {out['chosen_random_mean']:.3f}), "
          f"pure rotation {out['pure_rotation']:.3f} (random {out['pure_rotation_random']:.3f}), "
          f"probe plane {out['probe_chosen']:.3f}, no edit {out['no_edit']:.3f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/circle_edit_defaults")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=10, help="the edited layer (hook_resid_post); the demo's")
    ap.add_argument("--families", default="days,months")
    ap.add_argument("--folds", type=int, default=4, help="folds of fit templates for the selection")
    ap.add_argument("--targets", type=int, default=2, help="target items per prompt (seeded)")
    ap.add_argument("--random-seeds", type=int, default=2)
    ap.add_argument("--fit-templates", type=int, default=0, help="the first N fit templates (0: all)")
    ap.add_argument("--held-out-templates", type=int, default=0, help="the first N held-out templates (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fams = [f for f in args.families.split(",") if f]
    if not fams or any(f not in FAMILIES for f in fams):
        ap.error(f"--families: choose from {sorted(FAMILIES)}")
    t0 = time.time()
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device="cpu")
    site = f"blocks.{args.layer}.hook_resid_post"
    data, selection = {}, {}
    for fam in fams:
        items, fit_t, held_t = FAMILIES[fam]
        fit = build(tok, items, fit_t[: args.fit_templates or None])
        held = build(tok, items, held_t[: args.held_out_templates or None])
        acts = capture(model, fit["batch"], site, positions=fit["pos"][:, None])[site][:, 0].float()
        data[fam] = (items, fit, held, acts)
        scores, n = select(model, fam, items, fit, acts, args, site)
        selection[fam] = {"rows": n, "success": scores}
        print(f"{fam} selection (fit templates, CV): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    pooled = {f"{m} x{s:g}": sum(selection[f]["success"][f"{m} x{s:g}"] for f in fams) / len(fams)
              for m, s in CANDIDATES}
    choice = max(CANDIDATES, key=lambda c: (round(pooled[f"{c[0]} x{c[1]:g}"], 6), -c[1]))
    name = f"{choice[0]} x{choice[1]:g}"
    print(f"chosen on fit templates: {name} (pooled CV success {pooled[name]:.3f})")
    results = {}
    for fam in fams:
        items, fit, held, acts = data[fam]
        results[fam] = held_out(model, fam, items, fit, acts, held, choice, args, site)
    res = {"experiment": "circle_edit_defaults",
           "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv or sys.argv[1:])),
           "model": args.model, "site": site, "folds": args.folds, "targets_per_prompt": args.targets,
           "candidates": [f"{m} x{s:g}" for m, s in CANDIDATES], "selection": selection, "pooled": pooled,
           "chosen": {"mode": choice[0], "scale": choice[1]},
           "library_default": {"scale": ROTATE_SCALE, "radius": ROTATE_RADIUS},
           "library_default_matches": choice == ("circle" if ROTATE_RADIUS == "circle" else "keep", ROTATE_SCALE),
           "templates": {f: {"fit": FAMILIES[f][1][: args.fit_templates or None],
                             "held_out": FAMILIES[f][2][: args.held_out_templates or None]} for f in fams},
           "held_out": results, "seconds": round(time.time() - t0, 1),
           "note": "CPU run. Success = the model's top item among the family (logits at the last token) is the "
                   "target. keep xs = Rotate(circle, to=target, scale=s, radius=None); circle xs = Rotate(circle, "
                   "to=target, scale=s, radius=the circle's fitted radius). The choice uses fit templates only; the "
                   "held-out figures were measured once, after it."}
    write_json(Path(args.out) / "results.json", res, indent=2)
    print(f"library default matches the choice: {res['library_default_matches']}; {res['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
