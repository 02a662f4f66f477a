"""Which learning rate the TopK trainer should default to: held-out FVU at equal tokens over a grid of
rates, training lengths, widths and batch sizes, chosen on one layer and checked on another.

The trainer's rule was sparsify's, ``lr = 2e-4 / sqrt(d_sae / 16384)``, which sparsify tunes for its own
batches of 32 x 2,048 tokens. Every run here multiplies that rule by a factor (``x1`` is the old
default) and changes nothing else: TopK with the trainer's defaults, the same batches in the same order
(a fixed permutation of the cache per pass), the same schedule (1 % warm-up, linear decay over the last
20 %; the cells named ``*_decay50`` decay over the last 50 %, the ``*_200st`` ones run 200 steps whatever
the cache's size). The last :data:`HELD_OUT` rows of each cache are never trained on; the held-out FVU
(:func:`benchmarks.sae_train.final_fvu`) is measured on the held-out rows that are not massive activations
(squared norm over :data:`saes.losses.MASSIVE_ROW` x the median; on the embedded model's layer 12 ~120
rows in 786k sit far above it and hold ~85 % of the variance, so an FVU over every row measures mostly
them): at :data:`CURVE_POINTS` points during the run on the first 8,192 of them, at its end on all of
them, so each run also gives the time-free shape of its curve; the FVU over every held-out row is
recorded beside the final one.

Cells of kind ``tune`` read ``--tune-cache`` (the rule is chosen on them); cells of kind ``check`` read
``--check-cache``, another layer, and test the chosen factor there. A pass over the cache is one epoch;
the longer cells repeat the cache (a published SAE sees each token once, over far more tokens than this
corpus holds, so the three-epoch cell is the nearest to a realistic length that fits here, and the
held-out rows keep repetition from flattering the result). Each run is written to ``OUT/runs/`` when it
ends; a rerun skips the runs already there, and several processes can share one ``--out`` with
different ``--cells``.

    interp capture --sites blocks.12.hook_resid_post --tokens 850000 --out C12
    interp capture --sites blocks.20.hook_resid_post --tokens 400000 --out C20
    python experiments/sae_lr_rule.py --tune-cache C12 --check-cache C20 --out experiments/results/sae_lr_rule
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import saes  # noqa: E402
from benchmarks import sae_train as bench  # noqa: E402 - the benchmark's held-out FVU and command record
from interp.atomic import write_json  # noqa: E402
from saes.losses import input_scale, massive_limit  # noqa: E402
from saes.train_config import default_lr  # noqa: E402
from saes.trainer import TrainConfig, Trainer  # noqa: E402

PEER = "sparsify-signum"
"""The arm that runs sparsify at every default of its own (its optimizer is not Adam: see the benchmark)."""
HELD_OUT = 32768
"""Rows at the end of each cache that no run trains on."""
CURVE_POINTS = 8
"""Held-out FVU points during a run (besides the final one)."""
BASE = dict(kind="tune", d_sae=9216, k=32, batch=4096, epochs=1.0, mults=[1, 2, 4, 8, PEER])
CELLS = {
    "d9216_b4096_1ep": dict(BASE, mults=[1, 2, 4, 8, 16, PEER]),
    "d9216_b4096_3ep": dict(BASE, epochs=3.0, mults=[1, 2, 4, 8, PEER]),
    "d36864_k64_b4096_half": dict(BASE, d_sae=36864, k=64, epochs=0.5, mults=[1, 2, 4]),
    "d9216_b1024_1ep": dict(BASE, batch=1024),
    "d2304_b4096_1ep": dict(BASE, d_sae=2304, mults=[1, 2, 4, 8]),
    "check_d9216_b4096_1ep": dict(BASE, kind="check", mults=[1, 2, 4, PEER]),
    # short runs and a longer decay: where sparsify's defaults lead (200 steps of 1,024), and what that
    # costs at one pass; decay_frac is the fraction of steps of the final linear decay (the trainer's 0.2)
    "d9216_b1024_200st": dict(BASE, batch=1024, steps=200, mults=[4, 8, PEER]),
    "d9216_b1024_200st_decay50": dict(BASE, batch=1024, steps=200, decay_frac=0.5, mults=[4, 8]),
    "d9216_b1024_1ep_decay50": dict(BASE, batch=1024, decay_frac=0.5, mults=[4, 8]),
    "d9216_b4096_1ep_decay50": dict(BASE, decay_frac=0.5, mults=[4, 8]),
    "check_d9216_b1024_200st": dict(BASE, kind="check", batch=1024, steps=200, mults=[4, 8, PEER]),
    "check_d9216_b1024_200st_decay50": dict(BASE, kind="check", batch=1024, steps=200, decay_frac=0.5, mults=[8]),
    "check_d9216_b1024_1ep": dict(BASE, kind="check", batch=1024, mults=[4, 8, PEER]),
    "check_d9216_b1024_1ep_decay50": dict(BASE, kind="check", batch=1024, decay_frac=0.5, mults=[8]),
}
"""Each cell's data (``tune`` or ``check`` cache), SAE width and k, batch rows, length in passes over
the training rows (or ``steps``), the schedule's ``decay_frac`` where it is not the trainer's, and the
factors of the old rule it runs (:data:`PEER`: sparsify at its own defaults,
the reference for what a user of the best peer gets out of the box)."""


def old_rule(d_sae: int) -> float:
    """The trainer's learning rate before this study (sparsify's Adam rule): the base TopK now multiplies by 4."""
    return default_lr(d_sae)


def load_rows(cache: str, held_out: int = HELD_OUT, read: int = 4096) -> tuple[str, torch.Tensor, dict]:
    """(site, training rows, held-out sets): every row of the cache's one site and the last ``held_out``
    rows held out, as batches of 4,096: ``typical`` (squared norm at most ``MASSIVE_ROW`` x the training
    rows' median) and ``all``. Rows are scaled so that ``E||x||^2 = d_model`` over the typical training rows."""
    from interp.cache import CachedActivations

    src = CachedActivations(cache, batch_tokens=read, seed=0, epochs=1)  # whole batches of ``read`` rows
    if len(src.sites) != 1:
        raise SystemExit(f"{cache} holds sites {src.sites}; this study reads a cache of one site")
    site = src.sites[0]
    rows = torch.cat([b[site].float() for b in src])
    if rows.shape[0] < 4 * held_out:
        raise SystemExit(f"{cache} holds {rows.shape[0]} rows; this study needs at least {4 * held_out}")
    sq = rows.pow(2).sum(-1)
    limit = massive_limit(sq[:-held_out])
    rows *= input_scale(rows[:-held_out])  # the trainer's estimate, over every training row
    held, typical = rows[-held_out:], sq[-held_out:] <= limit
    return site, rows[:-held_out], {"typical": list(held[typical].split(4096)), "all": list(held.split(4096)),
                                    "massive_held_out": int((~typical).sum()),
                                    "massive_training": int((sq[:-held_out] > limit).sum())}


def cell_steps(cell: dict, pool: torch.Tensor) -> int:
    """A cell's optimizer steps: its ``steps``, else ``epochs`` passes over ``pool`` (at least 2)."""
    return cell.get("steps") or max(2, int(cell["epochs"] * pool.shape[0]) // cell["batch"])


def batches(pool: torch.Tensor, batch: int, steps: int):
    """``steps`` batches of ``batch`` rows: a new fixed permutation of ``pool`` per pass (seed 0)."""
    g = torch.Generator().manual_seed(0)
    order, pos = torch.randperm(pool.shape[0], generator=g), 0
    for _ in range(steps):
        if pos + batch > pool.shape[0]:
            order, pos = torch.randperm(pool.shape[0], generator=g), 0
        yield pool[order[pos:pos + batch]]
        pos += batch


def run(cell: dict, mult: float, pool: torch.Tensor, held: list) -> dict:
    steps = cell_steps(cell, pool)
    every = max(1, steps // CURVE_POINTS)
    torch.manual_seed(0)
    sae = saes.build("topk", d_model=pool.shape[-1], d_sae=cell["d_sae"], k=cell["k"])
    lr = old_rule(cell["d_sae"]) * mult
    curve: list[dict] = []

    def source():
        for i, x in enumerate(batches(pool, cell["batch"], steps)):
            if i and i % every == 0:
                curve.append({"step": i, "tokens": i * cell["batch"],
                              "heldout_fvu": bench.heldout_fvu(sae, lambda v: sae(v).x_hat, held["typical"][:2])})
            yield x

    cfg = TrainConfig(total_tokens=steps * cell["batch"], batch_tokens=cell["batch"], lr=lr, normalize_inputs=False,
                      progress=False, log_every=every, **{k: cell[k] for k in ("decay_frac",) if k in cell})
    t0 = time.perf_counter()
    tr = Trainer(sae, cfg).fit(source())
    seconds = time.perf_counter() - t0
    final = bench.heldout_fvu(sae, lambda v: sae(v).x_hat, held["typical"])
    curve.append({"step": steps, "tokens": steps * cell["batch"], "heldout_fvu": final})
    last = tr.history_[-1][""] if tr.history_ else {}
    return {"lr_mult": mult, "lr": lr, "steps": steps, "tokens": steps * cell["batch"], "heldout_fvu": final,
            "heldout_fvu_all_rows": bench.heldout_fvu(sae, lambda v: sae(v).x_hat, held["all"]),
            "final_train_fvu": last.get("fvu"), "final_dead": last.get("dead"), "curve": curve,
            "seconds_with_evaluation": seconds}


class _Batches:
    """:func:`batches` as the sequence the benchmark's runners read (its first item, its length, iteration)."""

    def __init__(self, pool: torch.Tensor, batch: int, steps: int):
        self.pool, self.batch, self.steps = pool, batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> torch.Tensor:
        if i != 0:
            raise IndexError(i)
        return next(batches(self.pool, self.batch, 1))

    def __iter__(self):
        return batches(self.pool, self.batch, self.steps)


def run_peer(cell: dict, pool: torch.Tensor, held: list) -> dict:
    """sparsify with every default of its own (:func:`benchmarks.sae_train.run_sparsify_signum`), same batches."""
    steps = cell_steps(cell, pool)
    every = max(1, steps // CURVE_POINTS)
    timer = bench.Timer(steps, every, held["typical"][:2], cell["batch"])
    t0 = time.perf_counter()
    data = _Batches(pool, cell["batch"], steps)
    recon = bench.run_sparsify_signum(data, None, cell["k"], cell["d_sae"], "cpu", timer)
    seconds = time.perf_counter() - t0
    final = bench.final_fvu(recon, held["typical"])
    curve = [{"step": c["step"], "tokens": c["tokens"], "heldout_fvu": c["heldout_fvu"]} for c in timer.curve
             if c["step"] > 0] + [{"step": steps, "tokens": steps * cell["batch"], "heldout_fvu": final}]
    return {"lr_mult": PEER, "lr": timer.lr_used, "steps": steps, "tokens": steps * cell["batch"],
            "heldout_fvu": final, "heldout_fvu_all_rows": bench.final_fvu(recon, held["all"]), "curve": curve,
            "seconds_with_evaluation": seconds}


def summarize(runs: dict, cells: dict) -> dict:
    out = {}
    for name, cell in cells.items():
        rows = {r["lr_mult"]: r for r in runs.values() if r["cell"] == name}
        ours = {m: rows[m]["heldout_fvu"] for m in sorted(m for m in rows if m != PEER)}
        if not rows:
            continue
        first = next(iter(rows.values()))
        cell_out = {"kind": cell["kind"], "site": first["site"], "tokens": first["tokens"],
                    "heldout_fvu_by_lr_mult": {f"x{m:g}": v for m, v in ours.items()},
                    PEER: rows[PEER]["heldout_fvu"] if PEER in rows else None,
                    "heldout_fvu_all_rows_by_arm": {(a if a == PEER else f"x{a:g}"): r["heldout_fvu_all_rows"]
                                                    for a, r in sorted(rows.items(), key=lambda t: str(t[0]))}}
        if ours:
            cell_out["best_lr_mult"] = min(ours, key=ours.get)
        if 1 in ours:
            cell_out["relative_change_vs_x1"] = {f"x{m:g}": v / ours[1] - 1 for m, v in ours.items()}
        out[name] = cell_out
    return out


def plot(runs: dict, summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary)
    ncol = min(len(names), 5)  # cells side by side; below its final-FVU panel, each cell's curves
    nblock = -(-len(names) // ncol)
    fig = Figure(figsize=(3.4 * ncol, 5.6 * nblock))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        block, col = divmod(i, ncol)
        top = fig.add_subplot(2 * nblock, ncol, 2 * block * ncol + col + 1)
        bottom = fig.add_subplot(2 * nblock, ncol, (2 * block + 1) * ncol + col + 1)
        pts = sorted((float(m[1:]), v) for m, v in summary[name]["heldout_fvu_by_lr_mult"].items())
        top.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="this project (Adam)")
        if summary[name][PEER] is not None:
            top.axhline(summary[name][PEER], color="C3", ls="--", label="sparsify, its defaults")
        if i == 0:
            top.legend(fontsize=6)
        top.set_xscale("log", base=2)
        top.set_title(f"{name}\n{summary[name]['site']}", fontsize=7)
        top.set_xlabel("learning rate / old rule", fontsize=7)
        for r in sorted((r for r in runs.values() if r["cell"] == name), key=lambda r: str(r["lr_mult"]).zfill(4)):
            peer = r["lr_mult"] == PEER
            bottom.plot([c["tokens"] for c in r["curve"]], [c["heldout_fvu"] for c in r["curve"]],
                        "--" if peer else ".-", color="C3" if peer else None,
                        label="sparsify" if peer else f"x{r['lr_mult']:g}")
        bottom.set_xlabel("tokens", fontsize=7)
        bottom.set_yscale("log")
        bottom.set_ylim(top=min(1.0, bottom.get_ylim()[1]))
        if col == 0:
            top.set_ylabel("final held-out FVU", fontsize=7)
            bottom.set_ylabel("held-out FVU", fontsize=7)
        bottom.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tune-cache", required=True, help="cache of one site: the rule is chosen on it")
    p.add_argument("--check-cache", help="cache of another site: the check cells run on it")
    p.add_argument("--out", required=True, help="folder for runs/, results.json and the plot")
    p.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=list(CELLS), help="cells to run")
    p.add_argument("--arms", nargs="+", help=f"run only these arms of each cell's (factors such as 2, or {PEER})")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--shrink", type=int, default=1,
                   help="divide every cell's d_sae, batch and held-out rows by this (a quick check; not the study)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cells = {n: dict(c, d_sae=c["d_sae"] // args.shrink, batch=c["batch"] // args.shrink) for n, c in CELLS.items()}
    loaded: dict[str, tuple] = {}
    for name in args.cells:
        cell = cells[name]
        cache = args.tune_cache if cell["kind"] == "tune" else args.check_cache
        if cache is None:
            raise SystemExit(f"cell {name} reads --check-cache; give it or leave the cell out")
        for mult in cell["mults"]:
            if args.arms and str(mult) not in args.arms:
                continue
            path = out / "runs" / (f"{name}_{mult}.json" if mult == PEER else f"{name}_x{mult:g}.json")
            if path.exists():
                continue
            if cache not in loaded:
                loaded = {cache: load_rows(cache, HELD_OUT // args.shrink, 4096 // args.shrink)}  # one at a time
            site, pool, held = loaded[cache]
            row = {"cell": name, **{k: v for k, v in cell.items() if k != "mults"}, "site": site,
                   "shrink": args.shrink, "training_rows": pool.shape[0], "held_out_rows": HELD_OUT // args.shrink,
                   "massive_rows_held_out": held["massive_held_out"], "massive_rows_training": held["massive_training"],
                   "torch_threads": torch.get_num_threads(),
                   # the invocation that made this run (results.json's "command" is the last one)
                   "command": bench.recorded_command("experiments/sae_lr_rule.py", argv or sys.argv[1:]),
                   **(run_peer(cell, pool, held) if mult == PEER else run(cell, mult, pool, held))}
            write_json(path, row)
            print(f"{name:28s} {mult!s:<8} held-out FVU {row['heldout_fvu']:.4f} "
                  f"({row['seconds_with_evaluation']:.0f} s)", flush=True)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}
    if any(r["shrink"] != args.shrink for r in runs.values()):
        raise SystemExit(f"{out} holds runs of another --shrink; use another --out")
    summary = summarize(runs, cells)
    result = {"experiment": "sae_lr_rule", "old_rule": "2e-4 / sqrt(d_sae / 16384)", "held_out_rows": HELD_OUT,
              "cells": cells, "command": bench.recorded_command("experiments/sae_lr_rule.py", argv or sys.argv[1:]),
              "summary": summary}
    write_json(out / "results.json", result)
    plot(runs, summary, out / "heldout_fvu_by_lr.png")
    return result


if __name__ == "__main__":
    main()
