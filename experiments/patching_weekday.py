"""Where along layers and positions does SmolLM2-135M decide which day to repeat?

The weekday copy task: the clean prompt "I will see you on Monday. To repeat, I will see you on"
makes the embedded model answer " Monday"; the corrupted prompt has "Friday" in its place and the
model answers " Friday". We patch clean activations into the corrupted run (denoising) at every
(site, position) and measure how much of the logit difference ``logit(" Monday") - logit(" Friday")``
each patch restores (``normalized``: 1 = the clean run's value, 0 = the corrupted run's).

1. **Main pair** (Monday -> Friday): exact and attribution sweeps side by side over ``resid_post``,
   ``attn_out`` and ``mlp_out`` at every layer and position; their agreement (Spearman over cells,
   per site kind) and the cells where they disagree most.
2. **All pairs**: seven pairs (each day, corrupted by the day four later), ``resid_post``, exact and
   attribution, effects averaged over pairs; the metric reads each pair's own two days.
3. **The circle at the peak cells**: at the cells where patching the full residual restores the
   most (the day token and the last token; ``--peak-cells`` layers each, spread evenly over the band
   of layers where the full residual restores at least ``--band`` of the gap), patch only the weekday
   circle's plane. The circle is the one the feature finder finds
   (``interp.features.class_mean_subspace``, rank 2 with a fitted circle): at the day token fitted on
   the day-token activations of the finder's own prompts (``ITEM_SETS["days"]`` x ``TEMPLATES["days"]``),
   at the last token on the last-token activations of copy prompts written for this experiment
   (``COPY_TEMPLATES``, disjoint from the task's template). Controls in the same run: the rank-6
   span of the seven day means (``circle=False``) and a random plane (rank 2). All on the seven pairs.

    python experiments/patching_weekday.py --out experiments/results/patching
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from interp import load_model
from interp.atomic import write_json
from interp.features import ITEM_SETS, TEMPLATES, class_mean_subspace, item_activations
from interp.patching import PatchingResult, activation_patching, agreement, attribution_patching, logit_diff
from interp.subspace import Subspace

DAYS = ITEM_SETS["days"]
TEMPLATE = "I will see you on {d}. To repeat, I will see you on"
SHIFT = 4  # the corrupted day is four days after the clean one: Monday -> Friday
KINDS = ["resid_post", "attn_out", "mlp_out"]
COPY_TEMPLATES = [  # last-token circle: prompts that end where the model is about to repeat the day
    "The meeting is on {d}. Again, the meeting is on",
    "My birthday falls on {d}. I repeat, my birthday falls on",
    "The shop opens on {d}. So the shop opens on",
    "We leave on {d}. That is right, we leave on",
    "The exam is on {d}. Once more, the exam is on",
    "The party is on {d}. Remember, the party is on",
    "Her flight lands on {d}. Yes, her flight lands on",
    "The report is due on {d}. Again: the report is due on",
]


def day_pairs(n: int) -> list[tuple[str, str]]:
    """(clean day, corrupted day) for the first ``n`` days, Monday first."""
    return [(DAYS[i], DAYS[(i + SHIFT) % 7]) for i in range(n)]


def prompts(pairs):
    return [TEMPLATE.format(d=c) for c, _ in pairs], [TEMPLATE.format(d=b) for _, b in pairs]


def metric_for(pairs):
    return logit_diff([" " + c for c, _ in pairs], [" " + b for _, b in pairs])


def subset(res: PatchingResult, kind: str) -> PatchingResult:
    """The rows of one site kind (e.g. ``hook_resid_post``)."""
    idx = [i for i, s in enumerate(res.sites) if s.endswith(kind)]
    return dataclasses.replace(res, rows=[res.rows[i] for i in idx], sites=[res.sites[i] for i in idx],
                               units=[res.units[i] for i in idx], effects=res.effects[:, idx])


def compare(exact: PatchingResult, attr: PatchingResult, kinds) -> dict:
    out = agreement(exact, attr, top=10)
    out["per_kind_spearman"] = {k: agreement(subset(exact, "hook_" + k), subset(attr, "hook_" + k))["spearman"]
                                for k in kinds}
    return out


def side_by_side(exact: PatchingResult, attr: PatchingResult, path: Path, title: str) -> None:
    kinds = len({s.rsplit(".", 1)[-1] for s in exact.sites})
    vmax = max(float(exact.normalized.abs().max()), float(attr.normalized.abs().max()))
    fig = Figure(figsize=(4.2 * kinds + 1.2, 2.2 + 0.32 * len(exact.rows) / kinds), layout="constrained")
    axes = fig.subplots(2, kinds, squeeze=False)
    exact.plot(axes=list(axes[0]), vmax=vmax)
    attr.plot(axes=list(axes[1]), vmax=vmax)
    for ax in axes[0]:
        ax.set_title("exact: " + ax.get_title(), fontsize=8)
    for ax in axes[1]:
        ax.set_title("attribution: " + ax.get_title(), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)


def fit_circles(model, tok, layers, args) -> dict:
    """Per layer: the day-token circle (finder prompts), the last-token circle (copy prompts), the rank-6 day span."""
    sites = [f"blocks.{L}.hook_resid_post" for L in layers]
    acts, labels, _ = item_activations(model, tok, DAYS, TEMPLATES["days"][: args.fit_templates], sites)
    copy = [t.format(d=d) for t in COPY_TEMPLATES[: args.fit_templates] for d in DAYS]
    copy_labels = [d for _ in COPY_TEMPLATES[: args.fit_templates] for d in DAYS]
    from interp import capture
    last = capture(model, copy, sites, positions="last", tokenizer=tok, dtype=torch.float32)
    out = {}
    for L, s in zip(layers, sites):
        out[L] = {"day": class_mean_subspace(acts[s], labels, rank=2, order=DAYS, name=f"day L{L}"),
                  "last": class_mean_subspace(last[s], copy_labels, rank=2, order=DAYS, name=f"last L{L}"),
                  "day_span6": class_mean_subspace(acts[s], labels, rank=6, circle=False),
                  "last_span6": class_mean_subspace(last[s], copy_labels, rank=6, circle=False)}
    return out


def peak_layers(norm: torch.Tensor, col: int, n: int, band: float) -> list[int]:
    """``n`` layers evenly spread over the band where patching the full residual at ``col`` restores at
    least ``band`` of the gap (its first and last layer included)."""
    inside = (norm[:, col] >= band).nonzero()[:, 0].tolist()
    if not inside:
        return [int(norm[:, col].argmax())]
    picks = torch.linspace(inside[0], inside[-1], min(n, inside[-1] - inside[0] + 1)).round().long().tolist()
    return sorted({min(inside, key=lambda i, p=p: abs(i - p)) for p in picks})


def circle_cells(model, tok, all_exact: PatchingResult, pairs, args) -> dict:
    clean, bad = prompts(pairs)
    metric = metric_for(pairs)
    day_col, last_col = 5, len(all_exact.positions) - 1
    assert all_exact.tokens[day_col] == " " + pairs[0][1], all_exact.tokens  # the day token of the template
    norm = all_exact.normalized
    picks = {where: [all_exact.sites[i] for i in peak_layers(norm, col, args.peak_cells, args.band)]
             for where, col in (("day", day_col), ("last", last_col))}
    layers = sorted({int(s.split(".")[1]) for sites in picks.values() for s in sites})
    circles = fit_circles(model, tok, layers, args)
    g = torch.Generator().manual_seed(0)
    d_model = model.config.hidden_size
    rows = []
    for where, col in (("day", day_col), ("last", last_col)):
        sites = picks[where]
        subs = {"circle": {s: circles[int(s.split(".")[1])][where] for s in sites},
                "day_span6": {s: circles[int(s.split(".")[1])][where + "_span6"] for s in sites},
                "random_plane": {s: Subspace(torch.randn(2, d_model, generator=g)) for s in sites}}
        kw = dict(sites=sites, positions=[col], tokenizer=tok)
        got = {name: activation_patching(model, clean, bad, metric, subspace=sub, progress=False, **kw).normalized[:, 0]
               for name, sub in subs.items()}
        got["circle_attribution"] = attribution_patching(model, clean, bad, metric, subspace=subs["circle"],
                                                         **kw).normalized[:, 0]
        for i, site in enumerate(sites):
            L = int(site.split(".")[1])
            row = {"where": where, "position": col, "token": all_exact.tokens[col], "site": site, "layer": L,
                   "full_residual": float(norm[all_exact.sites.index(site), col]),
                   "circle_order_matches": circles[L][where].meta.get("order_matches"),
                   **{name: float(v[i]) for name, v in got.items()}}
            rows.append(row)
            print(f"{site} at the {where} token: full {row['full_residual']:.3f}, circle {row['circle']:.3f} "
                  f"(attribution {row['circle_attribution']:.3f}), rank-6 day-mean span {row['day_span6']:.3f}, "
                  f"random plane {row['random_plane']:.3f}", flush=True)
    return {"cells": rows, "fit_templates": args.fit_templates, "band": args.band}


def plot_circle(cells: list[dict], path: Path) -> None:
    fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * len(cells)), 4.0), layout="constrained")
    ax = fig.add_subplot()
    names = ["full_residual", "day_span6", "circle", "circle_attribution", "random_plane"]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + (i - 2) * width for j in range(len(cells))]
        ax.bar(xs, [c[n] for c in cells], width, label=n.replace("_", " "))
    ax.set_xticks(range(len(cells)), [f"L{c['layer']}\n{c['where']}" for c in cells], fontsize=7)
    ax.axhline(1.0, color="0.5", lw=0.6, ls=":")
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.set_ylabel("fraction of the logit difference restored")
    ax.set_ylim(min(-0.1, min(c[n] for c in cells for n in names) - 0.05), 1.25)
    ax.legend(fontsize=7, ncols=5, loc="upper center")
    ax.set_title("patching only part of the residual at the peak cells (mean over pairs)", fontsize=9)
    fig.savefig(path, dpi=110)


def reused(out: Path, name: str, args) -> PatchingResult | None:
    """With ``--reuse-sweeps``, a sweep saved in ``out`` by an earlier run of the same settings."""
    path = out / f"{name}.json"
    if not args.reuse_sweeps or not path.exists():
        return None
    res = PatchingResult.from_dict(json.loads(path.read_text()))
    layers = sorted({int(s.split(".")[1]) for s in res.sites})
    if layers != (args.layers or list(range(len(layers)))) or res.effects.shape[0] not in (1, args.pairs):
        raise SystemExit(f"--reuse-sweeps: {path} was run with other settings (layers {layers}, "
                         f"{res.effects.shape[0]} pairs); run without --reuse-sweeps")
    print(f"reusing {path} ({res.seconds:.0f} s when it was run)")
    return res


def run(args) -> dict:
    t0 = time.time()
    model, tok = load_model(args.model, device=args.device)
    layers = args.layers or list(range(model.config.num_hidden_layers))
    out = Path(args.out)
    res: dict = {"model": args.model, "template": TEMPLATE, "layers": layers, "kinds": KINDS}
    # 1. the main pair, three site kinds
    main_pair = day_pairs(1)
    clean, bad = prompts(main_pair)
    kw = dict(layers=layers, tokenizer=tok)
    exact = reused(out, "exact", args) or activation_patching(model, clean, bad, metric_for(main_pair), sites=KINDS,
                                                              batch_size=args.batch_size, **kw)
    attr = reused(out, "attribution", args) or attribution_patching(model, clean, bad, metric_for(main_pair),
                                                                    sites=KINDS, **kw)
    t_exact = exact.seconds
    exact.save(out, "exact"), attr.save(out, "attribution")
    side_by_side(exact, attr, out / "exact_vs_attribution.png", "Monday -> Friday: fraction of the logit difference "
                 "restored by patching the clean run's activation")
    res["main"] = {"clean": clean[0], "corrupted": bad[0], "clean_metric": exact.clean_metric,
                   "corrupted_metric": exact.corrupted_metric, "seconds_exact": t_exact, "seconds_attribution":
                   attr.seconds, "agreement": compare(exact, attr, KINDS),
                   "top_exact": exact.top(10, by="normalized"), "top_attribution": attr.top(10, by="normalized")}
    a = res["main"]["agreement"]
    print(f"main pair: clean {exact.clean_metric:.3f}, corrupted {exact.corrupted_metric:.3f}; exact {t_exact:.1f} s, "
          f"attribution {attr.seconds:.1f} s; Spearman {a['spearman']:.3f} ({a['per_kind_spearman']})", flush=True)
    # 2. every pair, resid_post
    pairs = day_pairs(args.pairs)
    clean, bad = prompts(pairs)
    all_exact = reused(out, "pairs_exact", args) or activation_patching(
        model, clean, bad, metric_for(pairs), sites="resid_post", batch_size=args.batch_size, **kw)
    all_attr = reused(out, "pairs_attribution", args) or attribution_patching(
        model, clean, bad, metric_for(pairs), sites="resid_post", **kw)
    all_exact.save(out, "pairs_exact"), all_attr.save(out, "pairs_attribution")
    side_by_side(all_exact, all_attr, out / "pairs_exact_vs_attribution.png",
                 f"{len(pairs)} day pairs, resid_post: fraction restored (means over pairs)")
    res["pairs"] = {"pairs": pairs, "clean_metric": all_exact.clean_metric, "corrupted_metric":
                    all_exact.corrupted_metric, "per_pair_gap": (all_exact.source_metric - all_exact.base_metric)
                    .tolist(), "agreement": compare(all_exact, all_attr, ["resid_post"]),
                    "seconds_exact": all_exact.seconds, "seconds_attribution": all_attr.seconds}
    print(f"{len(pairs)} pairs: Spearman {res['pairs']['agreement']['spearman']:.3f}", flush=True)
    # 3. the circle at the peak cells
    res["circle"] = circle_cells(model, tok, all_exact, pairs, args)
    plot_circle(res["circle"]["cells"], out / "circle_cells.png")
    res["seconds"] = time.time() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/patching")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="layers to sweep, e.g. 0,10,20 (default: all)")
    ap.add_argument("--pairs", type=int, default=7, help="day pairs in parts 2 and 3 (1..7, Monday first)")
    ap.add_argument("--peak-cells", type=int, default=4,
                    help="layers per position (day token, last token) in part 3, spread over the band")
    ap.add_argument("--band", type=float, default=0.5,
                    help="part 3 picks layers where the full residual restores at least this fraction")
    ap.add_argument("--reuse-sweeps", action="store_true",
                    help="take the sweeps of parts 1 and 2 from an earlier run's files in --out (same settings)")
    ap.add_argument("--fit-templates", type=int, default=8, help="templates per day for the circle fits")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if not 1 <= args.pairs <= 7 or not 2 <= args.fit_templates <= len(COPY_TEMPLATES):
        ap.error(f"--pairs in 1..7, --fit-templates in 2..{len(COPY_TEMPLATES)}")
    res = run(args)
    write_json(Path(args.out) / "results.json", res, indent=2)
    print(f"done in {res['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
