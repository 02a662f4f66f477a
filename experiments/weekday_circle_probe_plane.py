"""Which plane to rotate: class-mean PCA or a supervised circular probe? Fit templates only.

The weekday intervention experiment (``weekday_circle_intervention.py``) turns the day token's point
in the top-2 class-mean directions. A circle *probe* is another way to get the plane: regress the
ideal angle's (cos, sin) (day k at 2*pi*k/7) on the top-``k`` class-mean directions by least squares
and take the plane spanned by the two fitted readouts (``--k``, default 5; seven day means span at
most six directions, and the probe can only find a circle plane that lies in the ones it reads). This
script scores both planes with the same edits and the same 6 folds of the 24 fit templates that the
intervention experiment's selection uses; no held-out template is read.

    python experiments/weekday_circle_probe_plane.py --out experiments/results/weekday_intervention [--k 6]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import weekday_circle_intervention as W  # the sibling script (its directory is on sys.path when run)

from interp import capture, load_model
from interp.atomic import write_json
from interp.features import fit_circle
from interp.features.circles import wrap
from interp.features.supervised import class_means
from interp.intervene import intervene
from interp.subspace import CircleMap, Subspace


def probe_circle(x: torch.Tensor, labels: list[str], k: int = 5) -> Subspace:
    """The plane of a least-squares circle probe on the top-``k`` class-mean directions, with the
    days' circle fitted in it (same orientation convention as ``class_mean_subspace``)."""
    x = x.double()
    means = class_means(x, labels, W.DAYS)
    origin = means.mean(0)
    top = torch.linalg.svd(means - origin, full_matrices=False)[2][:k]
    z = torch.cat([(x - origin) @ top.T, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    theta = torch.tensor([2 * math.pi * W.DAYS.index(lab) / 7 for lab in labels], dtype=x.dtype)
    readout = torch.linalg.lstsq(z, torch.stack([theta.cos(), theta.sin()], 1)).solution[:k]
    plane = torch.linalg.qr((readout.T @ top).T)[0].T
    coords = (means - origin) @ plane.T
    fit = fit_circle(coords)
    if wrap(fit.angles.roll(-1) - fit.angles).sum() < 0:  # angles increase Monday -> Sunday
        plane[1], coords[:, 1] = -plane[1], -coords[:, 1]
        fit = fit_circle(coords)
    cmap = CircleMap(fit.center.float(), float(fit.radius), {d: float(a) for d, a in zip(W.DAYS, fit.angles)})
    return Subspace(plane.float(), origin.float(), cmap, name="circle-probe", orthonormalize=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results/weekday_intervention")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--folds", type=int, default=6)
    ap.add_argument("--k", type=int, default=5, help="class-mean directions the probe reads (at most 6)")
    ap.add_argument("--fit-templates", type=int, default=len(W.ALL_FIT), help="the first N fit templates")
    ap.add_argument("--max-candidates", type=int, default=0, help="score only the first N edits (0 = all 13)")
    args = ap.parse_args(argv)
    if not 2 <= args.folds <= args.fit_templates <= len(W.ALL_FIT):
        ap.error(f"need 2 <= --folds <= --fit-templates <= {len(W.ALL_FIT)}; got {args.folds}, {args.fit_templates}")
    if not 2 <= args.k <= 6:
        ap.error(f"--k: the probe reads 2..6 class-mean directions (seven day means span six); got {args.k}")
    model, tok = load_model(args.model)
    b, labels, day_pos, last, day_ids = W.build(tok, W.ALL_FIT[: args.fit_templates])
    base_top, _ = W.top_days(model, b, day_ids, last)
    layers = [2, 4, 6, 8, 10, 12, 14]
    sites = {L: f"blocks.{L}.hook_resid_post" for L in layers}
    acts = capture(model, b, list(sites.values()), positions=day_pos[:, None])
    cands = [{"layers": g, "mode": "radius", "scale": s}
             for g in ([2, 4, 6, 8, 10], [4, 6, 8, 10], [4, 6, 8, 10, 12, 14]) for s in (2.0, 3.0, 4.0)]
    cands += [{"layers": [L], "mode": "scale", "scale": s} for L in (2, 8) for s in (3.0, 4.0)]
    cands = cands[: args.max_candidates or None]
    fold = (torch.arange(len(labels)) // 7) % args.folds
    score = {(plane, i): [0.0, 0] for plane in ("pca", "probe") for i in range(len(cands))}
    for f in range(args.folds):
        train, test = (fold != f).nonzero()[:, 0], (fold == f).nonzero()[:, 0]
        lab_tr = [labels[i] for i in train]
        planes = {"pca": {L: W.fit_day_circle(acts[sites[L]][train, 0].float(), lab_tr, f"L{L}")[0] for L in layers},
                  "probe": {L: probe_circle(acts[sites[L]][train, 0].float(), lab_tr, args.k) for L in layers}}
        rows = W.make_rows({k: v[test] for k, v in b.items()}, [labels[i] for i in test], day_pos[test], last[test],
                           base_top[test])
        for plane, circles in planes.items():
            for i, c in enumerate(cands):
                edit = W.circle_edit(circles, c["layers"], c["mode"], c["scale"], rows["tgt_names"], sites)
                with intervene(model, edit, positions=rows["where"]["day"]):
                    top, _ = W.top_days(model, rows["batch"], day_ids, rows["last"])
                score[plane, i][0] += float((top == rows["tgt"]).sum())
                score[plane, i][1] += len(top)
        print(f"fold {f + 1}/{args.folds} done", flush=True)
    table = [{**c, "pca_success": score["pca", i][0] / score["pca", i][1],
              "probe_success": score["probe", i][0] / score["probe", i][1]} for i, c in enumerate(cands)]
    for r in table:
        print(f"layers {','.join(map(str, r['layers'])):16s} {r['mode']:6s} x{r['scale']:<3g} "
              f"class-mean PCA {r['pca_success']:.3f}  circle probe {r['probe_success']:.3f}")
    res = {"experiment": "weekday_circle_probe_plane",
           "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
           "fit_templates": args.fit_templates, "folds": args.folds, "k": args.k, "rows": score["pca", 0][1],
           "candidates": table,
           "best": {p: max(r[f"{p}_success"] for r in table) for p in ("pca", "probe")},
           "note": "Cross-validated success on fit templates only (no held-out template is read)."}
    write_json(Path(args.out) / f"probe_plane_fit_cv_k{args.k}.json", res, indent=2)
    print(f"best: class-mean PCA {res['best']['pca']:.3f}, circle probe {res['best']['probe']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
