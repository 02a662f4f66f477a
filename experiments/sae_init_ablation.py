"""Why the TopK trainer learned less per token than sparsify: one factor at a time, held-out FVU at equal tokens.

Every run reads the same cached activations (layer 12 ``hook_resid_post`` of the embedded model), in
the same order, through the SAE benchmark's own loader (:func:`benchmarks.sae_train.load_batches`:
inputs pre-scaled to ``E||x||^2 = d_model``, the cache's last ``2 * batch`` rows held out), with the
same Adam learning rate (``2e-4 / sqrt(d_sae / 16384)``, the trainer's default rule then) and schedule
(1 % warm-up, linear decay over the last 20 %). Held-out FVU is the benchmark's
:func:`benchmarks.sae_train.final_fvu`; sparsify runs through the benchmark's own
:func:`benchmarks.sae_train.run_sparsify` (its ``SparseCoder``, loss and loop).

Arms of this project's trainer (:class:`saes.Trainer`), each changing one thing from the defaults
it had before this study (TopK, ``enc_init_scale = 1``, geometric-median ``b_dec``, AuxK 1/32 with a
10M-token dead window); see :data:`CELLS` for the spelling:

* ``scale=S``: the encoder starts as ``S * W_dec.T`` (``enc_init_scale``); ``S`` is 1, 0.3, 0.1 and
  sparsify's, measured here on a freshly built ``SparseCoder`` (the mean norm of its encoder rows,
  ``nn.Linear``'s default uniform init, over its unit decoder rows);
* ``init=sparsify``: the very weights sparsify starts from (same seed), copied into our SAE;
* ``b_dec=mean`` (sparsify's ``b_dec`` init), ``lr=x0.5`` / ``lr=x2``, and AuxK with a short dead
  window at two weights (with the 10M-token window no latent can be dead within these runs, so
  AuxK's weight cannot matter there);
* ``arch=batchtopk|relu|jumprelu`` at scale 1 and sparsify's (cell ``archs``): the architectures that
  share the initialisation, with their own defaults (held-out FVU and L0 side by side).

Cells (``d_sae``, ``k``, batch, steps) change one setting at a time from the base cell (9,216, 32,
4,096, 50). Results are written after every run; a rerun with the same ``--out`` skips runs already
there.

    python experiments/sae_init_ablation.py --cache DIR --out experiments/results/sae_init_ablation
    (write the cache with: interp capture --sites blocks.12.hook_resid_post --tokens 250000 --out DIR)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
SCALES = ["scale=1", "scale=sparsify", "scale=0.3"]
BASE = dict(d_sae=9216, k=32, batch=4096, steps=50)
CELLS = {
    "base": dict(BASE, arms=[*SCALES, "scale=0.1", "init=sparsify", "scale=sparsify b_dec=mean",
                             "scale=sparsify lr=x0.5", "scale=sparsify lr=x2", "scale=1 lr=x0.5", "scale=1 lr=x2"]),
    "k64": dict(BASE, k=64, arms=SCALES),
    "batch1024": dict(BASE, batch=1024, arms=SCALES),
    "steps200": dict(BASE, steps=200, arms=SCALES),
    "batch1024_steps200": dict(BASE, batch=1024, steps=200, arms=[*SCALES, *(f"scale=sparsify aux={a} dead=20480"
                                                                             for a in ("1/32", "1/8"))]),
    "d36864_k64_steps8": dict(BASE, d_sae=36864, k=64, steps=8, arms=SCALES),
    "d36864": dict(BASE, d_sae=36864, arms=SCALES),
    "d36864_k64_batch1024_steps200": dict(BASE, d_sae=36864, k=64, batch=1024, steps=200, arms=SCALES),
    "archs": dict(BASE, arms=[f"arch={a} scale={s}" for a in ("batchtopk", "relu", "jumprelu")
                              for s in ("1", "sparsify")]),
}
"""Each cell: its settings and this project's arms; sparsify's own trainer runs in every cell but ``archs``.
An arm is what it changes from the previous defaults: ``scale=S`` (``enc_init_scale``; ``sparsify``:
sparsify's measured scale), ``init=sparsify`` (sparsify's initial weights copied in), ``b_dec=mean``,
``lr=xF`` (the learning rate times F), ``aux=A dead=N`` (AuxK weight A, dead window N tokens),
``arch=NAME`` (another architecture, its own defaults otherwise)."""
NO_SPARSIFY = {"archs"}


def sparsify_enc_scale(d_model: int, d_sae: int) -> float:
    """Mean ratio of encoder-row norm to decoder-row norm in a ``SparseCoder`` as sparsify builds it."""
    sc = bench.sparse_coder(d_model, d_sae, 1)
    with torch.no_grad():
        return float((sc.encoder.weight.norm(dim=1) / sc.W_dec.norm(dim=1)).mean())


def default_lr(d_sae: int) -> float:
    """The trainer's default learning rate when this study ran (sparsify's Adam rule; TopK's default is now
    4 x this, see ``sae_lr_rule.md``), used for every run here, sparsify's too."""
    from saes.train_config import default_lr as base

    return base(d_sae)


