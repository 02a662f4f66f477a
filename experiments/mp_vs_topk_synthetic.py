"""MP-SAE vs TopK vs ReLU SAEs on data from a planted hierarchical dictionary.

The data: ``n_parents`` parent atoms, each with ``n_children`` children that are active only when
their parent is (one child per active parent) and orthogonal to it (conditional orthogonality);
plus ``n_singles`` independent single atoms. All atoms are unit norm; other pairs are random.
Every SAE gets the same L0 budget ``--k``: MP-SAE as ``n_steps`` pursuit steps, TopK as ``k`` active
latents, ReLU with the L1 weight (from a small grid) whose held-out L0 is closest to it. Reported per
SAE and seed: FVU on held-out data, L0, and dictionary recovery = mean over true atoms of the best
cosine with any decoder row, per family (parents, children, singles).

    python experiments/mp_vs_topk_synthetic.py --out experiments/results/mp_vs_topk_synthetic
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import saes.mp
import saes.relu
import saes.topk  # noqa: F401 - registers topk
from interp.atomic import write_json
from interp.stats import sign_test
from saes.base import build
from saes.trainer import TrainConfig, Trainer


def planted_dictionary(d_model: int, n_parents: int, n_children: int, n_singles: int, sibling_cos: float,
                       gen: torch.Generator):
    """Unit-norm atoms ``[n_atoms, d_model]`` and the family of each (0 parent, 1 child, 2 single).

    Children are orthogonal to their parent; siblings share a family direction so that their
    pairwise cosine is about ``sibling_cos``."""
    parents = torch.nn.functional.normalize(torch.randn(n_parents, d_model, generator=gen), dim=1)
    children = []
    for p in parents:
        shared = torch.nn.functional.normalize(torch.randn(d_model, generator=gen), dim=0)
        own = torch.nn.functional.normalize(torch.randn(n_children, d_model, generator=gen), dim=1)
        c = sibling_cos ** 0.5 * shared + (1 - sibling_cos) ** 0.5 * own
        c -= (c @ p)[:, None] * p  # orthogonal to its parent
        children.append(torch.nn.functional.normalize(c, dim=1))
    singles = torch.nn.functional.normalize(torch.randn(n_singles, d_model, generator=gen), dim=1)
    atoms = torch.cat([parents, torch.cat(children), singles])
    family = torch.tensor([0] * n_parents + [1] * (n_parents * n_children) + [2] * n_singles)
    return atoms, family


def sample(n: int, atoms: torch.Tensor, a: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """``n`` rows: sparse non-negative combinations of the planted atoms, plus small noise. An active
    parent has one child (uniform) with probability ``p_child``; a child is never active alone."""
    P, C, S = a.n_parents, a.n_children, a.n_singles
    coef = torch.zeros(n, atoms.shape[0])
    parent_on = torch.rand(n, P, generator=gen) < a.p_parent
    coef[:, :P] = parent_on * (1 + torch.rand(n, P, generator=gen))
    child = torch.randint(0, C, (n, P), generator=gen)
    cols = P + torch.arange(P)[None, :] * C + child
    child_on = parent_on & (torch.rand(n, P, generator=gen) < a.p_child)
    vals = child_on * (0.5 + torch.rand(n, P, generator=gen))
    coef.scatter_(1, cols, vals)
    single_on = torch.rand(n, S, generator=gen) < a.p_single
    coef[:, P + P * C:] = single_on * (1 + torch.rand(n, S, generator=gen))
    return coef @ atoms + a.noise * torch.randn(n, atoms.shape[1], generator=gen)


def recovery(W_dec: torch.Tensor, atoms: torch.Tensor, family: torch.Tensor) -> dict[str, float]:
    cos = torch.nn.functional.normalize(atoms, dim=1) @ torch.nn.functional.normalize(W_dec, dim=1).T
    best = cos.max(1).values
    return {name: best[family == i].mean().item() for i, name in enumerate(("parents", "children", "singles"))}


@torch.no_grad()
def evaluate(sae, x: torch.Tensor) -> dict[str, float]:
    sae.eval()
    out = sae(x)
    fvu = ((out.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    l0 = (out.codes != 0).sum(-1).float()
    return {"fvu": fvu, "l0": l0.mean().item(), "l0_min": l0.min().item(), "l0_max": l0.max().item()}


def train(arch: str, cfg: dict, batches: list[torch.Tensor], a: argparse.Namespace, seed: int):
    torch.manual_seed(seed)
    sae = build(arch, d_model=a.d_model, d_sae=a.d_sae, **cfg)
    tc = TrainConfig(total_tokens=a.batch * a.steps, batch_tokens=a.batch, lr=a.lr, progress=False,
                     seed=seed, log_every=max(1, a.steps // 4), dead_tokens=a.batch * getattr(a, "dead_batches", 50))
    return Trainer(sae, tc).fit(batches).saes_[""]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--d-model", type=int, default=48)
    p.add_argument("--n-parents", type=int, default=8)
    p.add_argument("--n-children", type=int, default=4)
    p.add_argument("--n-singles", type=int, default=16)
    p.add_argument("--p-parent", type=float, default=0.15)
    p.add_argument("--p-child", type=float, default=0.5, help="probability that an active parent has a child")
    p.add_argument("--p-single", type=float, default=0.05)
    p.add_argument("--sibling-cos", type=float, default=0.0, help="cosine between sibling children")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--d-sae", type=int, default=112)
    p.add_argument("--k", type=int, default=4, help="L0 budget: MP-SAE's n_steps and TopK's k")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: first_seed .. first_seed + seeds - 1")
    p.add_argument("--grid-summary", action="store_true",
                   help="only summarise every sub-folder of --out that holds a results.json (one setting each): "
                        "writes grid_summary.json and grid.png there")
    p.add_argument("--merge", type=Path, nargs="*", default=None,
                   help="only merge the runs of these earlier --out folders into --out (summary + plot)")
    p.add_argument("--l1-grid", type=float, nargs="*", default=[0.08, 0.15],
                   help="ReLU L1 weights tried; the one with L0 closest to k is reported (none: no ReLU)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.grid_summary:
        return grid_summary(a.out)
    t0 = time.time()
    runs = []
    if a.merge:
        runs = [r for d in a.merge for r in json.loads((d / "results.json").read_text())["runs"]]
    for seed in ([] if a.merge else range(a.first_seed, a.first_seed + a.seeds)):
        gen = torch.Generator().manual_seed(1000 + seed)
        atoms, family = planted_dictionary(a.d_model, a.n_parents, a.n_children, a.n_singles,
                                            a.sibling_cos, gen)
        batches = [sample(a.batch, atoms, a, gen) for _ in range(a.steps)]
        test = sample(8192, atoms, a, gen)
        specs = [("mpsae", {"n_steps": a.k}), ("topk", {"k": a.k})] + [("relu", {"l1_coeff": l1}) for l1 in a.l1_grid]
        relu_runs = []
        for arch, cfg in specs:
            sae = train(arch, cfg, batches, a, seed)
            row = {"seed": seed, "arch": arch, "config": cfg, **evaluate(sae, test),
                   "recovery": recovery(sae.W_dec.detach(), atoms, family)}
            print(json.dumps(row))
            (relu_runs if arch == "relu" else runs).append(row)
        if relu_runs:
            best = min(relu_runs, key=lambda r: abs(r["l0"] - a.k))  # the ReLU SAE closest to the L0 budget
            runs.append({**best, "l1_grid": [{"l1_coeff": r["config"]["l1_coeff"], "l0": r["l0"], "fvu": r["fvu"]}
                                             for r in relu_runs]})
    summary = {}
    for arch in ("mpsae", "topk", "relu"):
        rs = [r for r in runs if r["arch"] == arch]
        if not rs:
            continue
        summary[arch] = {key: _mean_sd([r[key] for r in rs]) for key in ("fvu", "l0")}
        for fam in ("parents", "children", "singles"):
            summary[arch][f"recovery_{fam}"] = _mean_sd([r["recovery"][fam] for r in rs])
    # paired per seed: in how many seeds MP-SAE beats TopK (recovery per family, and FVU)
    by_seed = {(r["seed"], r["arch"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if (r["seed"], "topk") in by_seed and (r["seed"], "mpsae") in by_seed})
    if seeds:
        pairs = [(by_seed[s, "mpsae"], by_seed[s, "topk"]) for s in seeds]
        summary["mpsae_vs_topk"] = {
            "seeds": seeds,
            **{f"{fam}_diff": [round(m["recovery"][fam] - t["recovery"][fam], 4) for m, t in pairs]
               for fam in ("parents", "children", "singles")},
            "fvu_diff": [round(m["fvu"] - t["fvu"], 4) for m, t in pairs],
            "children_wins": sum(m["recovery"]["children"] > t["recovery"]["children"] for m, t in pairs),
        }
    result = {"args": json.loads(json.dumps(vars(a), default=str)),
              "runs": runs, "summary": summary, "seconds": round(time.time() - t0, 1)}
    write_json(a.out / "results.json", result)
    _plot(summary, a.out / "recovery.png", a.k)
    print(json.dumps(summary, indent=1))
    return result


def grid_summary(root: Path) -> dict:
    """One row per setting (sub-folder): its data options, MP-SAE minus TopK per seed, wins, means."""
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "results.json").is_file()):
        res = json.loads((d / "results.json").read_text())
        s, args = res["summary"], res["args"]
        cmp = s["mpsae_vs_topk"]
        rows.append({"setting": d.name, "p_child": args["p_child"], "sibling_cos": args["sibling_cos"], "k": args["k"],
                     "seeds": cmp["seeds"], "children_wins": cmp["children_wins"], "n_seeds": len(cmp["seeds"]),
                     "children_diff": cmp["children_diff"], "parents_diff": cmp["parents_diff"],
                     "fvu_diff": cmp["fvu_diff"],
                     **{f"{arch}_{key}": round(s[arch][key]["mean"], 4) for arch in ("mpsae", "topk", "relu")
                        if arch in s for key in ("fvu", "l0", "recovery_parents", "recovery_children")}})
    if not rows:
        raise SystemExit(f"no <setting>/results.json under {root}")

    def pooled(rs: list[dict]) -> dict:  # every (setting, seed) pair of the rows, MP-SAE vs TopK
        child = [d for r in rs for d in r["children_diff"]]
        parent = [d for r in rs for d in r["parents_diff"]]
        fvu = [d for r in rs for d in r["fvu_diff"]]
        wins = sum(d > 0 for d in child)
        return {"settings": len(rs), "pairs": len(child), "children_wins": wins,
                "children_mean_diff": round(sum(child) / len(child), 4),
                "children_sign_test_p": sign_test(wins, len(child)),
                "parents_wins": sum(d > 0 for d in parent), "fvu_lower": sum(d < 0 for d in fvu)}

    out = {"settings": rows, "pooled_all": pooled(rows),
           "pooled_sibling_cos_0": pooled([r for r in rows if r["sibling_cos"] == 0])}
    write_json(root / "grid_summary.json", out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "children_diff", "children recovery: MP-SAE minus TopK"),
                           (axes[1], "fvu_diff", "held-out FVU: MP-SAE minus TopK")):
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r[key]), r[key], s=14, color="tab:blue" if r["sibling_cos"] == 0 else "tab:orange")
            ax.plot([i - 0.25, i + 0.25], [sum(r[key]) / len(r[key])] * 2, color="k", lw=1)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(rows)), [f"p_child {r['p_child']:g}\nsib cos {r['sibling_cos']:g}\n"
                                         f"{r['seeds'][0]}-{r['seeds'][-1]}" for r in rows], fontsize=6)
        ax.set_title(title + " (one dot per seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(root / "grid.png", dpi=120)
    plt.close(fig)
    for r in rows:
        print(f"{r['setting']:40s} children wins {r['children_wins']}/{r['n_seeds']}  "
              f"MP {r['mpsae_recovery_children']:.3f} "
              f"TopK {r['topk_recovery_children']:.3f}  FVU MP {r['mpsae_fvu']:.3f} TopK {r['topk_fvu']:.3f}")
    for name in ("pooled_all", "pooled_sibling_cos_0"):
        p = out[name]
        print(f"{name}: children {p['children_wins']}/{p['pairs']} (mean {p['children_mean_diff']:+.3f}, sign test p "
              f"{p['children_sign_test_p']:.2g}); parents {p['parents_wins']}/{p['pairs']}; "
              f"lower FVU {p['fvu_lower']}/{p['pairs']}")
    return out


def _mean_sd(v: list[float]) -> dict[str, float]:
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1))
    return {"mean": m, "sd": sd}


def _plot(summary: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = ("parents", "children", "singles")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, arch in enumerate(a for a in summary if a in ("mpsae", "topk", "relu")):
        means = [summary[arch][f"recovery_{f}"]["mean"] for f in fams]
        sds = [summary[arch][f"recovery_{f}"]["sd"] for f in fams]
        ax.bar([j + 0.27 * (i - 1) for j in range(3)], means, 0.27, yerr=sds,
               label=f"{arch} (L0 {summary[arch]['l0']['mean']:.1f}, FVU {summary[arch]['fvu']['mean']:.3f})")
    ax.set_xticks(range(3), fams)
    ax.set_ylabel("mean best cosine to true atom")
    ax.set_title(f"Planted hierarchical dictionary, L0 budget {k}")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
