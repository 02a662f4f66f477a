"""FVU against L0 for MP-SAE and TopK on SmolLM2-135M's residual stream.

Activations of one residual site are captured once from the embedded model over the default
offline corpus (position 0 excluded: attention sink), held in memory, and every SAE trains on the
same batches with the project trainer; FVU and L0 are measured on held-out tokens. Results are
written after every SAE; a rerun with the same ``--out`` skips the (architecture, k) pairs already
there, so an interrupted run resumes and runs over disjoint ``--ks`` can be merged. Here ``k`` is
the L0 budget: TopK's ``k`` (active latents per row) and MP-SAE's ``n_steps`` (pursuit steps per
row). For each k both SAEs get the same dictionary size and data. The published finding this checks (EleutherAI's
replication of MP-SAE on this model): MP lags TopK at k = 16 / 32 and is comparable or better at
k >= 64.

    python experiments/mp_vs_topk_smollm2.py --out experiments/results/mp_vs_topk_smollm2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import saes.mp
import saes.topk  # noqa: F401 - registers topk
from interp.atomic import write_json
from interp.provenance import machine_path, placeholder
from saes.base import build
from saes.mp import mp_metrics
from saes.trainer import TrainConfig, Trainer

BUDGET_FIELD = {"topk": "k", "mpsae": "n_steps"}
"""The config field that takes the L0 budget ``k``: TopK's active latents, MP-SAE's pursuit steps."""


def capture_rows(site: str, n_tokens: int, context_size: int, batch: int) -> torch.Tensor:
    from interp import load_model
    from interp.store import ActivationStore

    model, tok = load_model("smollm2-135m")
    store = ActivationStore(model, tok, site, context_size=context_size, batch_tokens=batch,
                            max_windows=int(1.1 * n_tokens / (context_size - 1)) + 2, progress=True)
    rows, total = [], 0
    for b in store:
        x = b[site] if isinstance(b, dict) else b
        rows.append(x)
        total += x.shape[0]
        if total >= n_tokens:
            break
    out = torch.cat(rows)[:n_tokens]
    if out.shape[0] < n_tokens:
        raise SystemExit(f"captured only {out.shape[0]} rows of the {n_tokens} asked for; ask for fewer tokens")
    return out


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, chunk: int = 2048) -> dict:
    sae.eval()
    sq, l0s, mp = 0.0, [], None
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        if hasattr(sae, "pursue"):
            res = sae.pursue(xb)
            x_hat, codes = res.x_hat, res.codes
            mp = mp_metrics(res) if mp is None else mp
        else:
            out = sae(xb)
            x_hat, codes = out.x_hat, out.codes
        sq += (x_hat - xb).pow(2).sum().item()
        l0s.append((codes != 0).sum(-1).float())
    l0 = torch.cat(l0s)
    fvu = sq / (x - x.mean(0)).pow(2).sum().item()
    out = {"fvu": fvu, "l0": l0.mean().item(), "l0_min": l0.min().item(), "l0_max": l0.max().item()}
    if mp is not None:
        out["mp_first_chunk"] = {k: v for k, v in mp.items() if k != "residual_norm_per_step"}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--train-tokens", type=int, default=400_000)
    p.add_argument("--eval-tokens", type=int, default=16_384)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1, help="passes over the captured training tokens")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--activations", type=Path, default=None,
                   help="safetensors file of captured rows to reuse (written if missing; "
                        "default OUT/activations.safetensors)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    site = f"blocks.{a.layer}.hook_resid_post"
    from safetensors.torch import load_file, save_file

    cache = a.activations or (a.out / "activations.safetensors")
    n = a.train_tokens + a.eval_tokens
    if cache.is_file() and load_file(str(cache))["x"].shape[0] >= n:
        rows = load_file(str(cache))["x"][:n]
    else:
        rows = capture_rows(site, n, a.context_size, a.batch)
        tmp = cache.with_suffix(".tmp")
        save_file({"x": rows.contiguous()}, str(tmp))
        tmp.replace(cache)
    gen = torch.Generator().manual_seed(0)
    rows = rows[torch.randperm(rows.shape[0], generator=gen)]
    train, test = rows[: a.train_tokens], rows[a.train_tokens:]
    batches = list(train.split(a.batch))
    batches = [b for b in batches if b.shape[0] == a.batch] * a.epochs
    capture_s = time.time() - t0
    done_path = a.out / "results.json"
    results = json.loads(done_path.read_text())["results"] if done_path.is_file() else []
    results = [r for r in results if r["k"] in a.ks]
    for k in a.ks:
        for arch in ("topk", "mpsae"):
            if any(r["arch"] == arch and r["k"] == k for r in results):
                continue  # resumed: this SAE is already in results.json
            t = time.time()
            torch.manual_seed(0)
            sae = build(arch, d_model=train.shape[1], d_sae=a.d_sae, **{BUDGET_FIELD[arch]: k})
            tc = TrainConfig(total_tokens=a.batch * len(batches), batch_tokens=a.batch, lr=a.lr, progress=False,
                             log_every=max(1, len(batches) // 5))
            tr = Trainer(sae, tc).fit(batches)
            # the rate it trained at: --lr None means the architecture's default, which changes between releases
            row = {"arch": arch, "k": k, "lr": tc.lr_for(sae), **evaluate(tr.saes_[""], test),
                   "train_seconds": round(time.time() - t, 1),
                   "train_fvu_history": [[h["tokens"], h[""]["fvu"]] for h in tr.history_]}
            print(json.dumps(row))
            results.append(row)
            write_json(done_path, {"site": site, "results": results, "partial": True})
    result = {"site": site, "args": {k: (placeholder(k) if isinstance(v, Path) and machine_path(str(v))
                                         else str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "n_train": train.shape[0], "n_eval": test.shape[0], "capture_seconds": round(capture_s, 1),
              "results": results, "seconds": round(time.time() - t0, 1)}
    write_json(done_path, result)
    _plot(results, a.out / "fvu_vs_l0.png", site, len(batches) * a.batch, a.d_sae, a.batch)
    return result


def _plot(results: list[dict], path: Path, site: str, n_train: int, d_sae: int, batch: int = 1024) -> None:
    """Left: held-out FVU against L0. Right: training FVU (logged batches) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for arch, label, style in (("topk", "TopK", "o-"), ("mpsae", "MP-SAE", "s--")):
        rs = sorted((r for r in results if r["arch"] == arch), key=lambda r: r["l0"])
        ax.plot([r["l0"] for r in rs], [r["fvu"] for r in rs], style, label=label)
        for r in rs:
            ax.annotate(f"k={r['k']}", (r["l0"], r["fvu"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ks = sorted({r["k"] for r in results})  # one colour per k, the same for both architectures
        for r in rs:
            h = r.get("train_fvu_history") or []
            if h and not isinstance(h[0], list):  # older results: FVU only, logged every n_batches // 5 steps
                every = max(1, n_train // batch // 5) * batch
                h = [[min((i + 1) * every, n_train), v] for i, v in enumerate(h)]
            if len(h) > 1:
                xs, h = [t for t, _ in h], [v for _, v in h]
                ax2.plot(xs, h, style, ms=3, color=colors[ks.index(r["k"]) % len(colors)], label=f"{label} k={r['k']}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (held-out mean)")
    ax.set_ylabel("FVU (held-out)")
    ax.set_title(f"SmolLM2-135M {site}\n{n_train:,} training tokens seen, d_sae {d_sae}", fontsize=9)
    ax.legend()
    ax2.set_xlabel("training tokens seen")
    ax2.set_ylabel("training FVU (logged batch)")
    ax2.set_title("training curves", fontsize=9)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