def arm_settings(arm: str, sp_scale: float) -> dict:
    """An arm (see :data:`CELLS`) -> every setting of the run; the ones it does not name keep the
    defaults the trainer had before this study."""
    s = {"arch": "topk", "enc_init_scale": 1.0, "weights": "ours", "lr_mult": 1.0, "b_dec_init": "geometric_median",
         "aux_coeff": 1 / 32, "dead_tokens": 10_000_000}
    for token in arm.split():
        key, _, value = token.partition("=")
        if key == "scale":
            s["enc_init_scale"] = sp_scale if value == "sparsify" else float(value)
        elif key == "init" and value == "sparsify":
            s["weights"], s["enc_init_scale"] = "sparsify", None
        elif key == "lr" and value.startswith("x"):
            s["lr_mult"] = float(value[1:])
        elif key == "b_dec" and value in ("mean", "geometric_median", "zeros"):
            s["b_dec_init"] = value
        elif key == "aux":
            num, _, den = value.partition("/")
            s["aux_coeff"] = float(num) / float(den or 1)
        elif key == "dead":
            s["dead_tokens"] = int(value)
        elif key == "arch":
            s["arch"] = value
        else:
            raise ValueError(f"unknown arm setting {token!r} in {arm!r}")
    return s


def run_interp(train, lr: float, k: int, d_sae: int, s: dict, log_every: int):
    torch.manual_seed(0)
    d = train[0].shape[-1]
    fields = {f.name for f in dataclasses.fields(saes.get_architecture(s["arch"]).config_class)}
    kw = {"k": k} if "k" in fields else {}
    if "aux_coeff" in fields:
        kw["aux_coeff"] = s["aux_coeff"]
    if s["enc_init_scale"] is not None:
        kw["enc_init_scale"] = s["enc_init_scale"]
    sae = saes.build(s["arch"], d_model=d, d_sae=d_sae, **kw)
    if s["weights"] == "sparsify":  # the weights sparsify starts from (its seed and construction, as the benchmark's)
        bench.start_from_sparsify(sae, 0)
    n, b = len(train), train[0].shape[0]
    cfg = TrainConfig(total_tokens=n * b, batch_tokens=b, lr=lr, normalize_inputs=False, progress=False,
                      log_every=log_every, b_dec_init=s["b_dec_init"], dead_tokens=s["dead_tokens"])
    tr = Trainer(sae, cfg).fit(train)
    curve = [{"step": e["step"], "train_fvu": e[""]["fvu"], "l0": e[""]["l0"], "dead": e[""]["dead"]}
             for e in tr.history_]
    return sae, curve


@torch.no_grad()
def heldout_codes(sae, held) -> dict:
    """Mean L0 on the held-out rows and the fraction of latents active on at least one of them."""
    fired, l0, n = torch.zeros(sae.cfg.d_sae, dtype=torch.bool), 0.0, 0
    for x in held:
        for part in x.split(1024):
            active = sae.encode(part) > 0
            fired |= active.any(0)
            l0 += float(active.sum())
            n += part.shape[0]
    return {"heldout_l0": l0 / n, "heldout_fired_fraction": float(fired.float().mean())}


