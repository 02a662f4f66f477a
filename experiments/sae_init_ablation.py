"""Why the TopK trainer learned less per token than sparsify: one factor at a time, held-out FVU at equal tokens.

Every run reads the same cached activations (layer 12 ``hook_resid_post`` of the embedded model), in
the same order, through the SAE benchmark's own loader (:func:`benchmarks.sae_train.load_batches`:
inputs pre-scaled to ``E||x||^2 = d_model``, the cache's last ``2 * batch`` rows held out), with the
same Adam learning rate (``2e-4 / sqrt(d_sae / 16384)``, the trainer's default rule) and schedule
(1 % warm-up, linear decay over the last 20 %). Held-out FVU is the benchmark's
:func:`benchmarks.sae_train.final_fvu`; sparsify runs through the benchmark's own
:func:`benchmarks.sae_train.run_sparsify` (its ``SparseCoder``, loss and loop).

Arms of this project's trainer (:class:`saes.Trainer`, TopK), each changing one thing from the
defaults it had before this study (``enc_init_scale = 1``, geometric-median ``b_dec``, AuxK 1/32 with
a 10M-token dead window):

* ``scale=S``: the encoder starts as ``S * W_dec.T`` (``TopKConfig.enc_init_scale``); ``S`` is 1, 0.3,
  0.1 and sparsify's, measured here on a freshly built ``SparseCoder`` (the mean norm of its encoder
  rows, ``nn.Linear``'s default uniform init, over its unit decoder rows);
* ``sparsify_weights``: the very weights sparsify starts from (same seed), copied into our SAE;
* ``b_dec=mean`` (sparsify's ``b_dec`` init), ``lr x0.5`` / ``lr x2``, and AuxK with a short dead
  window (``dead_tokens``) at two weights (with the 10M-token window no latent can be dead within
  these runs, so AuxK's weight cannot matter there).

Cells (``d_sae``, ``k``, batch, steps) change one setting at a time from the base cell (9,216, 32,
4,096, 50). Results are written after every run; a rerun with the same ``--out`` skips runs already
there.

    python experiments/sae_init_ablation.py --cache DIR --out experiments/results/sae_init_ablation
    (write the cache with: interp capture --sites blocks.12.hook_resid_post --tokens 250000 --out DIR)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import saes  # noqa: E402
from benchmarks import sae_train as bench  # noqa: E402 - the benchmark's data, sparsify loop and FVU
from interp.atomic import write_json  # noqa: E402
from saes.trainer import TrainConfig, Trainer  # noqa: E402

EVAL_BATCHES = 2
"""Held-out batches (the cache's last rows), as in the benchmark."""
SPARSIFY = "sparsify"
"""Stands for sparsify's measured encoder scale in the arm lists below."""
SCALES = (1.0, SPARSIFY, 0.3)
BASE = dict(d_sae=9216, k=32, batch=4096, steps=50)
CELLS = {
    "base": dict(BASE, arms=[*SCALES, 0.1, "sparsify_weights", "b_dec=mean", "lr x0.5", "lr x2",
                             (1.0, "lr x0.5"), (1.0, "lr x2")]),
    "k64": dict(BASE, k=64, arms=list(SCALES)),
    "batch1024": dict(BASE, batch=1024, arms=list(SCALES)),
    "steps200": dict(BASE, steps=200, arms=list(SCALES)),
    "batch1024_steps200": dict(BASE, batch=1024, steps=200,
                               arms=[*SCALES, "auxk 1/32 dead 20480", "auxk 1/8 dead 20480"]),
    "d36864_k64_steps8": dict(BASE, d_sae=36864, k=64, steps=8, arms=list(SCALES)),
    "d36864": dict(BASE, d_sae=36864, arms=list(SCALES)),
    "d36864_k64_batch1024_steps200": dict(BASE, d_sae=36864, k=64, batch=1024, steps=200, arms=list(SCALES)),
}
"""Each cell: its settings and this project's arms (a scale, a named factor at sparsify's scale, or
``(scale, factor)``); sparsify itself runs in every cell."""


def sparsify_enc_scale(d_model: int, d_sae: int) -> float:
    """Mean ratio of encoder-row norm to decoder-row norm in a ``SparseCoder`` as sparsify builds it."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sc = SparseCoder(d_model, SparseCoderConfig(num_latents=d_sae, k=1), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return float((sc.encoder.weight.norm(dim=1) / sc.W_dec.norm(dim=1)).mean())


def default_lr(d_sae: int) -> float:
    """The trainer's default learning rate (``TrainConfig.lr=None``), also used for sparsify."""
    return 2e-4 / math.sqrt(d_sae / 16384)


def arm_settings(arm, sp_scale: float) -> dict:
    """A readable arm spec -> the settings it changes."""
    scale, factor = (arm if isinstance(arm, tuple) else
                     (arm, None) if isinstance(arm, float) or arm == SPARSIFY else (SPARSIFY, arm))
    s = {"enc_init_scale": sp_scale if scale == SPARSIFY else float(scale), "lr_mult": 1.0,
         "b_dec_init": "geometric_median", "aux_coeff": 1 / 32, "dead_tokens": 10_000_000, "weights": "ours"}
    if factor == "sparsify_weights":
        s["weights"], s["enc_init_scale"] = "sparsify", None
    elif factor == "b_dec=mean":
        s["b_dec_init"] = "mean"
    elif factor is not None and factor.startswith("lr x"):
        s["lr_mult"] = float(factor[4:])
    elif factor is not None and factor.startswith("auxk "):
        coeff, _, dead = factor[5:].split()
        num, den = coeff.split("/")
        s["aux_coeff"], s["dead_tokens"] = int(num) / int(den), int(dead)
    elif factor is not None:
        raise ValueError(f"unknown arm factor {factor!r}")
    return s


def arm_name(arm) -> str:
    """``scale=1``, ``scale=sparsify``, ``scale=sparsify lr x2``, ``scale=1 lr x2``, ``sparsify_weights``;
    ``sparsify`` is sparsify's own trainer."""
    if isinstance(arm, tuple):
        return f"scale={arm[0]:g} {arm[1]}"
    if isinstance(arm, float):
        return f"scale={arm:g}"
    if arm in (SPARSIFY, "sparsify_weights"):
        return "scale=sparsify" if arm == SPARSIFY else arm
    return f"scale=sparsify {arm}"


def run_interp(train, lr: float, k: int, d_sae: int, s: dict, log_every: int):
    torch.manual_seed(0)
    d = train[0].shape[-1]
    kw = {} if s["enc_init_scale"] is None else {"enc_init_scale": s["enc_init_scale"]}
    sae = saes.build("topk", d_model=d, d_sae=d_sae, k=k, aux_coeff=s["aux_coeff"], **kw)
    if s["weights"] == "sparsify":  # the weights sparsify starts from (its seed and construction, as the benchmark's)
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        sc = SparseCoder(d, SparseCoderConfig(num_latents=d_sae, k=k), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            sae.W_enc.copy_(sc.encoder.weight.T)
            sae.b_enc.copy_(sc.encoder.bias)
            sae.W_dec.copy_(sc.W_dec)
    n, b = len(train), train[0].shape[0]
    cfg = TrainConfig(total_tokens=n * b, batch_tokens=b, lr=lr, normalize_inputs=False, progress=False,
                      log_every=log_every, b_dec_init=s["b_dec_init"], dead_tokens=s["dead_tokens"])
    tr = Trainer(sae, cfg).fit(train)
    curve = [{"step": e["step"], "train_fvu": e[""]["fvu"], "dead": e[""]["dead"]} for e in tr.history_]
    return sae, curve


@torch.no_grad()
def fired_fraction(sae, held) -> float:
    """Fraction of latents active on at least one held-out row."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for x in held:
        for part in x.split(1024):
            fired |= (sae.encode(part) > 0).any(0)
    return float(fired.float().mean())


def run_cell(name: str, cell: dict, cache: str, sp_scale: float, done: dict, save) -> None:
    d_sae, k, batch, steps = cell["d_sae"], cell["k"], cell["batch"], cell["steps"]
    todo = [a for a in [None, *cell["arms"]] if f"{name}/{'sparsify' if a is None else arm_name(a)}" not in done]
    if not todo:
        return
    train, held, pool = bench.load_batches(cache, batch, steps, EVAL_BATCHES)
    lr = default_lr(d_sae)
    common = {"cell": name, "d_sae": d_sae, "k": k, "batch": batch, "steps": steps, "tokens": batch * steps,
              "distinct_training_rows": pool, "held_out_rows": sum(x.shape[0] for x in held)}
    for arm in todo:
        t0 = time.perf_counter()
        if arm is None:  # sparsify's own trainer
            _, recon = bench.run_sparsify(train, lr, k, d_sae)
            row = {**common, "arm": "sparsify", "library": "sparsify", "lr": lr,
                   "heldout_fvu": bench.final_fvu(recon, held)}
        else:
            s = arm_settings(arm, sp_scale)
            sae, curve = run_interp(train, lr * s["lr_mult"], k, d_sae, s, log_every=max(1, steps // 10))
            row = {**common, "arm": arm_name(arm), "library": "interp", "lr": lr * s["lr_mult"], **s,
                   "only_scale_changed": isinstance(arm, float) or arm == SPARSIFY,
                   "heldout_fvu": bench.final_fvu(lambda x, m=sae: m(x).x_hat, held),
                   "heldout_fired_fraction": fired_fraction(sae, held), "train_curve": curve}
        done[f"{name}/{row['arm']}"] = row
        print(f"{name:32s} {row['arm']:28s} held-out FVU {row['heldout_fvu']:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        save()


def summarize(runs: dict) -> dict:
    out = {}
    for name in CELLS:
        rows = {r["arm"]: r for key, r in runs.items() if r["cell"] == name}
        if not rows:
            continue
        scales = {r["enc_init_scale"]: r["heldout_fvu"] for r in rows.values() if r.get("only_scale_changed")}
        cell = {"heldout_fvu_by_enc_init_scale": {f"{s:.4g}": v for s, v in sorted(scales.items(), reverse=True)},
                "sparsify": rows["sparsify"]["heldout_fvu"] if "sparsify" in rows else None,
                "other_arms": {a: r["heldout_fvu"] for a, r in rows.items()
                               if r["library"] == "interp" and not r["only_scale_changed"]}}
        if scales:
            best = min(scales, key=scales.get)
            cell["best_scale"] = best
            if cell["sparsify"] is not None:
                cell["interp_minus_sparsify"] = {f"{s:.4g}": v - cell["sparsify"] for s, v in scales.items()}
        out[name] = cell
    return out


def plot(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in summary if summary[n]["heldout_fvu_by_enc_init_scale"]]
    fig = Figure(figsize=(3.2 * len(names), 3.2))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        pts = sorted((float(s), v) for s, v in summary[name]["heldout_fvu_by_enc_init_scale"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="this project")
        if summary[name]["sparsify"] is not None:
            ax.axhline(summary[name]["sparsify"], color="C1", ls="--", label="sparsify")
        ax.set_xscale("log")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("enc_init_scale")
        if i == 0:
            ax.set_ylabel("held-out FVU")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="cache folder holding blocks.12.hook_resid_post")
    p.add_argument("--out", required=True, help="folder for results.json and the plot")
    p.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=list(CELLS), help="cells to run")
    p.add_argument("--shrink", type=int, default=1,
                   help="divide every cell's d_sae, batch and steps by this (for a quick check; not the study)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if old and old.get("shrink") != args.shrink:
        raise SystemExit(f"{path} was written with --shrink {old.get('shrink')}; use another --out")
    runs: dict = old.get("runs", {})
    cells = {n: dict(c, d_sae=c["d_sae"] // args.shrink, batch=c["batch"] // args.shrink,
                     steps=max(2, c["steps"] // args.shrink)) for n, c in CELLS.items()}
    d_model = None

    def save():
        summary = summarize(runs)
        write_json(path, {"experiment": "sae_init_ablation", "site": bench.SITE, "shrink": args.shrink,
                          "d_model": d_model, "sparsify_enc_init_scale_measured": sp_scale,
                          "nn_linear_row_norm_expected": 3 ** -0.5, "eval_batches": EVAL_BATCHES,
                          "cells": {n: {**c, "arms": [arm_name(a) for a in c["arms"]]} for n, c in cells.items()},
                          "command": " ".join(["python", "experiments/sae_init_ablation.py", *(argv or sys.argv[1:])]),
                          "summary": summary, "runs": runs})

    from interp.cache import CachedActivations

    d_model = CachedActivations(args.cache, batch_tokens=1, sites=[bench.SITE]).d_models[bench.SITE]
    sp_scale = sparsify_enc_scale(d_model, cells["base"]["d_sae"])
    print(f"sparsify's encoder starts at {sp_scale:.4f} x its unit decoder rows (1/sqrt(3) = {3 ** -0.5:.4f})")
    for name in args.cells:
        run_cell(name, cells[name], args.cache, sp_scale, runs, save)
    save()
    result = json.loads(path.read_text())
    plot(result["summary"], out / "heldout_fvu_by_scale.png")
    return result


if __name__ == "__main__":
    main()
