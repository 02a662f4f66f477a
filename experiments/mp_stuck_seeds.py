"""MP-SAE seeds that get stuck, the cure, and threshold-stopped training, on planted dictionaries.

Two generators. ``grid``: the planted hierarchy of ``mp_vs_topk_synthetic.py`` (parents, children
active only with their parent, independent singles). ``tree``: written here, with other sizes and
noise levels: ``n_parents`` parents with ``n_children`` children each (orthogonal to their parent,
random to each other); every row holds ``trees`` distinct parents (a number drawn uniformly from the
range), each with one of its children, coefficients U(1, 2) and U(0.5, 1.5), plus Gaussian noise. For
``tree`` the floor is exact: the FVU of the noise-free signal; the *oracle* is the FVU of the same
pursuit (same budget, same stopping rule) over the planted atoms themselves. Where the oracle reaches
the floor (a learnable dictionary gets there), a seed is *stuck* when its held-out FVU is at least
``STUCK_RATIO`` times the floor; elsewhere the summary gives each arm's worst seed against its median.

Arms (each a config of the same trainer, the same data and seed):
``mp_before`` MP-SAE with the previous defaults (random atoms, no resampling); ``mp`` MP-SAE with
the current defaults (dead atoms resampled); ``mp_data_init`` atoms started from data rows, no
resampling; ``topk`` TopK at the same k; ``mp_threshold`` MP-SAE trained with the residual stopping
rule (``residual_fraction``, ``n_steps`` as the cap), after which the fixed-k arms of that setting
run at k = its mean held-out L0, rounded.

    python experiments/mp_stuck_seeds.py --out experiments/results/mp_stuck_seeds --setting tree_d64
    python experiments/mp_stuck_seeds.py --out experiments/results/mp_stuck_seeds --summary
    python experiments/mp_stuck_seeds.py --out experiments/results/mp_stuck_seeds --setting tree_d64 \\
        --diagnose --first-seed 7 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mp_vs_topk_synthetic as grid  # noqa: E402 - the grid generator and its training recipe

from interp.atomic import write_json  # noqa: E402
from saes.base import build  # noqa: E402
from saes.trainer import TrainConfig, Trainer  # noqa: E402

STUCK_RATIO = 1.5
"""A seed is stuck when its held-out FVU is at least this many times the noise floor."""
GRID = dict(generator="grid", d_model=48, n_parents=8, n_children=4, n_singles=16, p_parent=0.15, p_single=0.05,
            sibling_cos=0.0, noise=0.01, d_sae=112, k=4, dead_batches=50)
SETTINGS = {
    "grid_pchild1.0": dict(GRID, p_child=1.0, arms=["mp_before", "mp"]),
    "grid_pchild0.5": dict(GRID, p_child=0.5, arms=["mp_before", "mp"]),
    "tree_d64": dict(generator="tree", dead_batches=25, d_model=64, n_parents=16, n_children=4, trees=(1, 1),
                     noise=0.02, d_sae=160, k=2, arms=["mp_before", "mp", "mp_data_init", "topk"]),
    "tree_d32_noisy": dict(generator="tree", dead_batches=25, d_model=32, n_parents=8, n_children=3, trees=(2, 2),
                           noise=0.05, d_sae=64, k=4, arms=["mp_before", "mp", "topk"]),
    "tree_var_threshold": dict(generator="tree", dead_batches=25, d_model=48, n_parents=12, n_children=3, trees=(1, 3),
                               noise=0.01, d_sae=96, cap=8, residual_fraction=0.05,
                               arms=["mp_threshold", "mp", "topk"]),
}
"""Each setting: the generator and its sizes, the L0 budget ``k`` (or the threshold arm's ``cap`` and
``residual_fraction``), the steps without a pick after which the trainer counts a latent dead
(``TrainConfig.dead_tokens``: TopK's AuxK and MP-SAE's resampling both read it; the grid keeps the 50 of
``mp_vs_topk_synthetic.py``), and the arms run on every seed."""
TRAIN = dict(steps=1000, batch=512, lr=3e-3)
"""The recipe of ``mp_vs_topk_synthetic.py``: 1,000 steps of 512 rows, Adam 3e-3."""


def tree_dictionary(s: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Parents, then each parent's children (orthogonal to it); family 0 parent, 1 child."""
    d, P, C = s["d_model"], s["n_parents"], s["n_children"]
    parents = torch.nn.functional.normalize(torch.randn(P, d, generator=gen), dim=1)
    ch = torch.randn(P, C, d, generator=gen)
    ch -= (ch * parents[:, None]).sum(-1, keepdim=True) * parents[:, None]
    ch = torch.nn.functional.normalize(ch, dim=2)
    return torch.cat([parents, ch.reshape(P * C, d)]), torch.tensor([0] * P + [1] * (P * C))


