"""Rotate a weekday along its fitted circle and see whether the model repeats the new day.

Prompts make the embedded model repeat a weekday ("I will see you on Monday. To repeat, I will
see you on" -> " Monday"). At one layer we fit the weekday circle (class-mean PCA + circle fit,
``interp.features.class_mean_subspace``) on prompts from *fit* templates, then, on prompts from
disjoint *eval* templates, rotate the day's circle coordinates to each of the six other days and
count how often the model's top day among the seven becomes the target.

The circle edit is ``Rotate(circle, to=target, scale=s)``: the day token's point in the circle
plane is turned to the target's fitted angle and its distance from the circle's center multiplied
by ``s`` (1 = a pure rotation). **The layer and ``s`` are chosen on the fit templates only**
(cross-validation over fit templates: fit the circle on the other folds' templates, edit the
held-out fold's prompts, pool the folds); the chosen configuration is then measured once on the
held-out templates. The held-out set has four parts, reported separately: ``EVAL_TEMPLATES`` (an
earlier version picked a scale on them), ``CONFIRM_TEMPLATES`` and ``CONFIRM2_TEMPLATES`` (each
written before a run and first used for its final check; runs 1 and 2 then showed them), and
``CONFIRM3_TEMPLATES`` (written before run 3, never shown to any choice).

Run 3 (the committed results) differs from run 2 in what was fixed before it, on fit templates
only: 24 fit templates instead of 6 (``MORE_FIT_TEMPLATES``), 6-fold instead of leave-one-out
selection, and a candidate set (single layers 2-14, layer groups starting at layer 2 or 4) chosen
from a sweep on those 24 fit templates. It also reports, at the chosen layers, how much of the day
identity the circle plane carries: the whole rank-6 span of the seven day means set to the
target's coordinates (``day_subspace``; ``SetCoords``) next to a random rank-6 control.

Every (layer, position, edit) is also measured on the held-out prompts, in the same run, with
three controls:
* ``none``    -- no edit (how often the target wins anyway);
* ``random``  -- a random rank-2 subspace rotated by the same per-prompt angle and scaled by the same ``s``;
* ``replace`` -- the whole activation replaced by the target day's mean activation (fit prompts).

Positions: ``day`` (the earlier mention of the day) or ``last`` (the final token; its own circle
is fitted on final-token activations). Layer groups edit one layer or several at once.

Planes (``--planes``): ``class_mean`` (class-mean PCA), ``probe`` (the circle probe,
``interp.features.circle_probe``) and ``das`` (``interp.das.fit_das_circle``: a plane per layer of the
group, trained jointly with the circle edit itself as the intervention -- the day token's point put at a
random other day's angle at ``--das-scales`` x the day means' circle radius in the plane -- and the
cross-entropy of that day among the seven at the last token as the objective; inside the day means'
span or the whole residual stream, ``--das-within``). In the selection DAS planes are trained on the
other folds' templates only; each plane's own best candidate is then refitted on all fit templates and
measured held out with its random controls (a random plane anywhere, and one inside the day means' span).

    python experiments/weekday_circle_intervention.py --out experiments/results/weekday_intervention \
        --planes class_mean,probe,das --select-layers "" --select-groups 2,4,6,8,10 4,6,8,10,12,14 \
        --group-scales 3,4 --targets-per-prompt 2 --random-seeds 2 --das-within class_means,full
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

from interp import capture, load_model, random_control
from interp.atomic import write_json
from interp.capture import last_token_index, tokenize
from interp.das import fit_das_circle
from interp.edits import Replace, Rotate, SetCoords
from interp.features import circle_probe, class_mean_subspace
from interp.features.supervised import class_means
from interp.intervene import intervene

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIT_TEMPLATES = [
    "Today is {d}. Yes, today is",
    "The meeting is on {d}. Again, the meeting is on",
    "My birthday falls on {d}. I repeat, my birthday falls on",
    "The shop opens on {d}. So the shop opens on",
    "We leave on {d}. That is right, we leave on",
    "The exam is on {d}. Once more, the exam is on",
]
MORE_FIT_TEMPLATES = [  # run 3: the circle was fitted on 6 prompts per day; these 18 give it 24
    "The store is closed on {d}. Yes, the store is closed on",
    "I was born on a {d}. Indeed, I was born on a",
    "The movie comes out on {d}. Again, the movie comes out on",
    "We go swimming on {d}. So we go swimming on",
    "The bus runs late on {d}. I repeat, the bus runs late on",
    "The market opens on {d}. Again, the market opens on",
    "Her lesson is on {d}. Yes, her lesson is on",
    "The wedding is on {d}. Remember, the wedding is on",
    "They arrive on {d}. Once more, they arrive on",
    "The test was on {d}. So the test was on",
    "The gym is busy on {d}. Again, the gym is busy on",
    "His interview is on {d}. Yes, his interview is on",
    "The festival starts on {d}. I repeat, the festival starts on",
    "Rent is due on {d}. Again, rent is due on",
    "The cleaners come on {d}. So the cleaners come on",
    "Our flight is on {d}. That is right, our flight is on",
    "The museum is free on {d}. Yes, the museum is free on",
    "The team meets on {d}. Once again, the team meets on",
]
EVAL_TEMPLATES = [
    "I will see you on {d}. To repeat, I will see you on",
    "The party is on {d}. Remember, the party is on",
    "Her flight lands on {d}. Her flight lands on",
    "The report is due on {d}. Again: the report is due on",
]
CONFIRM_TEMPLATES = [  # held out from every choice, including the earlier sessions' scale sweep
    "The concert is on {d}. Do not forget, the concert is on",
    "Our next class is on {d}. Once again, our next class is on",
    "The package arrives on {d}. Yes, the package arrives on",
    "Grandma visits on {d}. I said grandma visits on",
    "The game was moved to {d}. So the game was moved to",
    "Payday is {d}. Again, payday is",
]
CONFIRM2_TEMPLATES = [  # written before the layer-group edits were tried; used for nothing but the final check
    "The dentist appointment is on {d}. Just to confirm, the dentist appointment is on",
    "We play football on {d}. Every week we play football on",
    "The library closes early on {d}. Note that the library closes early on",
    "Dad cooks dinner on {d}. As usual, dad cooks dinner on",
    "The train leaves on {d}. Remember that the train leaves on",
    "My shift starts on {d}. Again, my shift starts on",
]
ALL_FIT = FIT_TEMPLATES + MORE_FIT_TEMPLATES
CONFIRM3_TEMPLATES = [  # written with MORE_FIT_TEMPLATES, before run 3; used for nothing but its final check
    "The doctor can see you on {d}. Again, the doctor can see you on",
    "The new episode airs on {d}. Yes, the new episode airs on",
    "Trash is collected on {d}. Remember, trash is collected on",
    "The bakery sells bread on {d}. So the bakery sells bread on",
    "My sister calls me on {d}. As always, my sister calls me on",
    "The choir practices on {d}. Once more, the choir practices on",
    "The office is quiet on {d}. Indeed, the office is quiet on",
    "The ferry sails on {d}. I repeat, the ferry sails on",
]
HELD_OUT = EVAL_TEMPLATES + CONFIRM_TEMPLATES + CONFIRM2_TEMPLATES + CONFIRM3_TEMPLATES
PARTS = {"eval": EVAL_TEMPLATES, "confirm": CONFIRM_TEMPLATES, "confirm2": CONFIRM2_TEMPLATES,
         "confirm3": CONFIRM3_TEMPLATES}


def build(tok, templates: list[str]):
    """Tokenized prompts, their day labels, the column of the day mention and of the last token."""
    day_ids = [tok.encode(" " + d, add_special_tokens=False)[0] for d in DAYS]
    texts = [t.format(d=d) for t in templates for d in DAYS]
    labels = [d for _ in templates for d in DAYS]
    side, tok.padding_side = tok.padding_side, "left"  # left padding: the last token is the last column
    try:
        batch = tokenize(tok, texts)
    finally:
        tok.padding_side = side
    ids = batch["input_ids"]
    day_pos = torch.tensor([int((ids[i] == day_ids[DAYS.index(lab)]).nonzero()[0, 0]) for i, lab in enumerate(labels)])
    return batch, labels, day_pos, last_token_index(batch["attention_mask"]), day_ids


@torch.no_grad()
def top_days(model, batch, day_ids, last) -> torch.Tensor:
    if bool((last == batch["input_ids"].shape[1] - 1).all()):
        rows = model(**batch, logits_to_keep=1).logits[:, -1].float()
    else:
        logits = model(**batch).logits
        rows = logits[torch.arange(len(last)), last.to(logits.device)].float()
    return torch.stack([rows[:, day_ids].argmax(-1).cpu(), torch.isin(rows.argmax(-1).cpu(), torch.tensor(day_ids))])


def prompt_bootstrap_ci(hits: torch.Tensor, prompt: torch.Tensor, mask: torch.Tensor | None = None,
                        n_boot: int = 4000, seed: int = 0) -> list[float]:
    """95 % interval of the success rate, resampling prompts (each prompt's six target rows stay together,
    since they share the prompt's activations)."""
    if mask is not None:
        hits, prompt = hits[mask], prompt[mask]
    ids, inv = torch.unique(prompt, return_inverse=True)
    sums = torch.zeros(len(ids)).index_add_(0, inv, hits.float())
    counts = torch.zeros(len(ids)).index_add_(0, inv, torch.ones(len(hits)))
    draw = torch.randint(len(ids), (n_boot, len(ids)), generator=torch.Generator().manual_seed(seed))
    rates = sums[draw].sum(1) / counts[draw].sum(1)
    return [round(float(q), 4) for q in torch.quantile(rates, torch.tensor([0.025, 0.975]))]


def make_rows(b, labels, day_pos, last, base_top, max_rows=0, targets=0, seed=0):
    """One row per (prompt the model copies correctly, target day != the prompt's day); with `targets`,
    that many targets per prompt, drawn with `seed` (0: all six)."""
    src_idx = torch.tensor([DAYS.index(d) for d in labels])
    copied = (base_top == src_idx).nonzero()[:, 0]
    rng = random.Random(seed)
    rows = [(int(i), t) for i in copied
            for t in (sorted(rng.sample([k for k in range(7) if k != int(src_idx[i])], targets)) if targets
                      else [k for k in range(7) if k != int(src_idx[i])])][: max_rows or None]
    pi = torch.tensor([r[0] for r in rows], dtype=torch.long)
    tgt = torch.tensor([r[1] for r in rows], dtype=torch.long)
    return {"pi": pi, "tgt": tgt, "src": src_idx[pi], "batch": {k: v[pi] for k, v in b.items()},
            "last": last[pi], "where": {"day": [[int(p)] for p in day_pos[pi]], "last": "last"},
            "tgt_names": [DAYS[t] for t in tgt]}


def fit_day_circle(x: torch.Tensor, labels: list[str], name: str, plane: str = "class_mean"):
    """The circle (class-mean PCA, rank 2, or the circle probe's plane), the class means and the fitted
    angle of every day."""
    if plane == "probe":
        sub = circle_probe(x, labels, order=DAYS, name=name)
    else:
        sub = class_mean_subspace(x, labels, rank=2, circle=True, order=DAYS, name=name)
    means = class_means(x, labels, DAYS).float()
    ang = torch.tensor([sub.coord_map.angles[d] for d in DAYS])
    return sub, means, ang


def circle_edit(circles: dict, layers, mode: str, scale: float, to, sites: dict) -> dict:
    """The circle edit at every layer of ``layers``. ``mode="scale"``: turn to the target's angle and
    multiply the distance from the center by ``scale`` (compounds when stacked over layers);
    ``mode="radius"``: put the point on the target's angle at ``scale`` x that layer's circle radius
    (an absolute position, so stacking over layers does not compound)."""
    out = {}
    for layer in layers:
        sub = circles[layer]
        radius = sub.coord_map.radius if mode == "radius" else None
        out[sites[layer]] = Rotate(sub, to=to, scale=scale, radius=radius)
    return out


def candidates(args) -> list[dict]:
    """Every configuration the selection compares (fixed before any held-out prompt is seen). DAS planes
    are trained for each layer set (single layers and groups) at every ``--das-scales`` radius and
    ``--das-within`` span, and scored at every ``--group-scales`` radius (the edit is absolute-radius)."""
    out = [{"layers": [layer], "mode": "scale", "scale": s} for layer in args.select_layers for s in args.scales]
    out += [{"layers": g, "mode": "radius", "scale": s} for g in args.select_groups for s in args.group_scales]
    cands = [{**c, "plane": p} for p in args.planes if p != "das" for c in out]
    if "das" in args.planes:
        cands += [{"layers": g, "mode": "radius", "scale": s, "plane": "das", "das_scale": ts, "das_within": w}
                  for g in [[layer] for layer in args.select_layers] + args.select_groups
                  for ts in args.das_scales for w in args.das_within for s in args.group_scales]
    return cands


def das_key(c: dict) -> tuple:
    """What a DAS plane is trained for: the layer set, the training radius and the span."""
    return tuple(c["layers"]), c["das_scale"], c["das_within"]


def config(c: dict) -> dict:
    """The keys that name a candidate (its plane's training settings included)."""
    return {k: c[k] for k in ("layers", "mode", "scale", "plane", "das_scale", "das_within") if k in c}


def fit_das_planes(model, b, labels, day_pos, acts_by_layer: dict, copied, key: tuple, day_ids, args, seed: int,
                   name: str) -> dict:
    """DAS circle planes (``interp.das.fit_das_circle``) trained jointly at the layers of `key` on these
    prompts: the circle edit to a random other day at the day token, cross-entropy of the target day among
    the seven at the last token; training bases are the prompts the model copies (`copied`)."""
    layers, scale, within = key
    sites = {layer: f"blocks.{layer}.hook_resid_post" for layer in layers}
    out = fit_das_circle(model, list(sites.values()), b, labels, day_ids, order=DAYS, positions=day_pos,
                         acts={sites[L]: acts_by_layer[L] for L in layers}, train_rows=copied, scale=scale,
                         within=None if within == "full" else within, steps=args.das_steps, lr=args.das_lr,
                         batch_size=args.das_batch, seed=seed, name=name)
    return {layer: out[sites[layer]] for layer in layers}


def select_on_fit(model, fit, fit_acts, sites, args, day_ids, base_top) -> dict:
    """Cross-validated success (``args.folds`` folds of fit templates; 0 = leave one template out) of
    every candidate circle edit at the day token (single layers with a radius multiplier; layer groups
    with an absolute radius; DAS planes trained on the other folds); the choice is the best pooled success
    (ties: fewer layers, then the smaller scale), overall and per plane. Nothing here sees a held-out
    template."""
    b, labels, day_pos, last = fit
    src_idx = torch.tensor([DAYS.index(d) for d in labels])
    n_t = len(labels) // 7
    n_folds = min(args.folds or n_t, n_t)
    template = torch.arange(len(labels)) // 7
    cands = candidates(args)
    layers = sorted({layer for c in cands for layer in c["layers"]})
    keys = list(dict.fromkeys(das_key(c) for c in cands if c["plane"] == "das"))
    table: dict[int, list] = {i: [] for i in range(len(cands))}
    das_seconds, das_losses = 0.0, {}
    fold = template % n_folds  # templates dealt round-robin into folds (one template a fold = leave-one-out)
    for f in range(n_folds):
        train = (fold != f).nonzero()[:, 0]
        test = (fold == f).nonzero()[:, 0]
        lab_tr = [labels[i] for i in train]
        circles = {(layer, p): fit_day_circle(fit_acts[sites[layer]][train, 0].float(), lab_tr, f"L{layer}-fold{f}",
                                              p)[0] for layer in layers for p in args.planes if p != "das"}
        das = {}
        for key in keys:
            t0 = time.time()
            das[key] = fit_das_planes(model, {k: v[train] for k, v in b.items()}, lab_tr, day_pos[train],
                                      {L: fit_acts[sites[L]][train, 0].float() for L in key[0]},
                                      base_top[train] == src_idx[train], key, day_ids, args, args.seed + f,
                                      f"das-fold{f}")
            das_seconds += time.time() - t0
            das_losses[f"{key}/fold{f}"] = das[key][key[0][0]].meta["losses"]
            print(f"fold {f + 1}/{n_folds}: DAS {key} trained ({time.time() - t0:.0f} s; loss "
                  f"{das_losses[f'{key}/fold{f}'][0]:.3f} -> {das_losses[f'{key}/fold{f}'][-1]:.3f})", flush=True)
        sub_b = {k: v[test] for k, v in b.items()}
        rows = make_rows(sub_b, [labels[i] for i in test], day_pos[test], last[test], base_top[test],
                         targets=args.targets_per_prompt, seed=args.seed + f)
        if len(rows["tgt"]) == 0:
            continue
        for i, c in enumerate(cands):
            plane = das[das_key(c)] if c["plane"] == "das" else {
                layer: circles[layer, c["plane"]] for layer in c["layers"]}
            edit = circle_edit(plane, c["layers"], c["mode"], c["scale"], rows["tgt_names"], sites)
            with intervene(model, edit, positions=rows["where"]["day"]):
                top, _ = top_days(model, rows["batch"], day_ids, rows["last"])
            table[i].append((float((top == rows["tgt"]).float().sum()), len(top)))
    scores = [{**c, "success": sum(s for s, _ in table[i]) / max(sum(n for _, n in table[i]), 1),
               "per_fold": [round(s / n, 4) for s, n in table[i]]} for i, c in enumerate(cands)]
    for r in scores:
        extra = f" (DAS trained x{r['das_scale']:g}, {r['das_within']})" if r["plane"] == "das" else ""
        print(f"select (fit templates, CV) {r['plane']:10s} layers {','.join(map(str, r['layers'])):18s} "
              f"{r['mode']:6s} x{r['scale']:<4g} success {r['success']:.3f}{extra}", flush=True)

    def best_of(rows):
        return max(rows, key=lambda r: (round(r["success"], 6), -len(r["layers"]), -r["scale"]))

    best = best_of(scores)
    per_plane = {p: best_of([r for r in scores if r["plane"] == p]) for p in args.planes}
    return {"candidates": scores, "chosen": config(best), "chosen_fit_success": best["success"],
            "chosen_per_plane": {p: {**config(r), "fit_success": r["success"]} for p, r in per_plane.items()},
            "fit_copy_accuracy": float((base_top == src_idx).float().mean()),
            "das_training_seconds": round(das_seconds, 1), "das_losses": das_losses}


def run(args) -> dict:
    t0 = time.time()
    model, tok = load_model(args.model, device=args.device)
    fit_b, fit_lab, fit_day, fit_last, day_ids = build(tok, ALL_FIT[: args.fit_templates])
    held = HELD_OUT[: args.eval_templates]
    ev_b, ev_lab, ev_day, ev_last, _ = build(tok, held)
    src_idx = torch.tensor([DAYS.index(d) for d in ev_lab])
    base_top, _ = top_days(model, ev_b, day_ids, ev_last)
    R = make_rows(ev_b, ev_lab, ev_day, ev_last, base_top, args.max_rows, args.targets_per_prompt, args.seed + 100)
    pi, tgt, src, batch, last, where, tgt_names = (R[k] for k in ("pi", "tgt", "src", "batch", "last", "where",
                                                                  "tgt_names"))
    row_set = [next(k for k, ts in PARTS.items() if held[int(i) // 7] in ts) for i in pi]
    part_mask = {p: m for p in PARTS if (m := torch.tensor([r == p for r in row_set], dtype=torch.bool)).any()}

    def measure(edits: dict, pos) -> dict:
        with intervene(model, edits, positions=pos):
            top, is_day = top_days(model, batch, day_ids, last)
        hit = (top == tgt).float()
        # a day next to the target on the week's cycle, other than the prompt's own day
        near = (((top - tgt) % 7 == 1) | ((tgt - top) % 7 == 1)) & (top != src)
        out = {"_hits": hit, "success": float(hit.mean()), "source_kept": float((top == src).float().mean()),
               "next_to_target": float(near.float().mean()), "top_token_is_a_day": float(is_day.float().mean())}
        for part, m in part_mask.items():
            out[f"success_{part}"] = float(hit[m].mean())
        return out

    all_layers = sorted({layer for group in args.layers for layer in group} | set(args.select_layers)
                        | {layer for g in args.select_groups for layer in g})
    sites = {layer: f"blocks.{layer}.hook_resid_post" for layer in all_layers}
    none = {k: v for k, v in measure({sites[all_layers[0]]: []}, None).items()  # an empty edit list: no edit
            if not k.startswith("_")}
    fit_pos = torch.stack([fit_day, fit_last], 1)
    acts = capture(model, fit_b, list(sites.values()), positions=fit_pos)
    fit_src = torch.tensor([DAYS.index(d) for d in fit_lab])
    fit_top, _ = top_days(model, fit_b, day_ids, fit_last)
    selection = select_on_fit(model, (fit_b, fit_lab, fit_day, fit_last), acts, sites, args, day_ids, fit_top) \
        if candidates(args) else None
    fitted, circles = {}, {}
    needed = set(args.positions) | {"day"}  # the headline edits the day token
    for layer, site in sites.items():
        for j, pname in enumerate(("day", "last")):
            if pname not in needed:
                continue
            sub, means, ang = fit_day_circle(acts[site][:, j].float(), fit_lab, f"L{layer}-{pname}")
            fitted[layer, pname] = (sub, means, ang[tgt] - ang[src])
            circles[f"{layer}/{pname}"] = {k: sub.meta.get(k) for k in (
                "order_matches", "cyclic_order", "explained_variance", "radius_cv", "loco_angle_error")}
    probes = {}
    if "probe" in args.planes:  # the circle probe's plane at the day token (Engels et al.)
        for layer, site in sites.items():
            probes[layer] = fit_day_circle(acts[site][:, 0].float(), fit_lab, f"L{layer}-probe", "probe")[0]
            circles[f"{layer}/day/probe"] = {k: probes[layer].meta.get(k) for k in (
                "order_matches", "cyclic_order", "loco_angle_error", "r2")}
    results = []
    row_hits: dict[int, torch.Tensor] = {}

    def record(group, pname, edit, scale, runs, mode=None, plane=None):
        row = {"layers": group, "position": pname, "edit": edit, "scale": scale,
               "mode": (mode or "scale") if edit != "replace" else None, "plane": plane,
               **{k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if not k.startswith("_")}}
        row_hits[id(row)] = torch.stack([r["_hits"] for r in runs]).mean(0)  # per row, averaged over seeds
        if len(runs) > 1:
            row["success_per_seed"] = [r["success"] for r in runs]
        results.append(row)
        print(f"layers {','.join(map(str, group)):18s} {pname:4s} {edit:7s} {plane or '':10s} {row['mode'] or '':6s} "
              f"x{scale or 1:<4g} success {row['success']:.3f} source_kept {row['source_kept']:.3f}", flush=True)
        return row

    def measure_group(group, pname, scale, mode="scale", plane="class_mean", planes=None, span_control=False):
        """The circle edit at `group`, its random control (a random plane at each layer, turned by the same
        per-row angle and put as far out) and, with `span_control`, the same control drawn inside the span of
        the seven day means at each layer. `planes`: {layer: Subspace} (default: the class-mean or probe
        circle fitted on all fit prompts)."""
        circles_here = planes or {L: probes[L] if plane == "probe" else fitted[L, pname][0] for L in group}
        edits = circle_edit(circles_here, group, mode, scale, tgt_names, sites)
        c = record(group, pname, "circle", scale, [measure(edits, where[pname])], mode, plane)
        runs = [measure({sites[L]: random_control(edits[sites[L]], seed=1000 * L + seed) for L in group}, where[pname])
                for seed in range(args.random_seeds)]
        r = record(group, pname, "random", scale, runs, mode, plane)
        if not span_control:
            return c, r, None
        runs = [measure({sites[L]: random_control(edits[sites[L]], seed=1000 * L + seed, within=day_span(L))
                         for L in group}, where[pname]) for seed in range(args.random_seeds)]
        return c, r, record(group, pname, "random_day_span", scale, runs, mode, plane)

    def day_span(layer):
        """The span of the seven day means (minus their mean) at the day token, fit prompts."""
        means = fitted[layer, "day"][1]
        return means - means.mean(0)

    for group in args.layers:  # single layers: radius multipliers (--scales); groups: absolute radius (--group-scales)
        for pname in args.positions:
            if pname != "day":
                measure_group(group, pname, 1.0)
            elif len(group) == 1:
                for scale in args.scales:
                    measure_group(group, pname, scale)
            else:
                for scale in args.group_scales:
                    measure_group(group, pname, scale, "radius")
            replace = {sites[L]: Replace(fitted[L, pname][1][tgt]) for L in group}
            record(group, pname, "replace", None, [measure(replace, where[pname])])
    headline = None
    if selection is not None:
        ch = selection["chosen"]
        def plane_report(plane: str, label: str, cp: dict) -> dict:
            """One plane at its fit-template choice `cp`, refitted on all fit prompts, measured held out with
            its controls; for a class-mean or probe plane and for DAS: the plane's day order and where it lies
            (principal cosines with the class-mean plane, share of its basis in the day means' span)."""
            t0 = time.time()
            if plane == "das":
                planes = fit_das_planes(model, fit_b, fit_lab, fit_day, {L: acts[sites[L]][:, 0].float()
                                                                        for L in cp["layers"]},
                                        fit_top == fit_src, das_key(cp), day_ids, args, args.seed, "das")
                for L in cp["layers"]:
                    planes[L].save(Path(args.out) / f"das_planes_{cp['das_within']}" / sites[L])
            else:
                planes = {L: probes[L] if plane == "probe" else fitted[L, "day"][0] for L in cp["layers"]}
            fit_seconds = round(time.time() - t0, 1)
            where_planes = {}
            for L in cp["layers"]:
                b = planes[L].basis.double()
                means = fitted[L, "day"][1].double()
                span = torch.linalg.svd(means - means.mean(0), full_matrices=False)[2][:6]
                where_planes[L] = {
                    "order_matches": planes[L].meta.get("order_matches"), "cyclic_order": planes[L].meta.get(
                        "cyclic_order"), "radius": round(float(planes[L].coord_map.radius), 4),
                    "cos_with_class_mean_plane": [round(float(v), 4) for v in torch.linalg.svdvals(
                        b @ fitted[L, "day"][0].basis.double().T)],
                    "share_in_day_span": round(float((b @ span.T).pow(2).sum() / len(b)), 4)}
            c, r, rs = measure_group(cp["layers"], "day", cp["scale"], cp["mode"], label, planes, span_control=True)
            out = {"chosen_on_fit_templates": cp, "circle": c, "random": r, "random_day_span": rs,
                   "met": c["success"] >= args.aim and r["success"] <= 0.15, "planes": where_planes,
                   "ci95_by_prompt_bootstrap": {
                       name: {part: prompt_bootstrap_ci(row_hits[id(row)], pi, part_mask.get(part))
                              for part in ["all", *part_mask]}
                       for name, row in (("circle", c), ("random", r), ("random_day_span", rs))}}
            if plane == "das":
                out["das_fit"] = {"seconds": fit_seconds, "losses": planes[cp["layers"][0]].meta["losses"]}
            return out

        # every plane at the configuration its own fit-template scores chose, refitted on all fit prompts
        per_plane = {p: plane_report(p, p, cp) for p, cp in selection["chosen_per_plane"].items()}
        # with several DAS spans, each other span at its own best fit-template candidate too (reported only)
        das_other_spans = {}
        for w in (args.das_within if "das" in args.planes else []):
            if w != selection["chosen_per_plane"]["das"]["das_within"]:
                mine = [cand for cand in selection["candidates"] if cand["plane"] == "das" and cand["das_within"] == w]
                cw = max(mine, key=lambda r: (round(r["success"], 6), -len(r["layers"]), -r["scale"]))
                das_other_spans[w] = plane_report("das", f"das_{w}", {**config(cw), "fit_success": cw["success"]})
        c, r = per_plane[ch["plane"]]["circle"], per_plane[ch["plane"]]["random"]
        replace = {sites[L]: Replace(fitted[L, "day"][1][tgt]) for L in ch["layers"]}
        rep = record(ch["layers"], "day", "replace", None, [measure(replace, where["day"])])
        # How much of the day's identity the circle plane carries: the same layers, with the whole rank-6
        # span of the seven day means set to the target's mean coordinates (and a random rank-6 control).
        day_sub = {L: class_mean_subspace(acts[sites[L]][:, 0].float(), fit_lab, rank=6, circle=False,
                                          order=DAYS, name=f"L{L}-days") for L in ch["layers"]}
        full = record(ch["layers"], "day", "day_subspace", None, [measure(
            {sites[L]: SetCoords(day_sub[L], value=tgt_names) for L in ch["layers"]}, where["day"])], "set")
        rand6 = record(ch["layers"], "day", "random_rank6", None, [measure(  # moved as far, in a random rank-6 subspace
            {sites[L]: random_control(SetCoords(day_sub[L], value=tgt_names), seed=1000 * L + seed)
             for L in ch["layers"]}, where["day"]) for seed in range(args.random_seeds)], "set")
        parts = list(part_mask)
        aim = args.aim
        headline = {"chosen_on_fit_templates": ch, "circle": c, "random": r,
                    "replace": rep, "day_subspace_rank6": full, "random_rank6": rand6,
                    "none": none, "target": {"circle_success_min": aim, "random_success_max": 0.15},
                    "met": c["success"] >= aim and r["success"] <= 0.15,
                    "met_per_part": {p: c[f"success_{p}"] >= aim and r[f"success_{p}"] <= 0.15 for p in parts},
                    "per_plane": per_plane, "das_other_spans": das_other_spans,
                    "ci95_by_prompt_bootstrap": {
                        **per_plane[ch["plane"]]["ci95_by_prompt_bootstrap"],
                        "day_subspace_rank6": {part: prompt_bootstrap_ci(row_hits[id(full)], pi, part_mask.get(part))
                                               for part in ["all", *parts]}}}
    circle_rows = [r for r in results if r["edit"] == "circle"]
    best = max(circle_rows, key=lambda r: r["success"])
    rand_at_best = next(r for r in results if r["edit"] == "random" and r["layers"] == best["layers"]
                        and r["position"] == best["position"] and r["scale"] == best["scale"]
                        and r["mode"] == best["mode"] and r["plane"] == best["plane"])
    return {
        "experiment": "weekday_circle_intervention",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "model": args.model, "fit_templates": ALL_FIT[: args.fit_templates],
        **{f"{p}_templates": [t for t in held if t in ts] for p, ts in PARTS.items()},
        "base_copy_accuracy": float((base_top == src_idx).float().mean()), "n_eval_prompts": len(ev_lab),
        "copy_accuracy_per_part": {p: float((base_top == src_idx)[[held[i // 7] in ts for i in range(len(ev_lab))]]
                                            .float().mean()) for p, ts in PARTS.items()
                                   if any(t in ts for t in held)},
        "n_rows": len(tgt), **{f"n_rows_{p}": row_set.count(p) for p in PARTS},
        "random_seeds": args.random_seeds, "control_none": none, "circles": circles,
        "selection": selection, "headline": headline, "results": results,
        "best_circle_after_the_fact": best, "random_at_best": rand_at_best,
        "seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "note": "CPU run. Success = the model's top day among the seven (logits at the last token) equals the "
                "target day; rows are (held-out prompt the model copies correctly, target day != source day). "
                "circle, mode scale = Rotate(fitted circle, to=target, scale=s): the point is turned to the "
                "target's fitted angle and its distance from the circle's center multiplied by s; mode radius = "
                "Rotate(..., radius=R, scale=s) at every layer of the group: the point is put at the target's angle "
                "at s x that layer's circle radius R; random = a random rank-2 plane turned by the same per-row "
                "angle, same s (and same R in radius mode); replace = whole activation set to the target day's "
                "mean (fit prompts). The headline configuration is chosen on the fit templates only "
                "(cross-validated over fit templates); best_circle_after_the_fact is the best sweep row on the "
                "held-out prompts and is not a held-out result.",
    }


def plot(res: dict, path: Path) -> None:
    """Left: the selection (cross-validated fit-template success against scale, one line per layer or
    layer group). Right: the chosen configuration on the held-out prompts, per template set, with the
    controls."""
    from matplotlib.figure import Figure

    sel, head = res["selection"], res["headline"]
    aim = head["target"]["circle_success_min"] if head else 0.7
    per_plane = (head or {}).get("per_plane") or {}
    fig = Figure(figsize=(16 if per_plane else 11, 4))
    axes = fig.subplots(1, 3 if per_plane else 2)
    if sel:
        def line(c):
            return (tuple(c["layers"]), c["mode"], c.get("plane", "class_mean"), c.get("das_scale"),
                    c.get("das_within"))

        for key in dict.fromkeys(line(c) for c in sel["candidates"]):
            layers, mode, plane, das_scale, das_within = key
            cs = sorted((c for c in sel["candidates"] if line(c) == key), key=lambda c: c["scale"])
            name = (f"layer {layers[0]}" if len(layers) == 1 else
                    f"layers {layers[0]}-{layers[-1]} ({len(layers)}), radius")
            if plane != "class_mean":
                name += ", probe" if plane == "probe" else f", DAS (x{das_scale:g}, {das_within})"
            axes[0].plot([c["scale"] for c in cs], [c["success"] for c in cs], "o-" if len(layers) == 1 else "s--",
                         ms=4, label=name)
        axes[0].plot([sel["chosen"]["scale"]], [sel["chosen_fit_success"]], "k*", ms=14, label="chosen")
        axes[0].set_xlabel("scale s")
    axes[0].axhline(aim, color="green", lw=0.6, ls=":")
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("top day == target")
    axes[0].set_title("selection on fit templates (cross-validated over templates)", fontsize=9)
    axes[0].legend(fontsize=6)
    if head:
        parts = [p for p in PARTS if f"success_{p}" in head["circle"]]
        groups = ["all", *parts]
        bars = {"circle (chosen)": head["circle"], "random plane": head["random"], "no edit": head["none"],
                "replace (target mean)": head["replace"]}
        if head.get("day_subspace_rank6"):
            bars.update({"day means' rank-6 span": head["day_subspace_rank6"], "random rank 6": head["random_rank6"]})
        width = 0.8 / len(bars)
        ci = head.get("ci95_by_prompt_bootstrap", {})
        for i, (name, row) in enumerate(bars.items()):
            ys = [row["success"] if g == "all" else row.get(f"success_{g}", float("nan")) for g in groups]
            key = {"circle (chosen)": "circle", "random plane": "random"}.get(name)
            err = None
            if key in ci:  # 95 % prompt-bootstrap interval
                err = [[max(y - ci[key][g][0], 0) for y, g in zip(ys, groups)],
                       [max(ci[key][g][1] - y, 0) for y, g in zip(ys, groups)]]
            axes[1].bar([j + (i - (len(bars) - 1) / 2) * width for j in range(len(groups))], ys, width, label=name,
                        yerr=err, capsize=2 if err else 0)
        axes[1].set_xticks(range(len(groups)), [g if g == "all" else f"{g}\n({res.get(f'n_rows_{g}', '?')} rows)"
                                                for g in groups], fontsize=7)
        ch = head["chosen_on_fit_templates"]
        axes[1].set_title(f"held out: layers {','.join(map(str, ch['layers']))} {ch.get('plane', 'class_mean')} "
                          f"{ch['mode']} x{ch['scale']:g}, {res['n_rows']} rows", fontsize=9)
        axes[1].axhline(aim, color="green", lw=0.6, ls=":")
        axes[1].axhline(0.15, color="red", lw=0.6, ls=":")
        axes[1].set_ylim(0, 1.3)
        axes[1].legend(fontsize=7, ncols=3, loc="upper center")
    if per_plane:  # every plane at its own fit-template choice, held out, with its controls
        names = list(per_plane)
        kinds = {"circle": "circle edit", "random": "random plane", "random_day_span": "random plane in the day span"}
        for i, (kind, label) in enumerate(kinds.items()):
            ys = [per_plane[p][kind]["success"] for p in names]
            ci = [per_plane[p]["ci95_by_prompt_bootstrap"][kind]["all"] for p in names]
            err = [[max(y - c[0], 0) for y, c in zip(ys, ci)], [max(c[1] - y, 0) for y, c in zip(ys, ci)]]
            axes[2].bar([j + (i - 1) * 0.27 for j in range(len(names))], ys, 0.27, label=label, yerr=err, capsize=2)
        axes[2].set_xticks(range(len(names)), [
            f"{p}\nlayers {','.join(map(str, per_plane[p]['chosen_on_fit_templates']['layers']))} "
            f"x{per_plane[p]['chosen_on_fit_templates']['scale']:g}" for p in names], fontsize=7)
        axes[2].axhline(aim, color="green", lw=0.6, ls=":")
        axes[2].axhline(0.15, color="red", lw=0.6, ls=":")
        axes[2].set_ylim(0, 1.1)
        axes[2].set_title("held out, all rows: each plane at its own fit-template choice (95 % CI)", fontsize=9)
        axes[2].legend(fontsize=7, loc="upper left")
    fig.suptitle("Rotating the weekday circle at the day token (SmolLM2-135M, resid_post)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/weekday_intervention")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", nargs="*", type=lambda s: [int(x) for x in s.split(",")], default=[],
                    help="also sweep these layers / layer groups on the held-out prompts, with the controls "
                         "('10' edits one layer with every --scales multiplier; '6,8,10' edits those layers together "
                         "with every --group-scales absolute radius); reported, never used for a choice; default: "
                         "none, only the configuration chosen on the fit templates is measured there")
    ap.add_argument("--positions", type=lambda s: s.split(","), default=["day"])
    ap.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 2.0, 3.0, 4.0],
                    help="radius multipliers for the circle edit at the day token (1 = pure rotation); the "
                         "selection on the fit templates chooses among them")
    ap.add_argument("--select-layers", type=lambda s: [int(x) for x in s.split(",") if x],
                    default=[2, 4, 6, 8, 10, 12, 14],
                    help="single layers the fit-template selection chooses among (with --scales)")
    ap.add_argument("--select-groups", nargs="*", type=lambda s: [int(x) for x in s.split(",")],
                    default=[[2, 4, 6, 8, 10], [4, 6, 8, 10], [6, 8, 10, 12, 14], [4, 6, 8, 10, 12, 14]],
                    help="layer groups the selection also compares, each edited at every layer with an absolute "
                         "radius (--group-scales x each layer's circle radius)")
    ap.add_argument("--group-scales", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 3.0, 4.0],
                    help="radius multipliers for the layer-group candidates")
    ap.add_argument("--fit-templates", type=int, default=len(ALL_FIT),
                    help=f"fit templates used: the first N of {len(ALL_FIT)} (run 1 and 2 used the first 6)")
    ap.add_argument("--folds", type=int, default=6,
                    help="cross-validation folds over the fit templates for the selection (0 = leave one template out)")
    ap.add_argument("--eval-templates", type=int, default=len(HELD_OUT),
                    help="held-out templates used: the first N of " + " + ".join(
                        f"{len(ts)} {p}" for p, ts in PARTS.items()))
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=0, help="cap on (prompt, target) rows; 0 = all")
    ap.add_argument("--targets-per-prompt", type=int, default=0,
                    help="target days per prompt, drawn with --seed, in the selection and on the held-out prompts "
                         "(0: all six)")
    ap.add_argument("--planes", type=lambda s: s.split(","), default=["class_mean"],
                    help="planes the selection compares: class_mean (class-mean PCA), probe (the circle probe, "
                         "interp.features.circle_probe) and/or das (a plane learned with the circle edit as the "
                         "intervention, interp.das.fit_das_circle)")
    ap.add_argument("--das-scales", type=lambda s: [float(x) for x in s.split(",")], default=[3.0],
                    help="radius multipliers DAS planes are trained at (each is also scored at every --group-scales)")
    ap.add_argument("--das-within", type=lambda s: s.split(","), default=["class_means"],
                    help="spans DAS planes are searched in: class_means (the seven day means' span) and/or full")
    ap.add_argument("--das-steps", type=int, default=8, help="Adam steps of each DAS fit")
    ap.add_argument("--das-lr", type=float, default=0.02, help="learning rate of the DAS fits")
    ap.add_argument("--das-batch", type=int, default=16, help="prompts per DAS step")
    ap.add_argument("--aim", type=float, default=0.7, help="the held-out success the headline is judged against")
    ap.add_argument("--seed", type=int, default=0, help="seed of the drawn targets")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    bad_planes = not args.planes or any(p not in ("class_mean", "probe", "das") for p in args.planes)
    if bad_planes or not 0 <= args.targets_per_prompt <= 6:
        ap.error("--planes: class_mean, probe and/or das; --targets-per-prompt: 0..6")
    if any(w not in ("class_means", "full") for w in args.das_within) or min(args.das_scales) <= 0 or \
            args.das_steps < 1 or args.das_batch < 1 or args.das_lr <= 0:
        ap.error("--das-within: class_means and/or full; --das-scales > 0; --das-steps, --das-batch >= 1; --das-lr > 0")
    bad = [p for p in args.positions if p not in ("day", "last")]
    if bad:
        ap.error(f"--positions: unknown {bad}; choose from day,last")
    if not 2 <= args.fit_templates <= len(ALL_FIT) or not 1 <= args.eval_templates <= len(HELD_OUT):
        ap.error(f"--fit-templates in 2..{len(ALL_FIT)}, --eval-templates in 1..{len(HELD_OUT)}")
    res = run(args)
    out = Path(args.out)
    write_json(out / "results.json", res, indent=2)
    if not args.no_plot:
        plot(res, out / "success_by_layer.png")
    h = res["headline"]
    if h:
        c, r, ch = h["circle"], h["random"], h["chosen_on_fit_templates"]
        per = ", ".join(f"{p} {c[f'success_{p}']:.3f}" for p in PARTS if f"success_{p}" in c)
        print(f"chosen on fit templates: layers {ch['layers']} {ch['mode']} x{ch['scale']:g}; held-out success "
              f"{c['success']:.3f} ({per}); random {r['success']:.3f}; no edit {res['control_none']['success']:.3f}; "
              f"replace {h['replace']['success']:.3f}; target met: {h['met']} (per part: {h['met_per_part']}); "
              "95% interval of the circle's success (prompt bootstrap) "
              f"{h['ci95_by_prompt_bootstrap']['circle']['all']}")
        for p, row in h["per_plane"].items():
            ci, cp = row["ci95_by_prompt_bootstrap"], row["chosen_on_fit_templates"]
            print(f"plane {p:10s} (its own fit-template choice: layers {cp['layers']} x{cp['scale']:g}, fit CV "
                  f"{cp['fit_success']:.3f}): held-out {row['circle']['success']:.3f} {ci['circle']['all']}, random "
                  f"{row['random']['success']:.3f} {ci['random']['all']}, random in the day span "
                  f"{row['random_day_span']['success']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
