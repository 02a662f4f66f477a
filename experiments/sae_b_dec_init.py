"""How ``b_dec`` should start: the typical rows' mean, the geometric median or the plain mean, over several seeds.

At equal tokens on the SAE benchmark's setting (TopK, d_sae 9,216, k 32, 200 steps of 1,024 rows, layer 12
of the embedded model), this project's trainer and sparsify's tie on held-out FVU at seed 0. Over seeds
they differ in two ways: a first batch holding a massive activation (a row thousands of times the median's
squared norm) pulls a plain mean several units away, and sparsify starts ``b_dec`` at that mean; this
project started it at the geometric median, which such a row cannot move, but which is not the constant
that reconstructs the other rows best in squared error. The arms:

* ``typical_mean``: the mean of the first batch's rows that are not massive activations
  (:func:`saes.losses.typical_mean`, the rule :func:`saes.losses.input_scale` uses to leave them out);
* ``geometric_median``: Weiszfeld's algorithm on the first batch (the trainer's default before this study);
* ``mean``: the plain mean of the first batch (sparsify's rule);
* ``sparsify``: sparsify's own trainer, as the SAE benchmark runs it (:func:`benchmarks.sae_train.run_sparsify`:
  its ``SparseCoder``, loss and loop, plain-mean ``b_dec``);
* ``sparsify_init`` (layer 20 only, where sparsify ends far above this project): this project's trainer from
  the very weights sparsify starts from (same seed, its ``nn.Linear`` init), plain-mean ``b_dec``: whether
  the gap comes from sparsify's loop or from its initial weights.

Every run of a cell and seed reads the same batches in the same order (the benchmark's loader,
:func:`benchmarks.sae_train.load_batches`, with the seed ordering the training rows; inputs pre-scaled to
``E||x||^2 = d_model``; the cache's last ``2 x batch`` rows held out) with the same Adam learning rate and
schedule (sparsify's rule ``2e-4 / sqrt(d_sae / 16384)``, 1 % warm-up, linear decay over the last 20 %); the
seed also draws the initial weights, the same for every arm of this project. Held-out FVU is the
benchmark's :func:`benchmarks.sae_train.final_fvu`. Each run records whether its first batch holds a massive
activation and how far the three starting points lie from each other.

Cells: the benchmark's batch-1,024 setting on layer 12 (where the tie was seen), its batch-4,096 and
36,864-latent settings, the batch-1,024 setting on layer 20 (a cache this choice was not made on) and
BatchTopK, the other architecture trained with ``b_dec`` free from the first batch. Checks after the choice,
on the other architectures that start ``b_dec`` the same way and on a longer run: the batch-1,024 setting
over 800 steps, and ReLU, JumpReLU (each at its config's default penalty; their held-out L0 is recorded,
since the start may move it) and MP-SAE (32 pursuit steps, its default random atoms; ``b_dec`` is subtracted
before the pursuit) over 200 steps, on layer 12 and on layer 20. Results are written
after every run; a rerun with the same ``--out`` skips what is there.

    python experiments/sae_b_dec_init.py --cache CACHE12 --layer20-cache CACHE20 \
        --out experiments/results/sae_b_dec_init
    (the caches: interp capture --sites blocks.12.hook_resid_post --tokens 850000 --out CACHE12, and the same
    with blocks.20.hook_resid_post and --tokens 400000)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import saes  # noqa: E402
from benchmarks import sae_train as bench  # noqa: E402 - the benchmark's data, sparsify loop and FVU
from interp.atomic import write_json  # noqa: E402
from saes.losses import geometric_median, massive_limit, typical_mean  # noqa: E402
from saes.train_config import default_lr  # noqa: E402
from saes.trainer import TrainConfig, Trainer  # noqa: E402

EVAL_BATCHES = 2
"""Held-out batches (the cache's last rows), as in the benchmark."""
SITES = {12: "blocks.12.hook_resid_post", 20: "blocks.20.hook_resid_post"}
"""The site each cell's layer reads."""
ARMS = ["typical_mean", "geometric_median", "mean"]
"""This project's trainer with each ``TrainConfig.b_dec_init``."""
CELLS = {
    "l12_b1024": dict(layer=12, arch="topk", d_sae=9216, k=32, batch=1024, steps=200, seeds=5, sparsify=True),
    "l20_b1024": dict(layer=20, arch="topk", d_sae=9216, k=32, batch=1024, steps=200, seeds=5, sparsify=True,
                      extra=["sparsify_init"]),
    "l12_b4096": dict(layer=12, arch="topk", d_sae=9216, k=32, batch=4096, steps=50, seeds=5, sparsify=True),
    "l12_d36864": dict(layer=12, arch="topk", d_sae=36864, k=64, batch=1024, steps=200, seeds=3, sparsify=False),
    "l12_batchtopk": dict(layer=12, arch="batchtopk", d_sae=9216, k=32, batch=4096, steps=50, seeds=2,
                          sparsify=False),
    "l12_b1024_long": dict(layer=12, arch="topk", d_sae=9216, k=32, batch=1024, steps=800, seeds=4, sparsify=False),
    # the architectures whose sparsity is not a fixed k (each at its config's default penalty) and MP-SAE
    "l12_relu": dict(layer=12, arch="relu", d_sae=9216, k=None, batch=1024, steps=200, seeds=3, sparsify=False),
    "l12_jumprelu": dict(layer=12, arch="jumprelu", d_sae=9216, k=None, batch=1024, steps=200, seeds=3,
                         sparsify=False),
    "l12_mpsae": dict(layer=12, arch="mpsae", d_sae=9216, k=32, batch=1024, steps=200, seeds=4, sparsify=False),
    "l20_mpsae": dict(layer=20, arch="mpsae", d_sae=9216, k=32, batch=1024, steps=200, seeds=3, sparsify=False),
}


def starting_points(x: torch.Tensor) -> dict:
    """Massive rows in the first batch and the distances between the three starting points."""
    sq = x.float().pow(2).sum(-1)
    big = sq > massive_limit(sq)
    tm, gm, mean = typical_mean(x), geometric_median(x), x.float().mean(0)
    return {"first_batch_massive_rows": int(big.sum()),
            "first_batch_max_over_median_sq_norm": float(sq.max() / sq.median()),
            "dist_typical_mean_geometric_median": float((tm - gm).norm()),
            "dist_mean_geometric_median": float((mean - gm).norm()),
            "dist_mean_typical_mean": float((mean - tm).norm()), "norm_geometric_median": float(gm.norm())}


def sparsity_kwargs(cell: dict) -> dict:
    """The cell's sparsity setting as its architecture's config names it (none for the penalised ones)."""
    if cell["arch"] in ("topk", "batchtopk"):
        return {"k": cell["k"]}
    return {"n_steps": cell["k"]} if cell["arch"] == "mpsae" else {}


def heldout_l0(sae, held) -> float:
    """Mean number of non-zero codes per held-out row, from the same forward the held-out FVU uses."""
    with torch.no_grad():
        return float(torch.cat([(sae(x).codes != 0).sum(-1).float() for x in held]).mean())


def run_interp(train, lr: float, cell: dict, b_dec_init: str, seed: int, sparsify_init: bool = False):
    torch.manual_seed(seed)
    sae = saes.build(cell["arch"], d_model=train[0].shape[-1], d_sae=cell["d_sae"], **sparsity_kwargs(cell))
    if sparsify_init:
        bench.start_from_sparsify(sae, seed)
    n, b = len(train), train[0].shape[0]
    cfg = TrainConfig(total_tokens=n * b, batch_tokens=b, lr=lr, normalize_inputs=False, progress=False,
                      log_every=n, b_dec_init=b_dec_init)
    Trainer(sae, cfg).fit(train)
    return sae


def run_cell(name: str, cell: dict, cache: str, done: dict, save) -> None:
    arms = [*ARMS, *(["sparsify"] if cell["sparsify"] else []), *cell.get("extra", [])]
    for seed in range(cell["seeds"]):
        todo = [a for a in arms if f"{name}/{a}/{seed}" not in done]
        if not todo:
            continue
        bench.SITE = SITES[cell["layer"]]
        train, held, pool = bench.load_batches(cache, cell["batch"], cell["steps"], EVAL_BATCHES, seed)
        lr = default_lr(cell["d_sae"])
        common = {"cell": name, "seed": seed, "site": bench.SITE, "lr": lr, "tokens": cell["batch"] * cell["steps"],
                  **{k: cell[k] for k in ("arch", "d_sae", "k", "batch", "steps")},
                  "distinct_training_rows": pool, "held_out_rows": sum(x.shape[0] for x in held),
                  **starting_points(train[0])}
        for arm in todo:
            t0 = time.perf_counter()
            extra = {}
            if arm == "sparsify":
                recon = bench.run_sparsify(train, lr, cell["k"], cell["d_sae"], "cpu", bench.Timer(), seed)
            else:
                sae = (run_interp(train, lr, cell, "mean", seed, sparsify_init=True) if arm == "sparsify_init"
                       else run_interp(train, lr, cell, arm, seed))
                recon = lambda x, m=sae: m(x).x_hat  # noqa: E731
                extra["heldout_l0"] = heldout_l0(sae, held)
            row = {**common, "arm": arm, "heldout_fvu": bench.final_fvu(recon, held), **extra}
            done[f"{name}/{arm}/{seed}"] = row
            print(f"{name:14s} seed {seed} {arm:17s} held-out FVU {row['heldout_fvu']:.5f} "
                  f"(first batch: {row['first_batch_massive_rows']} massive; {time.perf_counter() - t0:.0f} s)",
                  flush=True)
            save()


def summarize(runs: dict) -> dict:
    """Per cell: each arm's held-out FVU by seed, its mean (and its mean held-out L0 where every run recorded
    one), and against ``typical_mean`` the per-seed differences (other minus ``typical_mean``: > 0 means
    ``typical_mean`` reconstructs better), their mean and standard error, and the seeds where ``typical_mean``
    is at or below the other arm."""
    out = {}
    for name in CELLS:
        rows = [r for r in runs.values() if r["cell"] == name]
        if not rows:
            continue
        by_arm: dict[str, dict[int, float]] = {}
        for r in rows:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r["heldout_fvu"]
        cell = {"heldout_fvu_by_seed": {a: {str(s): v for s, v in sorted(d.items())} for a, d in by_arm.items()},
                "mean_heldout_fvu": {a: statistics.mean(d.values()) for a, d in by_arm.items()},
                "mean_heldout_l0": {a: statistics.mean(r["heldout_l0"] for r in rows if r["arm"] == a)
                                    for a in by_arm if all("heldout_l0" in r for r in rows if r["arm"] == a)},
                "seeds_with_massive_first_batch": sorted({r["seed"] for r in rows if r["first_batch_massive_rows"]}),
                "vs_typical_mean": {}}
        ref = by_arm.get("typical_mean", {})
        for arm, d in by_arm.items():
            seeds = sorted(set(d) & set(ref))
            if arm == "typical_mean" or not seeds:
                continue
            diff = [d[s] - ref[s] for s in seeds]
            cell["vs_typical_mean"][arm] = {
                "other_minus_typical_mean_per_seed": diff, "mean": statistics.mean(diff),
                "standard_error": statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else None,
                "seeds_typical_mean_at_or_below": sum(v >= 0 for v in diff), "seeds": seeds}
        out[name] = cell
    return out


PANELS_PER_ROW = 5
"""The plot's panels (one per cell) wrap after this many."""
COLORS = {"geometric_median": "C1", "mean": "C2", "sparsify": "C3", "sparsify_init": "C4"}
"""One colour per arm in every panel."""


def plot(summary: dict, path: Path) -> None:
    """Per cell, every arm's held-out FVU minus ``typical_mean``'s at each seed (symmetric-log scale: the
    peer's gaps on layer 20 are 100x the others'); seeds whose first batch holds a massive row are shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary)
    cols = min(PANELS_PER_ROW, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.4 * cols, 3.4 * rows))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ref = summary[name]["heldout_fvu_by_seed"].get("typical_mean", {})
        shown = [0.0]
        for arm, d in summary[name]["heldout_fvu_by_seed"].items():
            seeds = [s for s in d if s in ref]
            if arm == "typical_mean" or not seeds:
                continue
            diff = [d[s] - ref[s] for s in seeds]
            shown += diff
            marker = "x" if arm == "sparsify_init" else "o"
            ax.plot([int(s) for s in seeds], diff, marker, color=COLORS.get(arm, "k"), label=arm, ls="none")
        for s in summary[name]["seeds_with_massive_first_batch"]:
            ax.axvspan(s - 0.4, s + 0.4, color="0.9", zorder=0)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(min(-2e-4, 3 * min(shown)), max(2e-4, 3 * max(shown)))  # no point on the frame
        ax.set_xticks(range(len(ref)))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("seed (grey: massive row in the first batch)", fontsize=7)
        ax.legend(fontsize=6)
        if i % cols == 0:
            ax.set_ylabel("held-out FVU minus typical_mean's")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="cache folder holding blocks.12.hook_resid_post")
    p.add_argument("--layer20-cache", help="cache folder holding blocks.20.hook_resid_post (the layer-20 cell)")
    p.add_argument("--out", required=True, help="folder for results.json and the plot")
    p.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=list(CELLS), help="cells to run")
    p.add_argument("--shrink", type=int, default=1,
                   help="divide every cell's d_sae, batch and steps by this (for a quick check; not the study)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    runs = bench.done_runs(path, args.shrink)
    caches = {12: args.cache, 20: args.layer20_cache}

    def save() -> dict:
        res = {"shrink": args.shrink, "arms": ARMS, "cells": CELLS, "runs": runs, "summary": summarize(runs),
               "command": bench.recorded_command("experiments/sae_b_dec_init.py",
                                                 sys.argv[1:] if argv is None else argv)}
        write_json(path, res)
        return res

    for name in args.cells:
        cell = CELLS[name]
        if caches[cell["layer"]] is None:
            flag = "--cache" if cell["layer"] == 12 else "--layer20-cache"
            raise SystemExit(f"cell {name} reads layer {cell['layer']}: pass {flag}")
        shrunk = dict(cell, d_sae=cell["d_sae"] // args.shrink, batch=cell["batch"] // args.shrink,
                      steps=max(2, cell["steps"] // args.shrink))
        before = set(runs)
        run_cell(name, shrunk, caches[cell["layer"]], runs, save)
        for key in set(runs) - before:  # each run records the invocation that made it ("command": the last one)
            runs[key]["command"] = bench.recorded_command("experiments/sae_b_dec_init.py",
                                                          sys.argv[1:] if argv is None else argv)
        save()
    res = save()
    if res["summary"]:
        plot(res["summary"], out / "heldout_fvu_vs_typical_mean.png")
    print(json.dumps(res["summary"], indent=1))
    return res


if __name__ == "__main__":
    main()