def tree_sample(n: int, atoms: torch.Tensor, s: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, signal)``: each row holds a number of trees drawn from ``s["trees"]`` (distinct parents,
    each with one child), plus noise."""
    P, C = s["n_parents"], s["n_children"]
    lo, hi = s["trees"]
    count = torch.randint(lo, hi + 1, (n, 1), generator=gen)
    order = torch.rand(n, P, generator=gen).argsort(1)
    on = torch.zeros(n, P, dtype=torch.bool).scatter_(1, order, torch.arange(P).expand(n, P) < count)
    coef = torch.zeros(n, atoms.shape[0])
    coef[:, :P] = on * (1 + torch.rand(n, P, generator=gen))
    child = P + torch.arange(P) * C + torch.randint(0, C, (n, P), generator=gen)
    coef.scatter_(1, child, on * (0.5 + torch.rand(n, P, generator=gen)))
    signal = coef @ atoms
    return signal + s["noise"] * torch.randn(n, atoms.shape[1], generator=gen), signal


def make_data(s: dict, seed: int, train: dict = TRAIN):
    """(training batches, held-out rows, noise-free held-out signal or None, atoms, family)."""
    a = argparse.Namespace(**{**s, **train})
    if s["generator"] == "grid":  # the very draws of mp_vs_topk_synthetic.py for this seed
        gen = torch.Generator().manual_seed(1000 + seed)
        atoms, family = grid.planted_dictionary(a.d_model, a.n_parents, a.n_children, a.n_singles, a.sibling_cos, gen)
        return [grid.sample(a.batch, atoms, a, gen) for _ in range(a.steps)], grid.sample(8192, atoms, a, gen), \
            None, atoms, family
    gen = torch.Generator().manual_seed(2000 + seed)
    atoms, family = tree_dictionary(s, gen)
    batches = [tree_sample(a.batch, atoms, s, gen)[0] for _ in range(a.steps)]
    test, signal = tree_sample(8192, atoms, s, gen)
    return batches, test, signal, atoms, family


def arm_config(arm: str, s: dict, k: int) -> tuple[str, dict]:
    return {"mp_before": ("mpsae", {"n_steps": k, "atom_init": "random", "resample_every": 0}),
            "mp": ("mpsae", {"n_steps": k}),
            "mp_data_init": ("mpsae", {"n_steps": k, "atom_init": "data", "resample_every": 0}),
            "topk": ("topk", {"k": k}),
            "mp_threshold": ("mpsae", {"n_steps": s.get("cap", k),
                                       "residual_fraction": s.get("residual_fraction", 0.0)}),
            }[arm]


def run_one(name: str, arm: str, seed: int, k: int, train: dict = TRAIN) -> dict:
    s = SETTINGS[name]
    batches, test, signal, atoms, family = make_data(s, seed, train)
    arch, cfg = arm_config(arm, s, k)
    a = argparse.Namespace(**{**s, **train})
    t = time.time()
    sae = grid.train(arch, cfg, batches, a, seed)
    row = {"setting": name, "arm": arm, "seed": seed, "arch": arch, "config": cfg, **grid.evaluate(sae, test),
           "train_seconds": round(time.time() - t, 1), **({"train": train} if train != TRAIN else {})}
    tv = (test - test.mean(0)).pow(2).sum()
    if signal is not None:
        row["floor"] = ((test - signal).pow(2).sum() / tv).item()
        row["fvu_over_floor"] = row["fvu"] / row["floor"]
    with torch.no_grad():
        codes = sae.encode(test)
        cos = torch.nn.functional.normalize(atoms, dim=1) @ torch.nn.functional.normalize(sae.W_dec, dim=1).T
    best = cos.max(1).values
    names = ("parents", "children", "singles")
    row["recovery"] = {names[f]: best[family == f].mean().item() for f in family.unique().tolist()}
    row["missed_atoms"] = {names[f]: int((best[family == f] < 0.9).sum()) for f in family.unique().tolist()}
    row["never_picked"] = int(((codes != 0).sum(0) == 0).sum())
    if hasattr(sae, "n_resampled_"):
        row["resampled_atoms"] = sae.n_resampled_
    return row


def run_setting(out: Path, name: str, seeds: list[int], train: dict = TRAIN) -> list[dict]:
    """Every arm on every seed; rows already in ``runs.jsonl`` are kept (an interrupted run resumes)."""
    s = SETTINGS[name]
    path = out / name / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {(r["arm"], r["seed"]) for r in rows}
    arms = s["arms"]
    if "mp_threshold" in arms:  # the threshold arm first: its L0 sets k for the others
        arms = ["mp_threshold"] + [x for x in arms if x != "mp_threshold"]
    for arm in arms:
        k = s.get("k")
        if arm != "mp_threshold" and "mp_threshold" in s["arms"]:
            l0 = [r["l0"] for r in rows if r["arm"] == "mp_threshold"]
            k = max(1, round(sum(l0) / len(l0)))
        for seed in seeds:
            if (arm, seed) in done:
                continue
            row = run_one(name, arm, seed, k, train)
            print(json.dumps({x: v for x, v in row.items() if x != "config"}), flush=True)
            rows.append(row)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def diagnose(out: Path, name: str, seeds: list[int], arms: tuple[str, ...] = ("mp_before", "mp"),
             train: dict = TRAIN) -> list[dict]:
    """Why a seed gets stuck: per arm and seed, the fraction of atoms the trainer counts dead at every
    tenth of training, the atoms moved by resampling, and for every planted child that no atom
    matches (best cosine < 0.9) the cosines of its best atom with the child and with the child's
    parent (a parent + child mixture leans on the parent; both generators list the parents first, then
    each parent's children). Written to ``OUT/NAME/diagnosis.jsonl``."""
    s = SETTINGS[name]
    P, C = s["n_parents"], s["n_children"]
    rows = []
    for seed in seeds:
        batches, test, _, atoms, _ = make_data(s, seed, train)
        a = argparse.Namespace(**{**s, **train, "steps": len(batches)})
        for arm in arms:
            arch, cfg = arm_config(arm, s, s["k"])
            torch.manual_seed(seed)
            sae = build(arch, d_model=a.d_model, d_sae=a.d_sae, **cfg)
            tc = TrainConfig(total_tokens=a.batch * a.steps, batch_tokens=a.batch, lr=a.lr, progress=False, seed=seed,
                             log_every=max(1, a.steps // 10), dead_tokens=a.batch * s["dead_batches"])
            tr = Trainer(sae, tc).fit(batches)
            with torch.no_grad():
                cos = atoms @ torch.nn.functional.normalize(sae.W_dec, dim=1).T
            best, arg = cos.max(1)
            missed = [i for i in range(P, P + P * C) if best[i] < 0.9]
            parent_cos = [cos[(i - P) // C, arg[i]].item() for i in missed]
            row = {"setting": name, "arm": arm, "seed": seed, "fvu": grid.evaluate(sae, test)["fvu"],
                   "dead_fraction": [round(h[""]["dead"], 3) for h in tr.history_],
                   "resampled_atoms": getattr(sae, "n_resampled_", 0), "missed_children": len(missed),
                   "missed_best_cos_child": _mean([best[i].item() for i in missed]),
                   "missed_best_cos_parent": _mean(parent_cos)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    path = out / name / "diagnosis.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = {(r["arm"], r["seed"]) for r in rows}
    kept = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    merged = sorted([r for r in kept if (r["arm"], r["seed"]) not in new] + rows, key=lambda r: (r["seed"], r["arm"]))
    path.write_text("".join(json.dumps(r) + "\n" for r in merged))  # rows of other seeds are kept
    return rows


def _mean(v: list[float]) -> float | None:
    return round(sum(v) / len(v), 3) if v else None


@torch.no_grad()
def oracle_fvu(name: str, seed: int, steps: int, train: dict = TRAIN) -> float:
    """Held-out FVU of non-negative pursuit over the planted atoms (the setting's budget and rule)."""
    from saes import mp_pursuit

    s = SETTINGS[name]
    _, test, _, atoms, _ = make_data(s, seed, train)
    sel = mp_pursuit.select(test, atoms, steps=steps, residual_fraction=s.get("residual_fraction", 0.0)
                            if steps == s.get("cap") else 0.0)
    return ((test - mp_pursuit.sparse_reconstruct(sel, atoms)).pow(2).sum() / (test - test.mean(0)).pow(2).sum()).item()


def summarise(out: Path) -> dict:
    """Per setting and arm: means, sd, worst seed against the median, stuck seeds; MP now vs before
    and vs TopK per seed."""
    summary = {}
    for folder in sorted(p for p in out.iterdir() if (p / "runs.jsonl").is_file()):
        rows = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
        seeds = sorted({r["seed"] for r in rows})
        budget = SETTINGS[folder.name].get("cap") or SETTINGS[folder.name]["k"]
        train = rows[0].get("train", TRAIN)
        oracle = [oracle_fvu(folder.name, seed, budget, train) for seed in seeds]
        floors = [r["floor"] for r in rows if "floor" in r]
        reachable = bool(floors) and sum(oracle) / len(oracle) <= 1.1 * sum(floors) / len(floors)
        arms = {}
        for arm in dict.fromkeys(r["arm"] for r in rows):
            rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
            entry = {"seeds": [r["seed"] for r in rs], "k_or_cap": next(iter(rs))["config"].get("k")
                     or next(iter(rs))["config"].get("n_steps"),
                     **{key: _stats([r[key] for r in rs]) for key in ("fvu", "l0")},
                     "children": _stats([r["recovery"]["children"] for r in rs]),
                     "missed_children": [r["missed_atoms"]["children"] for r in rs],
                     "fvu_per_seed": [round(r["fvu"], 4) for r in rs]}
            fvus = sorted(r["fvu"] for r in rs)
            entry["worst_over_median"] = fvus[-1] / fvus[len(fvus) // 2] if len(fvus) % 2 else \
                fvus[-1] / ((fvus[len(fvus) // 2 - 1] + fvus[len(fvus) // 2]) / 2)
            if "floor" in rs[0]:
                ratio = [r["fvu_over_floor"] for r in rs]
                entry.update(floor=_stats([r["floor"] for r in rs]), fvu_over_floor=[round(x, 2) for x in ratio])
                if reachable:
                    entry["stuck_seeds"] = [r["seed"] for r in rs if r["fvu_over_floor"] >= STUCK_RATIO]
            arms[arm] = entry
        pairs = {}
        for base in ("mp_before", "topk"):
            if "mp" in arms and base in arms:
                by = {(r["arm"], r["seed"]): r for r in rows}
                seeds = [s for s in arms["mp"]["seeds"] if (base, s) in by]
                dc = [by["mp", s]["recovery"]["children"] - by[base, s]["recovery"]["children"] for s in seeds]
                df = [by["mp", s]["fvu"] - by[base, s]["fvu"] for s in seeds]
                pairs[f"mp_vs_{base}"] = {"seeds": seeds, "children_diff": [round(x, 4) for x in dc],
                                          "fvu_diff": [round(x, 4) for x in df],
                                          "children_higher": sum(x > 0 for x in dc),
                                          "fvu_lower": sum(x < 0 for x in df)}
        summary[folder.name] = {"arms": arms, "paired": pairs, "oracle_fvu": _stats(oracle), "budget": budget,
                                "floor_reachable": reachable}
    write_json(out / "summary.json", summary)
    _plot(summary, out / "stuck_seeds.png")
    for name, s in summary.items():
        print(f"{name}: oracle FVU (planted atoms, budget {s['budget']}) {s['oracle_fvu']['mean']:.4f}; floor "
              f"reachable: {s['floor_reachable']}")
        for arm, e in s["arms"].items():
            extra = f" stuck {e['stuck_seeds']}" if "stuck_seeds" in e else ""
            print(f"{name:20s} {arm:13s} k/cap {e['k_or_cap']} FVU {e['fvu']['mean']:.4f}±{e['fvu']['sd']:.4f} "
                  f"(worst {max(e['fvu_per_seed']):.4f}) L0 {e['l0']['mean']:.2f} children "
                  f"{e['children']['mean']:.3f}±{e['children']['sd']:.3f} missed {e['missed_children']} worst/median "
                  f"{e['worst_over_median']:.2f}{extra}")
    return summary


def _stats(v: list[float]) -> dict[str, float]:
    m = sum(v) / len(v)
    return {"mean": m, "sd": math.sqrt(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1)), "min": min(v), "max": max(v)}


def _plot(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(summary), 3.4))
    FigureCanvasAgg(fig)
    for i, (name, s) in enumerate(summary.items()):
        ax = fig.add_subplot(1, len(summary), i + 1)
        for j, e in enumerate(s["arms"].values()):
            ys = e.get("fvu_over_floor") or e["fvu_per_seed"]
            ax.scatter([j] * len(ys), ys, s=12)
        ax.set_xticks(range(len(s["arms"])), list(s["arms"]), rotation=45, fontsize=7)
        if any("fvu_over_floor" in e for e in s["arms"].values()):
            ax.axhline(STUCK_RATIO, color="gray", lw=0.8, ls="--")
            ax.set_ylabel("held-out FVU / noise floor", fontsize=8)
        else:
            ax.set_ylabel("held-out FVU", fontsize=8)
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict | list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--setting", choices=sorted(SETTINGS), help="run every arm of this setting on every seed")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="summarise every setting under --out")
    p.add_argument("--diagnose", action="store_true", help="with --setting: dead atoms over training and what "
                   "the missed children's best atoms are, MP-SAE before and after the cure")
    p.add_argument("--steps", type=int, default=TRAIN["steps"], help="training steps per SAE")
    p.add_argument("--batch", type=int, default=TRAIN["batch"], help="rows per training step")
    a = p.parse_args(argv)
    if a.summary:
        return summarise(a.out)
    if a.setting is None:
        p.error("give --setting NAME or --summary")
    torch.set_num_threads(1)
    train = {**TRAIN, "steps": a.steps, "batch": a.batch}
    if a.diagnose:
        return diagnose(a.out, a.setting, list(range(a.first_seed, a.first_seed + a.seeds)), train=train)
    return run_setting(a.out, a.setting, list(range(a.first_seed, a.first_seed + a.seeds)), train)


if __name__ == "__main__":
    main()