def run_cell(name: str, cell: dict, cache: str, sp_scale: float, done: dict, save) -> None:
    d_sae, k, batch, steps = cell["d_sae"], cell["k"], cell["batch"], cell["steps"]
    arms = cell["arms"] if name in NO_SPARSIFY else ["sparsify", *cell["arms"]]
    todo = [a for a in arms if f"{name}/{a}" not in done]
    if not todo:
        return
    train, held, pool = bench.load_batches(cache, batch, steps, EVAL_BATCHES)
    lr = default_lr(d_sae)
    common = {"cell": name, "d_sae": d_sae, "k": k, "batch": batch, "steps": steps, "tokens": batch * steps,
              "distinct_training_rows": pool, "held_out_rows": sum(x.shape[0] for x in held)}
    for arm in todo:
        t0 = time.perf_counter()
        if arm == "sparsify":  # sparsify's own trainer, as the benchmark runs it
            recon = bench.run_sparsify(train, lr, k, d_sae, "cpu", bench.Timer())
            row = {**common, "arm": arm, "library": "sparsify", "lr": lr, "heldout_fvu": bench.final_fvu(recon, held)}
        else:
            s = arm_settings(arm, sp_scale)
            sae, curve = run_interp(train, lr * s["lr_mult"], k, d_sae, s, log_every=max(1, steps // 10))
            row = {**common, "arm": arm, "library": "interp", "lr": lr * s["lr_mult"], **s,
                   "only_scale_changed": all(t.startswith("scale=") for t in arm.split()),
                   "heldout_fvu": bench.final_fvu(lambda x, m=sae: m(x).x_hat, held), **heldout_codes(sae, held),
                   "train_curve": curve}
        done[f"{name}/{arm}"] = row
        print(f"{name:30s} {arm:34s} held-out FVU {row['heldout_fvu']:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        save()


def summarize(runs: dict) -> dict:
    out = {}
    for name in CELLS:
        rows = {r["arm"]: r for r in runs.values() if r["cell"] == name}
        if not rows:
            continue
        if name == "archs":
            out[name] = {a: {"enc_init_scale": r["enc_init_scale"], "heldout_fvu": r["heldout_fvu"],
                             "heldout_l0": r["heldout_l0"]} for a, r in rows.items()}
            continue
        scales = {r["enc_init_scale"]: r["heldout_fvu"] for r in rows.values() if r.get("only_scale_changed")}
        cell = {"heldout_fvu_by_enc_init_scale": {f"{s:.4g}": v for s, v in sorted(scales.items(), reverse=True)},
                "sparsify": rows["sparsify"]["heldout_fvu"] if "sparsify" in rows else None,
                "other_arms": {a: r["heldout_fvu"] for a, r in rows.items()
                               if r["library"] == "interp" and not r["only_scale_changed"]}}
        if scales:
            cell["best_scale"] = min(scales, key=scales.get)
            if cell["sparsify"] is not None:
                cell["interp_minus_sparsify"] = {f"{s:.4g}": v - cell["sparsify"] for s, v in scales.items()}
        out[name] = cell
    return out


def plot(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in summary if summary[n].get("heldout_fvu_by_enc_init_scale")]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.3 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = sorted((float(s), v) for s, v in summary[name]["heldout_fvu_by_enc_init_scale"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="this project")
        if summary[name]["sparsify"] is not None:
            ax.axhline(summary[name]["sparsify"], color="C1", ls="--", label="sparsify")
        ax.set_xscale("log")
        ax.set_xticks([p[0] for p in pts], [f"{p[0]:.3g}" for p in pts])
        ax.minorticks_off()
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("enc_init_scale", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("held-out FVU")
        if i == 0:
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
    runs = bench.done_runs(path, args.shrink)
    cells = {n: dict(c, d_sae=c["d_sae"] // args.shrink, batch=c["batch"] // args.shrink,
                     steps=max(2, c["steps"] // args.shrink)) for n, c in CELLS.items()}
    d_model = None

    def save():
        summary = summarize(runs)
        write_json(path, {"experiment": "sae_init_ablation", "site": bench.SITE, "shrink": args.shrink,
                          "d_model": d_model, "sparsify_enc_init_scale_measured": sp_scale,
                          "nn_linear_row_norm_expected": 3 ** -0.5, "eval_batches": EVAL_BATCHES,
                          "cells": cells,
                          "command": bench.recorded_command("experiments/sae_init_ablation.py",
                                                              argv or sys.argv[1:]),
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
