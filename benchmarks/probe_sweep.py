"""Benchmark: probes.sweep (batched torch) against a loop of scikit-learn selection + LogisticRegression fits.

Both sides see the same synthetic activations, the same train/test split and the same settings:
standardise on the training rows, rank neurons by the ANOVA F-statistic, fit an L2 logistic
regression (C=1, class_weight="balanced") on the top k neurons, score F1 on the test rows. Each of
``--rounds`` rounds runs both, the order alternating; seconds are medians over the rounds and the speed-ups
medians of the per-round ratios (every round in the JSON). scikit-learn's imports happen before any clock starts.

Synthetic data (say so in the results): per layer, 576 Gaussian neurons, 20k examples, a binary
label with 30% positives; 48 neurons per layer shift with the label, with effect sizes that decay
with the neuron's rank and a signal strength that rises then falls with depth, so F1 grows with k
and differs across layers, as in real sweeps.

    python benchmarks/probe_sweep.py                       # full: 30 layers x 9 ks x 20k examples
    python benchmarks/probe_sweep.py --layers 4 --examples 4000   # smaller
    python benchmarks/probe_sweep.py --quick                       # tiny: the code path only

``--device cuda`` runs probes.sweep on the GPU (the scikit-learn loop runs on the CPU either way).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import probes
from probes.split import train_test_split


def synthetic(n_layers: int, n: int, d: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Activations [n, d] per layer and 0/1 labels with planted, layer-dependent signal."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.3).float()
    layers = []
    for layer in range(n_layers):
        depth = layer / max(n_layers - 1, 1)
        strength = 0.15 + 0.9 * np.exp(-((depth - 0.55) / 0.3) ** 2)
        x = torch.randn(n, d, generator=g)
        planted = torch.randperm(d, generator=g)[:48]
        effect = strength * torch.arange(1, 49).float() ** -0.8
        x[:, planted] += y[:, None] * effect * torch.sign(torch.randn(48, generator=g))
        x = x * torch.exp(torch.randn(d, generator=g) * 0.5) + torch.randn(d, generator=g)  # uneven scales
        layers.append(x)
    return layers, y


def import_sklearn() -> None:
    """Import what :func:`run_sklearn` uses before the clock starts: timed inside it, about 1 s of scikit-learn,
    scipy and pandas imports counted as the peer's work (``import probes`` loads none of them)."""
    import sklearn.feature_selection  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import sklearn.preprocessing  # noqa: F401


