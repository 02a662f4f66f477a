"""Find the weekday circle in the embedded model two ways: class-mean PCA and an SAE's decoder clusters.

Part A (supervised): at every layer, the day-token activations of prompts ending in a weekday
("The meeting is on Friday") are averaged per day; the top-2 principal directions of the seven
means and a circle fitted through them give each day an angle
(``interp.features.class_mean_subspace``). Per layer we report whether the circle puts the days in
cyclic order, the leave-one-day-out angle error (refit without a day, predict where it should sit,
assuming evenly spaced days), the same error with a shuffled day order as a baseline, the error on
prompts from held-out templates, the radius spread and the class-mean variance in the plane. Beside
them, the circle probe (Engels et al., ``interp.features.circle_probe``: a least-squares read-out of
each day's (cos, sin) from the top 5 principal components): its leave-one-day-out error, its
leave-one-template-out error (per prompt) and its held-out-template error (fit on even templates,
read the odd templates' day means). ``--items months`` runs part A on months (with ``--skip-sae``).

Part B (unsupervised, Engels et al.): a small TopK SAE (``saes.build("topk")`` trained with
``saes.trainer.Trainer``) on one layer's activations of text that mentions days, mixed with the
offline corpus; its decoder is clustered (graph and spectral), each cluster's reconstructions are
scored with the separability and epsilon-mixture indices, and circles are flagged, checking on
held-out sentences whether the days sit around the circle in order.

    python experiments/weekday_circle_features.py --out experiments/results/features
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from interp.capture import capture
from interp.data import load_texts, pack, token_mask
from interp.features import circle_probe, class_mean_subspace
from interp.features.circles import cyclic_order, fit_circle, same_cyclic_order, wrap
from interp.features.clusters import ClusterConfig, default_n_clusters
from interp.features.items import ITEM_SETS, TEMPLATES, item_activations
from interp.features.multidim import MultiDimConfig, find_multidim_features
from interp.features.plot import plot_clusters, plot_layer_scores
from interp.models import load_model
from interp.provenance import recorded_command

DAYS = ITEM_SETS["days"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Kate", "Liam",
         "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor"]
ACTIVITIES = ["goes to the gym", "works from home", "plays chess", "bakes bread", "calls the office",
              "reads in the park", "cleans the kitchen", "meets friends", "takes the train to work",
              "cooks dinner", "waters the garden", "has a piano lesson", "walks the dog", "goes to the market",
              "studies French", "visits the library"]
PATTERNS = ["{n} {a} on {d}.", "Every {d}, {n} {a}.", "On {d} {n} {a}, and on {d2} {m} {b}.",
            "{n} said that the trip starts on {d} and ends on {d2}.", "The day after {d} is {next}.",
            "Yesterday was {d}, so today is {next}.", "{n} never {a2} on {d}.", "See you on {d}, {n}!"]


def day_sentences(names: list[str], n: int, seed: int) -> list[str]:
    """`n` documents of 6 sentences about people's weekdays (only `names` appear)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(6):
            i = rng.randrange(7)
            a = rng.choice(ACTIVITIES)
            sents.append(rng.choice(PATTERNS).format(
                n=rng.choice(names), m=rng.choice(names), a=a, b=rng.choice(ACTIVITIES), d=DAYS[i],
                d2=DAYS[rng.randrange(7)], next=DAYS[(i + 1) % 7], a2=a.split(" ", 1)[1] if " " in a else a))
        docs.append(" ".join(sents))
    return docs


def token_rows(model, tok, texts, site, context_size):
    """Activations of every non-first, non-special token of packed windows, and each row's token id."""
    windows = torch.stack(list(pack(texts, tok, context_size)))
    keep = token_mask(windows, tok)
    acts = capture(model, windows, [site], positions=keep, batch_size=8, dtype=torch.float32)[site]
    return acts, windows[keep]


