"""Patching sweeps: exact (interp) vs attribution (interp) vs a loop of nnsight traces, in one run.

The sweep: denoising the weekday copy task on the embedded SmolLM2-135M, a 1 x 64 prompt pair (a
filler preamble, then "I will see you on Monday. To repeat, I will see you on"; the corrupted prompt
says Friday), ``blocks.L.hook_resid_post`` at every one of the 30 layers x every position (1,920
cells), metric ``logit(Monday) - logit(Friday)`` at the last token. Methods:

* ``interp exact``: :func:`interp.patching.activation_patching` (cells batched, prefix cache reused);
* ``interp attribution``: :func:`interp.patching.attribution_patching` (one forward, one backward);
* ``nnsight loop``: one clean trace saving every layer's output, then one trace per cell writing the
  clean activation into that layer's output at that position (what a user would write with nnsight);
  ``logits_to_keep=1`` is passed to it too, so the forward passes compute the same logits. Every cell
  is one full forward pass whatever its layer, so ``--nnsight-layers N`` runs the loop on N evenly
  spaced layers only (every position) and the ratio to interp exact is taken per cell: (nnsight
  seconds / nnsight cells) / (exact seconds / exact cells). The effects are compared on those cells.

Rounds alternate the order of the methods (rotated each round); every round's times are kept. We
report medians over rounds of the per-round ratios (nnsight / interp exact, interp exact / interp
attribution), the largest difference between nnsight's and interp's cell effects, and the Spearman
correlation of attribution with exact cell effects on the 64-token pair and on the prompts of
``experiments/patching_weekday.py`` (its seven day pairs, every layer, ``resid_post``), with the
layers where it is lowest and the cells where the two disagree most.

    python benchmarks/patching.py                      # writes benchmarks/results/patching.json
    python benchmarks/patching.py --quick              # tiny sizes, a few seconds: the code path only
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from interp import load_model
from interp.atomic import write_json
from interp.patching import activation_patching, agreement, attribution_patching, effect_spearman, logit_diff, spearman
from interp.sites import blocks_path, unwrap

ROOT = Path(__file__).resolve().parents[1]
FILLER = ("We talked about the weather, the garden and the new bakery in town. The children played outside "
          "while the adults cooked dinner and told old stories about the trip to the sea. ")


def weekday_experiment():
    sys.path.insert(0, str(ROOT / "experiments"))
    import patching_weekday

    return patching_weekday


def prompt_pair(tok, seq: int):
    """Token ids ``[seq]`` of the clean and corrupted prompts and the two answer ids."""
    exp = weekday_experiment()
    clean, bad = (tok(exp.TEMPLATE.format(d=d))["input_ids"] for d in ("Monday", "Friday"))
    filler = tok(FILLER * 8)["input_ids"]
    n = 4 if seq is None else seq - len(clean)  # None: the task prompt and four filler tokens
    if n < 0 or len(clean) != len(bad):
        raise SystemExit(f"--seq {seq} is shorter than the task prompt ({len(clean)} tokens)")
    a, b = tok(" Monday", add_special_tokens=False)["input_ids"], tok(" Friday", add_special_tokens=False)["input_ids"]
    k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # the first token that tells the days apart
    return torch.tensor(filler[:n] + clean), torch.tensor(filler[:n] + bad), a[k], b[k]


def nnsight_loop(model, clean, bad, layers, target: int, baseline: int) -> torch.Tensor:
    """Exact patching written as a loop of nnsight traces: ``[layers, seq]`` effects."""
    import nnsight

    nm = nnsight.NNsight(model)
    path, _ = blocks_path(unwrap(model))
    blocks = functools.reduce(getattr, path.split("."), nm)
    kw = {"logits_to_keep": 1}
    with torch.no_grad():
        saved = []
        with nm.trace(clean[None], **kw):
            for L in layers:
                saved.append(blocks[L].output.save())
        src = [s[0] if isinstance(s, tuple) else s for s in saved]
        with nm.trace(bad[None], **kw):
            base_logits = nm.output.logits.save()
        base = float(base_logits[0, -1, target] - base_logits[0, -1, baseline])
        out = torch.empty(len(layers), clean.shape[0])
        for i, L in enumerate(layers):
            for p in range(clean.shape[0]):
                with nm.trace(bad[None], **kw):
                    h = blocks[L].output
                    h = h[0] if isinstance(h, tuple) else h
                    h[:, p, :] = src[i][:, p, :]
                    logits = nm.output.logits.save()
                out[i, p] = float(logits[0, -1, target] - logits[0, -1, baseline]) - base
    return out


def spearman_on_experiment(model, tok, layers, batch_size) -> dict:
    """Attribution against exact on the experiment's seven day pairs (resid_post, every layer)."""
    exp = weekday_experiment()
    pairs = exp.day_pairs(7)
    clean, bad = exp.prompts(pairs)
    kw = dict(sites="resid_post", layers=layers, tokenizer=tok)
    try:
        metric = exp.metric_for(pairs)
        ex = activation_patching(model, clean, bad, metric, batch_size=batch_size, progress=False, **kw)
        at = attribution_patching(model, clean, bad, metric, **kw)
    except Exception as e:  # noqa: BLE001 - a tokenizer that splits the day names (the --quick model)
        return {"skipped": f"{type(e).__name__}: {e}"}
    a = agreement(ex, at, top=5)
    rows = sorted(a["per_row_spearman"].items(), key=lambda kv: kv[1] if kv[1] == kv[1] else 2.0)
    return {"spearman": a["spearman"], "pearson": a["pearson"], "spearman_effect_cells": a["spearman_effect_cells"],
            "n_effect_cells": a["n_effect_cells"], "lowest_layers": rows[:5],
            "disagreements": a["disagreements"], "n_pairs": len(pairs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq", type=int, default=64, help="tokens in each prompt of the pair")
    ap.add_argument("--layers", type=int, default=None, help="sweep layers 0..N-1 (default: every layer)")
    ap.add_argument("--nnsight-layers", type=int, default=None,
                    help="run the nnsight loop on this many evenly spaced layers (default: every swept layer)")
    ap.add_argument("--batch-size", type=int, default=32, help="patched runs per forward pass (interp exact)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="1 layer, the task prompt plus 4 tokens, 2 rounds: checks the code path only")
    ap.add_argument("--out", default="benchmarks/results/patching.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seq, args.layers = min(args.rounds, 2), None, args.layers or 1
    model, tok = load_model(args.model, device=args.device)
    n_layers = model.config.num_hidden_layers
    layers = list(range(min(args.layers or n_layers, n_layers)))
    nn_idx = list(range(len(layers)))
    if args.nnsight_layers is not None and args.nnsight_layers < len(layers):
        if args.nnsight_layers < 1:
            raise SystemExit(f"--nnsight-layers must be >= 1, got {args.nnsight_layers}")
        step = len(layers) / args.nnsight_layers
        nn_idx = sorted({int(i * step + step / 2) for i in range(args.nnsight_layers)})
    nn_layers = [layers[i] for i in nn_idx]
    clean, bad, target, baseline = prompt_pair(tok, args.seq)
    args.seq = clean.shape[0]
    device = next(model.parameters()).device
    clean, bad = clean.to(device), bad.to(device)
    metric = logit_diff(target, baseline)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kw = dict(sites="resid_post", layers=layers)
    methods = {
        "interp exact": lambda: activation_patching(model, clean, bad, metric, batch_size=args.batch_size,
                                                    progress=False, **kw).effect,
        "interp attribution": lambda: attribution_patching(model, clean, bad, metric, **kw).effect,
        "nnsight loop": lambda: nnsight_loop(model, clean, bad, nn_layers, target, baseline),
    }
    names = list(methods)
    times: dict[str, list[float]] = {n: [] for n in names}
    effects = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            sync()
            t = time.perf_counter()
            effects[n] = methods[n]()
            sync()
            times[n].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds} ({' -> '.join(order)}): "
              + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    ex, at, nn = effects["interp exact"], effects["interp attribution"], effects["nnsight loop"]
    per_cell = len(layers) / len(nn_layers)  # exact cells per nnsight cell
    vs_nnsight = [b * per_cell / a for a, b in zip(times["interp exact"], times["nnsight loop"])]
    vs_attr = [a / b for a, b in zip(times["interp exact"], times["interp attribution"])]
    spearman_64 = spearman(ex, at)  # every cell: mostly float noise ranked where no patch has an effect
    spearman_cells, n_cells = effect_spearman(ex, at)
    on_exp = spearman_on_experiment(model, tok, layers, args.batch_size)
    print(f"\n{'method':20s} {'median s':>10s} {'min s':>9s}")
    for n in names:
        print(f"{n:20s} {statistics.median(times[n]):10.2f} {min(times[n]):9.2f}")
    print(f"nnsight loop on layers {nn_layers} ({len(nn_layers) * args.seq} cells), per cell against interp exact")
    print(f"nnsight loop / interp exact: median {statistics.median(vs_nnsight):.2f}x (rounds: "
          f"{', '.join(f'{v:.2f}' for v in vs_nnsight)})")
    print(f"interp exact / interp attribution: median {statistics.median(vs_attr):.1f}x (rounds: "
          f"{', '.join(f'{v:.1f}' for v in vs_attr)})")
    print(f"max |nnsight - interp exact| over cells: {float((nn - ex[nn_idx]).abs().max()):.2e}")
    print(f"Spearman(attribution, exact): {spearman_cells:.3f} over the {n_cells} cells with an effect "
          f"({spearman_64:.3f} over every cell) on the {args.seq}-token pair; on the experiment's prompts: "
          f"{on_exp.get('spearman_effect_cells', on_exp.get('skipped'))}")
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "benchmark": "patching", "command": "python benchmarks/patching.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "model": args.model, "device": str(device),
        "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "load_average_at_end": load, "quick": args.quick, "seq": args.seq,
        "layers": len(layers), "cells": len(layers) * args.seq, "nnsight_layers": nn_layers,
        "nnsight_cells": len(nn_layers) * args.seq, "batch_size": args.batch_size, "rounds": args.rounds,
        "times_s": times, "median_s": {n: statistics.median(v) for n, v in times.items()},
        "ratio_nnsight_over_exact_per_cell": {"median": statistics.median(vs_nnsight), "rounds": vs_nnsight},
        "ratio_exact_over_attribution": {"median": statistics.median(vs_attr), "rounds": vs_attr},
        "max_abs_diff_nnsight_vs_exact": float((nn - ex[nn_idx]).abs().max()),
        "max_abs_effect": float(ex.abs().max()), "spearman_attribution_vs_exact": spearman_64,
        "spearman_attribution_vs_exact_effect_cells": spearman_cells, "effect_cells": n_cells,
        "spearman_on_experiment_prompts": on_exp,
        "note": "Rounds rotate the order of the methods; ratios are per round (same round, same load). "
                "'interp exact' reuses the base run's KV cache for the columns before each patch; the nnsight "
                "loop runs every cell as a full forward pass of one prompt; it runs on nnsight_layers only, and its "
                "ratio to interp exact is per cell (times scaled by the number of cells each method swept).",
    }
    write_json(args.out, result, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