def run_sklearn(layers, y, train, test, ks, C):
    from sklearn.feature_selection import f_classif
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    ytr, yte = y[train].numpy(), y[test].numpy()
    out = {}
    for li, x in enumerate(layers):
        scaler = StandardScaler().fit(x[train].numpy())
        xtr, xte = scaler.transform(x[train].numpy()), scaler.transform(x[test].numpy())
        f, _ = f_classif(xtr, ytr)
        order = np.argsort(-f, kind="stable")
        for k in ks:
            idx = order[:k]
            m = LogisticRegression(C=C, class_weight="balanced", max_iter=1000).fit(xtr[:, idx], ytr)
            out[(str(li), k)] = float(f1_score(yte, m.predict(xte[:, idx])))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--ks", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--layer-batch", type=int, default=10, help="layers fitted together by probes.sweep")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--device", default="cpu", help="where probes.sweep runs (cpu, cuda ...)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each side once per round, the order alternating; "
                    "seconds are medians and speed-ups medians of the per-round ratios (default: 5)")
    ap.add_argument("--quick", action="store_true", help="2 layers x 400 examples x 64 neurons, k 1,2,4, 2 rounds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_sweep.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.examples, args.dim, args.ks, args.layer_batch, args.rounds = 2, 400, 64, "1,2,4", 2, 2
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1; got {args.rounds}")
    ks = tuple(int(k) for k in args.ks.split(","))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    load_before = os.getloadavg()[0]
    layers, y = synthetic(args.layers, args.examples, args.dim)
    train, test = train_test_split(len(y), 0.2, seed=0, stratify=y)
    acts = {str(i): x for i, x in enumerate(layers)}

    def run_ours():
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        res = probes.sweep(acts, y, n_neurons=ks, method="f_stat", C=1.0, seed=0, layer_batch=args.layer_batch,
                           top_n=0, device=args.device)
        sync()
        return res, time.perf_counter() - t0, time.process_time() - c0

    def run_peer():
        t0, c0 = time.perf_counter(), time.process_time()
        got = run_sklearn(layers, y, train, test, ks, 1.0)
        return got, time.perf_counter() - t0, time.process_time() - c0

    if not args.skip_sklearn:
        import_sklearn()
    rounds = []
    for r in range(args.rounds):  # alternating order: ours first in even rounds, scikit-learn first in odd ones
        sides = ("probes.sweep", "sklearn_loop")[:: 1 if r % 2 == 0 else -1]
        row: dict = {"order": [s for s in sides if s == "probes.sweep" or not args.skip_sklearn]}
        for side in row["order"]:
            if side == "probes.sweep":
                result, row["wall_probes"], row["cpu_probes"] = run_ours()
            else:
                peer, row["wall_sklearn"], row["cpu_sklearn"] = run_peer()
        rounds.append(row)
    ours = {(r["site"], r["n_neurons"]): r["f1"] for r in result.records}
    if args.skip_sklearn:
        peer = {}
    med = statistics.median
    t_ours, c_ours = med(r["wall_probes"] for r in rounds), med(r["cpu_probes"] for r in rounds)
    t_peer = c_peer = None
    if peer:
        t_peer, c_peer = med(r["wall_sklearn"] for r in rounds), med(r["cpu_sklearn"] for r in rounds)
    diffs = [abs(ours[c] - peer[c]) for c in ours] if peer else []
    print(f"{'':24}{'wall s':>10}{'CPU s':>10}{'cells':>8}")
    print(f"{'probes.sweep (torch)':24}{t_ours:10.2f}{c_ours:10.2f}{len(ours):8d}")
    if peer:
        print(f"{'sklearn loop':24}{t_peer:10.2f}{c_peer:10.2f}{len(peer):8d}")
        print(f"speed-up {t_peer / t_ours:.2f}x wall, {c_peer / c_ours:.2f}x CPU; "
              f"|F1 ours - sklearn| max {max(diffs):.4f}, mean {np.mean(diffs):.5f}")
    print(result.table())
    report = {
        "benchmark": "probe_sweep",
        "data": f"synthetic activations ({args.layers} layers x {args.examples} examples x {args.dim} neurons, "
                "30% positives, 48 planted neurons per layer); not model activations",
        "settings": {"ks": ks, "method": "f_stat", "C": 1.0, "class_weight": "balanced", "test_size": 0.2,
                     "layer_batch": args.layer_batch, "top_n": 0,
                     "probes_newton": {f: getattr(probes.SweepConfig(), f)
                                       for f in ("hessian_rows", "tol", "max_iter")},
                     "torch_threads": torch.get_num_threads(),
                     "thread_env": {v: os.environ.get(v)
                                    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
                     "device": args.device, "quick": args.quick},
        "wall_seconds": {"probes.sweep": round(t_ours, 3),  # medians over the rounds
                         "sklearn_loop": None if t_peer is None else round(t_peer, 3)},
        "cpu_seconds": {"probes.sweep": round(c_ours, 3), "sklearn_loop": None if c_peer is None else round(c_peer, 3)},
        # medians of the per-round ratios (the rounds alternate which side runs first)
        "speedup_wall": None if t_peer is None else round(med(r["wall_sklearn"] / r["wall_probes"] for r in rounds), 2),
        "speedup_cpu": None if c_peer is None else round(med(r["cpu_sklearn"] / r["cpu_probes"] for r in rounds), 2),
        "rounds": rounds,
        "f1_abs_diff": {"max": max(diffs), "mean": float(np.mean(diffs)),
                        "cells_over_0.01": int(sum(d > 0.01 for d in diffs))} if diffs else None,
        "cells": [{"layer": int(layer), "k": k, "f1_probes": ours[(layer, k)], "f1_sklearn": peer.get((layer, k))}
                  for layer, k in sorted(ours, key=lambda c: (int(c[0]), c[1]))],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "note": f"torch threads {torch.get_num_threads()} on a {os.cpu_count()}-core machine ({args.device}); "
                "scikit-learn's BLAS threads as thread_env says (unset: its default); load_average_1min tells whether "
                "other jobs shared the machine. CPU seconds (process time, every thread) are less affected by "
                "sharing than wall seconds; the scikit-learn imports are done before either clock starts",
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "command": "python benchmarks/probe_sweep.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "skip_sklearn", "quick")),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