# ---------------------------------------------------------------------------------------------- part A
def part_a(model, tok, args, out: Path) -> list[dict]:
    layers = list(range(model.config.num_hidden_layers)) if args.layers == "all" else \
        [int(x) for x in args.layers.split(",")]
    sites = [f"blocks.{L}.hook_resid_post" for L in layers]
    items = ITEM_SETS[args.items]
    templates = TEMPLATES[args.items][: args.templates]
    acts, labels, tids = item_activations(model, tok, items, templates, sites)
    fit_rows = [i for i, t in enumerate(tids) if t % 2 == 0]
    test_rows = [i for i, t in enumerate(tids) if t % 2 == 1]
    rng = random.Random(args.seed)
    shuffled_orders = []
    while len(shuffled_orders) < 5:
        o = items[:]
        rng.shuffle(o)
        shuffled_orders.append(o)
    rows = []
    for layer, site in zip(layers, sites):
        x = acts[site]
        sub = class_mean_subspace(x, labels, order=items, name=f"{args.items}@{site}")
        m = sub.meta
        shuffled = [class_mean_subspace(x, labels, order=o).meta["loco_angle_error"] for o in shuffled_orders]
        probe = circle_probe(x, labels, order=items, groups=tids, name=f"{args.items}@{site} probe")
        # held-out templates: fit on even templates, place odd-template class means on that circle
        fit_lab, test_lab = [labels[i] for i in fit_rows], [labels[i] for i in test_rows]
        fit = class_mean_subspace(x[fit_rows], fit_lab, order=items)
        fit_probe = circle_probe(x[fit_rows], fit_lab, order=items)
        errs, probe_errs = [], []
        for d in items:
            mean = x[[test_rows[i] for i, v in enumerate(test_lab) if v == d]].mean(0)
            errs.append(abs(wrap(fit.predict(mean) - fit.coord_map.angles[d]).item()))
            probe_errs.append(abs(wrap(fit_probe.predict(mean) - fit_probe.meta["target_angles"][d]).item()))
        rows.append({"layer": layer, "site": site, "order_matches": m["order_matches"],
                     "loco_angle_error": m["loco_angle_error"], "loco_error_shuffled_order": sum(shuffled) / 5,
                     "heldout_template_angle_error": sum(errs) / len(items), "radius_cv": m["radius_cv"],
                     "top2_explained": sum(m["explained_variance"]), "cyclic_order": m["cyclic_order"],
                     "probe_loco_angle_error": probe.meta["loco_angle_error"],
                     "probe_loto_angle_error": probe.meta["loto_angle_error"],
                     "probe_heldout_template_angle_error": sum(probe_errs) / len(items),
                     "probe_order_matches": probe.meta["order_matches"], "probe_r2": probe.meta["r2"]})
        if layer in args.plot_layers:
            sub.plot(x, labels, order=items, path=out / f"{args.items}_class_mean_L{layer}.png",
                     title=f"SmolLM2-135M layer {layer}: {args.items} class-mean PCA")
            if args.save_subspaces:
                sub.save(Path(args.save_subspaces) / f"{args.items}_L{layer}")
    plot_layer_scores(rows, out / f"{args.items}_class_mean_scores.png",
                      keys=("loco_angle_error", "probe_loco_angle_error", "loco_error_shuffled_order",
                            "heldout_template_angle_error", "probe_heldout_template_angle_error", "radius_cv",
                            "top2_explained"),
                      title=f"{args.items} circle by layer (angle errors in radians)")
    return rows


