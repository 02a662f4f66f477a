"""Whether the penalised SAEs (ReLU, JumpReLU) come out sparse at their default settings, and what makes them.

At their configs' defaults (ReLU ``l1_coeff`` 5e-4; JumpReLU ``l0_coeff`` 1e-3, ``bandwidth`` 1e-3,
``init_threshold`` 1e-3) both ended 200 steps of 1,024 rows on layer 12 with 1,700-2,100 active latents per row
of 9,216 (``sae_b_dec_init.md``): codes denser than the 576-dimensional input they encode. For JumpReLU the cause
is how far Adam can move a threshold: about one learning rate per step whatever the gradient, 2.7e-4 at 9,216
latents, while the trainer's inputs (``E||x||^2 = d_model``) put pre-activations at a scale near 1; a penalty
that only moves the thresholds then cannot make the codes sparse within a run of a few thousand steps.

Arms, each on the same batches in the same order with the trainer's defaults otherwise (its learning rate
``2e-4 / sqrt(d_sae / 16384)``, warm-up, decay, ``b_dec`` start): JumpReLU with the thresholds' learning rate
``threshold_lr_factor`` times the SAE's (1: before), its ``bandwidth`` and ``l0_coeff``; ReLU with
``l1_coeff``; TopK at its default ``k`` = 32 beside them, for the FVU a code of that sparsity reaches.

Round 2 (after JumpReLU's FVU still trailed TopK's far): the learning rate (``lr_scale``: TopK's factor of 4
over the base rule had been measured for TopK alone), the estimators' gradient to the pre-activations
(``ste_to_input``), SAELens' bandwidth 0.05, and BatchTopK and ReLU at 1x and 4x the rule.

Cells: layer 12 (where the defaults are chosen) and layer 20 (a check on data they were not chosen on), each
9,216 latents, batch 1,024. Held-out FVU and L0 come from the cache's last 2,048 rows (the SAE benchmark's
:func:`benchmarks.sae_train.load_batches` and :func:`~benchmarks.sae_train.final_fvu`); each run also records
its logged training L0 every 50 steps, the fraction of latents that never fire on the held-out rows and
JumpReLU's threshold quantiles. Results are written after every run; a rerun with the same ``--out`` skips
what is there.

    python experiments/sae_sparsity_defaults.py --cache CACHE12 --layer20-cache CACHE20 \\
        --out experiments/results/sae_sparsity_defaults
    (the caches: interp capture --sites blocks.12.hook_resid_post --tokens 460000 --out CACHE12, and the same
    with blocks.20.hook_resid_post)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import saes  # noqa: E402
from benchmarks import sae_train as bench  # noqa: E402 - the benchmark's data and held-out FVU
from interp.atomic import write_json  # noqa: E402
from saes.train_config import default_lr  # noqa: E402
from saes.trainer import TrainConfig, Trainer  # noqa: E402

EVAL_BATCHES = 2
"""Held-out batches (the cache's last rows), as in the SAE benchmark."""
SITES = {12: "blocks.12.hook_resid_post", 20: "blocks.20.hook_resid_post"}
D_SAE, BATCH = 9216, 1024
"""The study's width and batch (``--d-sae``, ``--batch``: smaller for a quick check, not the study)."""
LOG_EVERY = 50
"""Steps between the training L0s each run records."""
BEFORE_JUMPRELU = {"lr_scale": 1.0, "threshold_lr_factor": 1.0, "bandwidth": 1e-3, "init_threshold": 1e-3,
                   "l0_coeff": 1e-3}
"""JumpReLU's settings before this study, named in full so that a later default does not change the arm."""
F30 = {**BEFORE_JUMPRELU, "threshold_lr_factor": 30.0, "ste_to_input": False}
"""JumpReLU after the first round (the thresholds' learning rate 30 times the SAE's), named in full."""
DEC1 = {"dec_init_norm": 1.0}
"""The ReLU decoder's initial row norm before round 3 (the arms run with it keep it)."""
ARMS = {
    "topk_k32": ("topk", {"k": 32}),
    "relu_l1_5e-4": ("relu", {"l1_coeff": 5e-4, "lr_scale": 1.0, **DEC1}),
    "relu_l1_2e-3": ("relu", {"l1_coeff": 2e-3, "lr_scale": 1.0, **DEC1}),
    "relu_l1_5e-3": ("relu", {"l1_coeff": 5e-3, "lr_scale": 1.0, **DEC1}),
    "relu_l1_1e-2": ("relu", {"l1_coeff": 1e-2, "lr_scale": 1.0, **DEC1}),
    "jumprelu_before": ("jumprelu", BEFORE_JUMPRELU),
    "jumprelu_f10": ("jumprelu", {**BEFORE_JUMPRELU, "threshold_lr_factor": 10.0}),
    "jumprelu_f30": ("jumprelu", {**BEFORE_JUMPRELU, "threshold_lr_factor": 30.0}),
    "jumprelu_f100": ("jumprelu", {**BEFORE_JUMPRELU, "threshold_lr_factor": 100.0}),
    "jumprelu_f100_l0_3e-3": ("jumprelu", {**BEFORE_JUMPRELU, "threshold_lr_factor": 100.0, "l0_coeff": 3e-3}),
    "jumprelu_f100_l0_1e-2": ("jumprelu", {**BEFORE_JUMPRELU, "threshold_lr_factor": 100.0, "l0_coeff": 1e-2}),
    "jumprelu_f30_x4": ("jumprelu", {**F30, "lr_scale": 4.0, "threshold_lr_factor": 7.5}),
    "jumprelu_f30_bw0.05": ("jumprelu", {**F30, "bandwidth": 0.05}),
    "jumprelu_f30_ste": ("jumprelu", {**F30, "ste_to_input": True}),
    "jumprelu_f30_x4_thr_x4": ("jumprelu", {**F30, "lr_scale": 4.0}),
    "jumprelu_f30_x8": ("jumprelu", {**F30, "lr_scale": 8.0, "threshold_lr_factor": 3.75}),
    "jumprelu_f30_x4_l0_3e-3": ("jumprelu", {**F30, "lr_scale": 4.0, "threshold_lr_factor": 7.5, "l0_coeff": 3e-3}),
    "jumprelu_f30_x4_bw0.05": ("jumprelu", {**F30, "lr_scale": 4.0, "threshold_lr_factor": 7.5, "bandwidth": 0.05}),
    "relu_l1_5e-3_x4": ("relu", {"l1_coeff": 5e-3, "lr_scale": 4.0, **DEC1}),
    "relu_l1_5e-4_x4": ("relu", {"l1_coeff": 5e-4, "lr_scale": 4.0, **DEC1}),
    "relu_l1_1e-2_x4": ("relu", {"l1_coeff": 1e-2, "lr_scale": 4.0, **DEC1}),
    "batchtopk_k32": ("batchtopk", {"k": 32, "lr_scale": 1.0}),
    "batchtopk_k32_x4": ("batchtopk", {"k": 32, "lr_scale": 4.0}),
    "relu_l1_2e-2": ("relu", {"l1_coeff": 2e-2, "lr_scale": 1.0, **DEC1}),
    "mpsae_n32": ("mpsae", {"n_steps": 32, "lr_scale": 1.0}),
    "mpsae_n32_x4": ("mpsae", {"n_steps": 32, "lr_scale": 4.0}),
    "mpsae_n32_x2": ("mpsae", {"n_steps": 32, "lr_scale": 2.0}),
    "mpsae_n32_x8": ("mpsae", {"n_steps": 32, "lr_scale": 8.0}),
    "mpsae_n32_x0.25": ("mpsae", {"n_steps": 32, "lr_scale": 0.25}),
    # round 3: the ReLU decoder's initial row norm, on the fixed cache reader's batches (norm 1 rerun beside)
    "relu_l1_5e-3_x4_rerun": ("relu", {"l1_coeff": 5e-3, "lr_scale": 4.0, **DEC1}),
    "relu_l1_5e-3_x4_dec0.1": ("relu", {"l1_coeff": 5e-3, "lr_scale": 4.0, "dec_init_norm": 0.1}),
    "relu_l1_1e-2_x4_dec0.1": ("relu", {"l1_coeff": 1e-2, "lr_scale": 4.0, "dec_init_norm": 0.1}),
    "relu_l1_2e-2_x4_dec0.1": ("relu", {"l1_coeff": 2e-2, "lr_scale": 4.0, "dec_init_norm": 0.1}),
}
"""Arm name: (architecture, config settings; ``lr_scale``: Adam's learning rate is the trainer's base rule
:func:`saes.train_config.default_lr` times this, whatever the architecture's ``default_lr_factor``; without it,
the trainer's default for the architecture)."""


def run(train, held, arch: str, kwargs: dict, seed: int, d_sae: int, log_every: int) -> dict:
    torch.manual_seed(seed)
    batch = train[0].shape[0]
    kwargs = dict(kwargs)
    lr_scale = kwargs.pop("lr_scale", None)
    sae = saes.build(arch, d_model=train[0].shape[-1], d_sae=d_sae, **kwargs)
    cfg = TrainConfig(total_tokens=len(train) * batch, batch_tokens=batch, normalize_inputs=False, progress=False,
                      log_every=log_every, lr=None if lr_scale is None else default_lr(d_sae) * lr_scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", saes.DenseCodesWarning)
        tr = Trainer(sae, cfg).fit(train)
    with torch.no_grad():
        codes = torch.cat([sae(x).codes for x in held])
    report = bench.final_report(lambda x: sae(x).x_hat, held)
    out = {"lr": cfg.lr_for(sae), "heldout_fvu": report["fvu"], "heldout_fvu_typical": report["fvu_typical"],
           "heldout_l0": float((codes != 0).sum(-1).float().mean()),
           "never_fire_on_heldout": float(((codes != 0).sum(0) == 0).float().mean()),
           "training_l0": {str(e["step"]): e[""]["l0"] for e in tr.history_ if "event" not in e},
           "dense_codes_warning": any(issubclass(w.category, saes.DenseCodesWarning) for w in caught)}
    if arch == "jumprelu":
        q = torch.tensor([0.1, 0.5, 0.9])
        out["threshold_quantiles_10_50_90"] = [float(v) for v in torch.quantile(sae.threshold.detach(), q)]
    return out


def summarize(runs: dict) -> dict:
    """Per layer and arm: held-out FVU, L0 and never-firing fraction, averaged over the seeds run."""
    out: dict = {}
    for r in runs.values():
        out.setdefault(f"layer {r['layer']}", {}).setdefault(r["arm"], []).append(r)
    return {layer: {arm: {"seeds": len(rows), "arch": rows[0]["arch"], "settings": rows[0]["settings"],
                          **{k: statistics.mean(r[k] for r in rows)
                             for k in ("heldout_fvu", "heldout_l0", "never_fire_on_heldout")},
                          "dense_codes_warning": any(r["dense_codes_warning"] for r in rows)}
                    for arm, rows in sorted(arms.items())}
            for layer, arms in sorted(out.items())}


MARKERS = {"topk": "s", "relu": "o", "jumprelu": "^", "batchtopk": "D", "mpsae": "v"}


def plot(summary: dict, path: Path, d_model: int) -> None:
    """Held-out FVU against held-out L0 (log scale) per layer, one labelled point per arm; the line at
    ``d_model / 2`` is where the trainer's dense-codes warning starts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(summary), 4.5))
    FigureCanvasAgg(fig)
    for i, (layer, arms) in enumerate(summary.items()):
        ax = fig.add_subplot(1, len(summary), i + 1)
        for arm, row in arms.items():
            colour = f"C{list(MARKERS).index(row['arch'])}"
            hollow = row["settings"].get("lr_scale", 4.0) < 4  # below the default rate of every architecture now
            ax.scatter(row["heldout_l0"], row["heldout_fvu"], marker=MARKERS[row["arch"]], edgecolors=colour,
                       facecolors="none" if hollow else colour)
            ax.annotate(arm, (row["heldout_l0"], row["heldout_fvu"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.axvline(d_model / 2, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("held-out L0 (active latents per row)")
        ax.set_ylabel("held-out FVU")
        ax.set_title(f"{layer}: squares TopK, diamonds BatchTopK, circles ReLU, triangles JumpReLU (up) and\n"
                     "MP-SAE (down); hollow: Adam's rate below 4 x the base rule",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True, help="activation cache holding blocks.12.hook_resid_post")
    p.add_argument("--layer20-cache", help="activation cache holding blocks.20.hook_resid_post (the check)")
    p.add_argument("--out", required=True, help="folder for results.json and the plot")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--d-sae", type=int, default=D_SAE)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--layers", type=int, nargs="+", default=[12, 20], choices=[12, 20])
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    caches = {12: a.cache, 20: a.layer20_cache}

    def save() -> dict:
        summary = summarize(runs)
        res = {"arms": {k: {"arch": v[0], "settings": v[1]} for k, v in ARMS.items()}, "runs": runs,
               "summary": summary, "command": bench.recorded_command("experiments/sae_sparsity_defaults.py",
                                                                     sys.argv[1:] if argv is None else argv)}
        write_json(path, res)
        return res

    for layer in a.layers:
        if caches[layer] is None:
            raise SystemExit(f"layer {layer} was asked for: pass {'--cache' if layer == 12 else '--layer20-cache'}")
        bench.SITE = SITES[layer]
        for seed in a.seeds:
            key = f"l{layer}/{{}}/{a.d_sae}/{a.batch}/{a.steps}/{seed}"
            todo = [arm for arm in a.arms if key.format(arm) not in runs]
            if not todo:
                continue
            train, held, pool = bench.load_batches(caches[layer], a.batch, a.steps, EVAL_BATCHES, seed)
            d_model = train[0].shape[-1]
            for arm in todo:
                arch, kwargs = ARMS[arm]
                t0 = time.perf_counter()
                row = {"layer": layer, "site": SITES[layer], "arm": arm, "arch": arch, "settings": kwargs,
                       "seed": seed, "steps": a.steps, "batch": a.batch, "d_sae": a.d_sae, "d_model": d_model,
                       "distinct_training_rows": pool,
                       **run(train, held, arch, kwargs, seed, a.d_sae, min(LOG_EVERY, a.steps))}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                # each run records the invocation that made it (the top-level "command" is the last one)
                row["command"] = bench.recorded_command("experiments/sae_sparsity_defaults.py",
                                                        sys.argv[1:] if argv is None else argv)
                runs[key.format(arm)] = row
                save()
                print(f"layer {layer} seed {seed} {arm:22s} held-out FVU {row['heldout_fvu']:.4f} "
                      f"L0 {row['heldout_l0']:8.1f} never fire {row['never_fire_on_heldout']:.3f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    res = save()
    if runs:
        plot(res["summary"], out / "heldout_fvu_vs_l0.png", next(iter(runs.values()))["d_model"])
    return res


if __name__ == "__main__":
    main()
