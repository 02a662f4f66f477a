"""Rotate a weekday along its fitted circle and see whether the model repeats the new day.

Prompts make the embedded model repeat a weekday ("I will see you on Monday. To repeat, I will
see you on" -> " Monday"). At one layer we fit the weekday circle (class-mean PCA + circle fit,
``interp.features.class_mean_subspace``) on prompts from *fit* templates, then, on prompts from
disjoint *eval* templates, rotate the day's circle coordinates to each of the six other days and
count how often the model's top day among the seven becomes the target.

Every (layer, position, edit) is measured in the same run with three controls:
* ``none``    -- no edit (how often the target wins anyway);
* ``random``  -- a random rank-2 subspace rotated by the same per-prompt angle as the circle edit;
* ``replace`` -- the whole activation replaced by the target day's mean activation (fit prompts).

Positions: ``day`` (the earlier mention of the day) or ``last`` (the final token; its own circle
is fitted on final-token activations). Layer groups edit one layer or several at once. The circle
edit turns the point to the target's angle; ``--scales`` also multiplies its distance from the
circle's center (1 = a pure rotation), and the random control is scaled the same way.

    python experiments/weekday_circle_intervention.py --out experiments/results/weekday_intervention
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from interp import capture, load_model
from interp.capture import last_token_index, tokenize
from interp.edits import Replace, Rotate
from interp.features import class_mean_subspace
from interp.intervene import intervene
from interp.subspace import Subspace

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FIT_TEMPLATES = [
    "Today is {d}. Yes, today is",
    "The meeting is on {d}. Again, the meeting is on",
    "My birthday falls on {d}. I repeat, my birthday falls on",
    "The shop opens on {d}. So the shop opens on",
    "We leave on {d}. That is right, we leave on",
    "The exam is on {d}. Once more, the exam is on",
]
EVAL_TEMPLATES = [
    "I will see you on {d}. To repeat, I will see you on",
    "The party is on {d}. Remember, the party is on",
    "Her flight lands on {d}. Her flight lands on",
    "The report is due on {d}. Again: the report is due on",
]
EDITS = ("circle", "random", "replace")


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


def random_plane(d_model: int, seed: int) -> Subspace:
    g = torch.Generator().manual_seed(seed)
    return Subspace(torch.randn(2, d_model, generator=g))


def run(args) -> dict:
    t0 = time.time()
    model, tok = load_model(args.model, device=args.device)
    fit_b, fit_lab, fit_day, fit_last, day_ids = build(tok, FIT_TEMPLATES[: args.fit_templates])
    ev_b, ev_lab, ev_day, ev_last, _ = build(tok, EVAL_TEMPLATES[: args.eval_templates])
    src_idx = torch.tensor([DAYS.index(d) for d in ev_lab])
    base_top, _ = top_days(model, ev_b, day_ids, ev_last)
    copied = (base_top == src_idx).nonzero()[:, 0]  # evaluate only prompts the model copies correctly
    # one row per (prompt, target day != source day)
    rows = [(int(i), t) for i in copied for t in range(7) if t != int(src_idx[i])][: args.max_rows or None]
    pi = torch.tensor([r[0] for r in rows])
    tgt = torch.tensor([r[1] for r in rows])
    src = src_idx[pi]
    batch = {k: v[pi] for k, v in ev_b.items()}
    last = ev_last[pi]
    where = {"day": [[int(p)] for p in ev_day[pi]], "last": "last"}
    tgt_names = [DAYS[t] for t in tgt]

    def measure(edits: dict, pos) -> dict:
        with intervene(model, edits, positions=pos):
            top, is_day = top_days(model, batch, day_ids, last)
        return {"success": float((top == tgt).float().mean()), "source_kept": float((top == src).float().mean()),
                "top_token_is_a_day": float(is_day.float().mean())}

    none = measure({f"blocks.{args.layers[0][0]}.hook_resid_post": []}, None)
    all_layers = sorted({layer for group in args.layers for layer in group})
    sites = {layer: f"blocks.{layer}.hook_resid_post" for layer in all_layers}
    fit_pos = torch.stack([fit_day, fit_last], 1)
    acts = capture(model, fit_b, list(sites.values()), positions=fit_pos)
    fitted, circles = {}, {}
    for layer, site in sites.items():
        for j, pname in enumerate(("day", "last")):
            x = acts[site][:, j].float()
            sub = class_mean_subspace(x, fit_lab, rank=2, circle=True, order=DAYS, name=f"L{layer}-{pname}")
            means = torch.stack([x[[lab == d for lab in fit_lab]].mean(0) for d in DAYS])
            ang = torch.tensor([sub.coord_map.angles[d] for d in DAYS])
            fitted[layer, pname] = (sub, means, ang[tgt] - ang[src])
            circles[f"{layer}/{pname}"] = {k: sub.meta.get(k) for k in (
                "order_matches", "cyclic_order", "explained_variance", "radius_cv", "loco_angle_error")}
    results = []

    def record(group, pname, edit, scale, runs):
        row = {"layers": group, "position": pname, "edit": edit, "scale": scale,
               **{k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}}
        if len(runs) > 1:
            row["success_per_seed"] = [r["success"] for r in runs]
        results.append(row)
        print(f"layers {','.join(map(str, group)):12s} {pname:4s} {edit:7s} x{scale or 1:<3} success "
              f"{row['success']:.3f} source_kept {row['source_kept']:.3f}", flush=True)

    for group in args.layers:
        for pname in args.positions:
            scales = args.scales if pname == "day" else [1.0]
            for scale in scales:
                circle = {sites[L]: Rotate(fitted[L, pname][0], to=tgt_names, scale=scale) for L in group}
                record(group, pname, "circle", scale, [measure(circle, where[pname])])
                runs = []
                for seed in range(args.random_seeds):
                    rand = {sites[L]: Rotate(random_plane(fitted[L, pname][0].d_model, 1000 * L + seed),
                                             angle=fitted[L, pname][2], scale=scale) for L in group}
                    runs.append(measure(rand, where[pname]))
                record(group, pname, "random", scale, runs)
            replace = {sites[L]: Replace(fitted[L, pname][1][tgt]) for L in group}
            record(group, pname, "replace", None, [measure(replace, where[pname])])
    circle_rows = [r for r in results if r["edit"] == "circle"]
    best = max(circle_rows, key=lambda r: r["success"])
    rand_at_best = next(r for r in results if r["edit"] == "random" and r["layers"] == best["layers"]
                        and r["position"] == best["position"] and r["scale"] == best["scale"])
    unscaled = [r for r in circle_rows if r["scale"] == 1.0]
    best1 = max(unscaled, key=lambda r: r["success"]) if unscaled else None
    return {
        "experiment": "weekday_circle_intervention",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "model": args.model, "fit_templates": FIT_TEMPLATES[: args.fit_templates],
        "eval_templates": EVAL_TEMPLATES[: args.eval_templates],
        "base_copy_accuracy": float((base_top == src_idx).float().mean()), "n_eval_prompts": len(ev_lab),
        "n_rows": len(rows), "random_seeds": args.random_seeds, "control_none": none, "circles": circles,
        "results": results,
        "best_circle": best, "random_at_best": rand_at_best, "best_circle_radius_kept": best1,
        "target": {"circle_success_min": 0.6, "random_success_max": 0.15,
                   "met": best["success"] >= 0.6 and rand_at_best["success"] <= 0.15},
        "seconds": round(time.time() - t0, 1),
        "note": "CPU run; other jobs shared the 2-core machine. Success = the model's top day among the seven "
                "(logits at the last token) equals the target day; rows are (eval prompt the model copies "
                "correctly, target day != source day). circle = Rotate(fitted circle, to=target, scale=s): the "
                "point is turned to the target's fitted angle and its distance from the circle's center "
                "multiplied by s; random = a random rank-2 plane turned by the same per-row angle with the "
                "same s; replace = whole activation set to the target day's mean (fit prompts).",
    }


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = res["results"]
    positions = [p for p in ("day", "last") if any(r["position"] == p for r in rs)]
    fig, axes = plt.subplots(1, len(positions), figsize=(5 * len(positions), 3.6), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], positions):
        groups = list(dict.fromkeys(tuple(r["layers"]) for r in rs if r["position"] == p))
        labels = [",".join(map(str, g)) if len(g) > 1 else str(g[0]) for g in groups]
        xs = range(len(groups))
        series = sorted({(r["edit"], r["scale"]) for r in rs if r["position"] == p}, key=str)
        for edit, scale in series:
            ys = [next((r["success"] for r in rs if r["position"] == p and tuple(r["layers"]) == g
                        and r["edit"] == edit and r["scale"] == scale), float("nan")) for g in groups]
            style = {"circle": "o-", "random": "s--", "replace": "^:"}[edit]
            shade = {1.0: 0, 2.0: 1, 3.0: 2}.get(scale or 1.0, 2)
            color = {"circle": ("tab:blue", "tab:cyan", "navy"), "random": ("tab:red", "tab:orange", "maroon"),
                     "replace": ("tab:green",) * 3}[edit][shade]
            ax.plot(xs, ys, style, color=color, label=f"{edit}" + (f" x{scale:g}" if scale else ""))
        ax.axhline(res["control_none"]["success"], color="gray", lw=1, label="no edit")
        ax.axhline(0.6, color="green", lw=0.6, ls=":")
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=7)
        ax.set_title(f"edit at: {p} token")
        ax.set_xlabel("edited layers")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("top day == target")
    fig.suptitle("Rotating the weekday circle (SmolLM2-135M, resid_post)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/weekday_intervention")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", nargs="+", type=lambda s: [int(x) for x in s.split(",")],
                    default=[[8], [10], [12], [6, 8, 10, 12, 14]],
                    help="layer groups: '10' edits one layer, '6,8,10' edits those layers together")
    ap.add_argument("--positions", type=lambda s: s.split(","), default=["day", "last"])
    ap.add_argument("--scales", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 2.0],
                    help="radius multipliers for the circle edit at the day token (1 = pure rotation)")
    ap.add_argument("--fit-templates", type=int, default=len(FIT_TEMPLATES))
    ap.add_argument("--eval-templates", type=int, default=2)
    ap.add_argument("--random-seeds", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=0, help="cap on (prompt, target) rows; 0 = all")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    bad = [p for p in args.positions if p not in ("day", "last")]
    if bad:
        ap.error(f"--positions: unknown {bad}; choose from day,last")
    if not 1 <= args.fit_templates <= len(FIT_TEMPLATES) or not 1 <= args.eval_templates <= len(EVAL_TEMPLATES):
        ap.error(f"--fit-templates in 1..{len(FIT_TEMPLATES)}, --eval-templates in 1..{len(EVAL_TEMPLATES)}")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out / "results.json")
    if not args.no_plot:
        plot(res, out / "success_by_layer.png")
    b, r = res["best_circle"], res["random_at_best"]
    print(f"best circle edit: layers {b['layers']} x{b['scale']:g} at {b['position']}: success {b['success']:.3f}; random control "
          f"{r['success']:.3f}; no edit {res['control_none']['success']:.3f}; target met: {res['target']['met']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