# ---------------------------------------------------------------------------------------------- part B
def train_sae(model, tok, args, site):
    import saes.topk  # noqa: F401 - registers "topk" (plain `import saes` also works once installed normally)
    from saes.base import build
    from saes.trainer import TrainConfig, Trainer

    train_docs = day_sentences(NAMES[:14], args.day_docs, args.seed)
    corpus = [t for _, t in zip(range(args.corpus_docs), load_texts(None, shuffle_seed=args.seed))]
    t0 = time.time()
    x, _ = token_rows(model, tok, train_docs + corpus, site, args.context)
    capture_s = time.time() - t0
    sae = build("topk", d_model=x.shape[1], d_sae=args.d_sae, k=args.k)
    steps = max(1, args.sae_tokens // args.batch)
    g = torch.Generator().manual_seed(args.seed)

    def batches():
        while True:
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - args.batch + 1, args.batch):
                yield x[perm[i:i + args.batch]]

    cfg = TrainConfig(total_tokens=steps * args.batch, batch_tokens=args.batch, seed=args.seed,
                      progress=not args.quiet, log_every=max(1, steps // 10))
    t0 = time.time()
    trainer = Trainer(sae, cfg).fit(batches())
    sae = trainer.saes_[""]
    last = trainer.history_[-1][""] if trainer.history_ else {}
    return sae, {"train_rows_unique": len(x), "capture_s": round(capture_s, 1), "train_s": round(time.time() - t0, 1),
                 "steps": steps, "d_sae": args.d_sae, "k": args.k, "final": last,
                 "day_docs": args.day_docs, "corpus_docs": args.corpus_docs}


def day_latents(sae, x, labels):
    """For each day, the latent with the largest mean code on that day's tokens minus elsewhere."""
    with torch.no_grad():
        codes = sae.encode(x)
    out = {}
    for d in DAYS:
        on = torch.tensor([v == d for v in labels])
        if on.any():
            sel = codes[on].mean(0) - codes[~on].mean(0)
            out[d] = int(sel.argmax())
    return out, codes


def part_b(model, tok, args, out: Path) -> dict:
    site = f"blocks.{args.sae_layer}.hook_resid_post"
    sae, train_info = train_sae(model, tok, args, site)
    eval_docs = day_sentences(NAMES[14:], args.eval_docs, args.seed + 1)
    x, ids = token_rows(model, tok, eval_docs, site, args.context)
    day_ids = {tok.encode(" " + d, add_special_tokens=False)[0]: d for d in DAYS}
    labels = [day_ids.get(int(i), "-") for i in ids]
    with torch.no_grad():
        fvu = ((sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    per_day, _ = day_latents(sae, x, labels)
    result = {"site": site, "sae": train_info, "eval_rows": len(x), "eval_fvu": fvu,
              "eval_day_tokens": sum(v != "-" for v in labels), "day_latents": per_day, "methods": {}}
    day_set = set(per_day.values())
    for method, ccfg in (("graph", ClusterConfig(method="graph", sim_cutoff=args.sim_cutoff)),
                         ("spectral", ClusterConfig(method="spectral", n_clusters=args.n_clusters, seed=args.seed))):
        n_clusters = ccfg.n_clusters or default_n_clusters(args.d_sae)
        feats = find_multidim_features(sae, x, cluster_config=ccfg, labels=labels, order=DAYS,
                                       config=MultiDimConfig(min_points=args.min_points))
        with_days = [i for i, f in enumerate(feats) if day_set & set(f.latents)]
        rows = []
        for i, f in enumerate(feats):
            if i < args.top or i in with_days:
                d = f.to_dict()
                d.update(rank=i, n_day_latents=len(day_set & set(f.latents)),
                         label_order_matches=f.circle.get("label_order_matches"))
                rows.append(d)
        result["methods"][method] = {"n_scored": len(feats), "clusters_with_day_latents": with_days,
                                     "n_clusters": n_clusters if method == "spectral" else None,
                                     "n_circles": sum(f.is_circle for f in feats), "clusters": rows}
        if feats:
            show = [feats[i] for i in sorted(set(range(min(args.top, len(feats)))) | set(with_days[:4]))]
            plot_clusters(show, out / f"sae_clusters_{method}.png", top=len(show))
    # the cluster made of exactly the seven day latents, scored the same way (an oracle grouping)
    day_lat = [per_day[d] for d in DAYS if d in per_day]
    if len(set(day_lat)) == 7:
        (feat,) = find_multidim_features(sae, x, clusters=[day_lat], labels=labels, order=DAYS,
                                         config=MultiDimConfig(min_points=args.min_points))
        w = sae.W_dec.detach()[day_lat]
        w = w / w.norm(dim=1, keepdim=True)
        cos = w @ w.T
        off = cos[~torch.eye(7, dtype=torch.bool)]
        result["day_latent_cluster"] = {**feat.to_dict(), "label_order_matches": feat.circle.get("label_order_matches"),
                                        "decoder_cos_min": float(off.min()), "decoder_cos_mean": float(off.mean()),
                                        "decoder_cos_max": float(off.max())}
        plot_clusters([feat], out / "sae_day_latent_cluster.png", top=1)
    if args.save_sae:
        from saes.checkpoint import save

        save(sae, args.save_sae, metadata={"model_name": "smollm2-135m", "hook_name": site})
    # the supervised circle on the same eval rows, for comparison with the SAE clusters
    day_rows = [i for i, v in enumerate(labels) if v != "-"]
    if day_rows:
        sup = class_mean_subspace(x[day_rows], [labels[i] for i in day_rows], order=DAYS)
        result["class_mean_on_eval_day_tokens"] = {k: sup.meta[k] for k in ("order_matches", "loco_angle_error",
                                                                          "radius_cv", "explained_variance")}
        # the day latents' decoder directions, projected on the supervised plane: do they make a circle?
        # (only meaningful when every day has its own latent)
        w = sae.W_dec.detach()[[per_day[d] for d in DAYS if d in per_day]]
        pts = w @ sup.basis.T
        entry = {"distinct_latents": len(set(per_day.values())),
                 "norm_in_plane": [float(v) for v in pts.norm(dim=1) / w.norm(dim=1)]}
        if len(set(per_day.values())) == 7:
            fit = fit_circle(pts)
            order = cyclic_order(DAYS, fit.angles)
            entry.update(cyclic_order=order, order_matches=same_cyclic_order(order, DAYS), radius_cv=fit.radius_cv)
        result["day_latent_decoders_in_class_mean_plane"] = entry
    return result


def markdown_table(rows: list[dict]) -> str:
    head = ("| layer | cyclic order | LOCO angle err | probe LOCO err | LOCO err, shuffled order "
            "| held-out-template err | probe held-out-template err | probe LOTO err (per prompt) | radius CV "
            "| class-mean var. in plane |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['layer']} | {'yes' if r['order_matches'] else 'no'} | {r['loco_angle_error']:.3f} | "
        f"{r['probe_loco_angle_error']:.3f} | {r['loco_error_shuffled_order']:.3f} | "
        f"{r['heldout_template_angle_error']:.3f} | {r['probe_heldout_template_angle_error']:.3f} | "
        f"{r['probe_loto_angle_error']:.3f} | {r['radius_cv']:.3f} | {r['top2_explained']:.3f} |\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/features")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layers for part A")
    p.add_argument("--plot-layers", default="6,15,20", help="layers whose projection is plotted and saved")
    p.add_argument("--templates", type=int, default=16, help="prompt templates used in part A (max 16)")
    p.add_argument("--skip-sae", action="store_true", help="run part A only")
    p.add_argument("--sae-layer", type=int, default=15)
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--sae-tokens", type=int, default=400_000, help="training rows (with repetition)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--day-docs", type=int, default=600, help="training documents about weekdays")
    p.add_argument("--corpus-docs", type=int, default=150, help="offline-corpus documents mixed in")
    p.add_argument("--eval-docs", type=int, default=150, help="held-out weekday documents (other names)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--sim-cutoff", type=float, default=0.5)
    p.add_argument("--n-clusters", type=int, default=None,
                   help="spectral clusters (default: the library's, d_sae / 25)")
    p.add_argument("--items", default="days", choices=["days", "months"], help="item family of part A")
    p.add_argument("--min-points", type=int, default=50)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-subspaces", help="save the plotted layers' Subspaces under this folder")
    p.add_argument("--save-sae", help="also save the trained SAE to this folder (not under results/)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.plot_layers = [int(v) for v in args.plot_layers.split(",") if v]
    if args.items != "days" and not args.skip_sae:
        p.error("part B (the SAE) is about weekdays: pass --skip-sae with --items months")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tok = load_model("smollm2-135m", device="cpu")
    result = {"command": recorded_command("experiments/weekday_circle_features.py", argv or sys.argv[1:]),
              "model": "smollm2-135m (embedded GGUF, dequantized Q4_1, fp32, CPU)",
              "note": "CPU shared with other jobs; timings are indicative only"}
    rows = part_a(model, tok, args, out)
    result["class_mean_by_layer"] = rows
    print(markdown_table(rows))
    if not args.skip_sae:
        result["sae_clusters"] = part_b(model, tok, args, out)
        for method, r in result["sae_clusters"]["methods"].items():
            print(f"{method}: {r['n_scored']} clusters scored, {r['n_circles']} flagged as circles, "
                  f"day latents in clusters {r['clusters_with_day_latents']}")
    result["wall_s"] = round(time.time() - t0, 1)
    (out / "weekday_circle_features.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.items}_class_mean_table.md").write_text(markdown_table(rows))
    print(f"wrote {out / 'weekday_circle_features.json'} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
