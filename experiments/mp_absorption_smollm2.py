"""TopK and MP-SAE (fixed k, and threshold-stopped) at equal mean L0 on SmolLM2-135M: first-letter
feature absorption, explained variance and CE loss recovered, several seeds each.

One residual site is captured once from the embedded model over the default offline corpus (position 0
excluded) and every SAE trains on the same rows in the same order with the project trainer; seeds change the
initialisation. The threshold-stopped MP-SAE (``residual_fraction``, ``--cap`` steps at most) trains first;
its mean held-out L0 over seeds, rounded, is then the k of the fixed-k MP-SAE and of TopK (or ``--k``); TopK
runs twice, with the library's encoder initialisation (``topk``) and with the encoder starting at the
decoder's transpose (``topk_scale1``, the default before it was measured). Absorption
(:mod:`probes.absorption`) uses one set of word activations and one set of dense probes for every SAE;
explained variance is measured on held-out rows and CE loss recovered on token windows of the corpus with the
SAE spliced in. Results are written after every SAE; a rerun with the same ``--out`` resumes, and a larger
``--seeds`` adds seeds to the recorded runs: the rerun must have the same settings (refused otherwise), keeps
the recorded fixed k and checks the data against the fingerprints recorded with the runs (the captured rows
and the words' activations).

    python experiments/mp_absorption_smollm2.py --out experiments/results/mp_absorption_smollm2 \\
        --activations runs/smol10_acts.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import t as t_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mp_vs_topk_smollm2 as fvu_study  # noqa: E402 - capture_rows, evaluate

import saes  # noqa: E402
from interp.atomic import write_json  # noqa: E402
from probes.absorption import (  # noqa: E402
    AbsorptionConfig,
    LetterData,
    first_letter_absorption,
    first_letter_data,
    letter_probes,
)

ARMS = ("mp_threshold", "mp", "topk", "topk_scale1")
"""``topk``: TopK with the library's defaults; ``topk_scale1``: the same with the encoder starting at the
decoder's transpose (``enc_init_scale=1``, the default before it was measured; runs recorded before that
change, whose config has no ``enc_init_scale``, are read as this arm)."""
RUN_SETTINGS = ("layer", "train_tokens", "eval_tokens", "context_size", "d_sae", "batch", "lr", "residual_fraction",
                "cap", "dead_batches", "windows", "words_per_letter", "icl_examples")
"""Arguments that change what a run measures: a resumed study must repeat them (``--seeds``, ``--threads``,
``--out`` and ``--activations`` may differ)."""


def fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the tensors' dtypes, shapes and bytes: the same data, bit for bit."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def check_resume(recorded: dict, a: argparse.Namespace, data: dict[str, str]) -> int | None:
    """The fixed k of the recorded runs (None: no fixed-k run yet), after checking that this rerun
    repeats their settings, its ``--k`` agrees with theirs and its data has their fingerprints."""
    args = recorded.get("args")
    if recorded.get("runs") and args is None:
        raise SystemExit(f"{a.out / 'results.json'} has runs but no recorded settings to check a resume against; "
                         "use a new --out")
    if args is not None:
        differ = {key: (args.get(key), getattr(a, key)) for key in RUN_SETTINGS if args.get(key) != getattr(a, key)}
        if differ:
            shown = ", ".join(f"--{key.replace('_', '-')} {new} (recorded {old})" for key, (old, new) in differ.items())
            raise SystemExit(f"the recorded runs in {a.out} used other settings: {shown}; repeat the recorded "
                             "settings to add seeds, or use a new --out")
    ks = {r["k"] for r in recorded.get("runs", []) if r["arm"] != "mp_threshold"}
    if len(ks) > 1:
        raise SystemExit(f"the recorded fixed-k runs in {a.out} disagree on k ({sorted(ks)}); use a new --out")
    k = ks.pop() if ks else None
    if k is not None and a.k is not None and a.k != k:
        raise SystemExit(f"--k {a.k} but the recorded fixed-k runs used k={k}; drop --k or use a new --out")
    for name, value in data.items():
        old = recorded.get("data_fingerprint", {}).get(name)
        if old is not None and old != value:
            raise SystemExit(f"the {name} differ from those of the recorded runs (fingerprint {value}, recorded "
                             f"{old}); rebuild them with the recorded settings or use a new --out")
        if old is None and recorded.get("runs"):
            print(f"note: the recorded runs carry no fingerprint of the {name}; this rerun cannot check them and "
                  f"records {value}", flush=True)
    return k


def letter_data(path: Path, model, tok, site: str, cfg: AbsorptionConfig) -> LetterData:
    """The words' activations, captured once and kept as safetensors + JSON next to the results."""
    from safetensors.torch import load_file, save_file

    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text())["config"] == vars(cfg):
        t = load_file(str(path))
        return LetterData(t["acts"], t["labels"], t["test"].bool(), json.loads(meta.read_text())["words"])
    data = first_letter_data(model, tok, site, cfg)
    save_file({"acts": data.acts.contiguous(), "labels": data.labels, "test": data.test.to(torch.uint8)}, str(path))
    write_json(meta, {"config": vars(cfg), "site": site, "words": data.words})
    return data


@torch.no_grad()
def mean_ce(model, site: str, windows: torch.Tensor, mask: torch.Tensor, edit=None, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over ``windows`` with ``edit(acts) -> acts`` applied at ``site`` on
    the positions of ``mask`` (None: the clean model). Clean and zero-ablated losses do not depend on the
    SAE, so they are computed once for every SAE (what :func:`saes.evaluate.downstream_metrics` repeats)."""
    from interp.sites import add_write_hook, remove_hooks, resolve

    total, count = 0.0, 0
    for lo in range(0, windows.shape[0], batch_size):
        ids, m = windows[lo:lo + batch_size], mask[lo:lo + batch_size]
        handles = add_write_hook(resolve(model, site), lambda a, m=m: torch.where(m[..., None], edit(a), a)) \
            if edit is not None else []
        try:
            logits = model(input_ids=ids).logits
        finally:
            remove_hooks(handles)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(),
                                               reduction="sum")
        total, count = total + float(ce), count + ids.shape[0] * (ids.shape[1] - 1)
    return total / count


def arm_sae(arm: str, d_model: int, a: argparse.Namespace, k: int | None):
    if arm == "mp_threshold":
        return saes.build("mpsae", d_model=d_model, d_sae=a.d_sae, n_steps=a.cap, residual_fraction=a.residual_fraction)
    if arm == "mp":
        return saes.build("mpsae", d_model=d_model, d_sae=a.d_sae, n_steps=k)
    if arm == "topk_scale1":
        return saes.build("topk", d_model=d_model, d_sae=a.d_sae, k=k, enc_init_scale=1.0)
    return saes.build("topk", d_model=d_model, d_sae=a.d_sae, k=k)


def read_recorded(path: Path) -> dict:
    """The recorded study (``{}`` when none), with TopK runs from before the encoder's init scale was a
    setting (their config has no ``enc_init_scale``: they started at scale 1) named ``topk_scale1``."""
    if not path.is_file():
        return {}
    recorded = json.loads(path.read_text())
    for r in recorded.get("runs", []):
        if r["arm"] == "topk" and "enc_init_scale" not in r.get("config", {}):
            r["arm"] = "topk_scale1"
    return recorded


def run_one(arm: str, seed: int, k: int | None, batches, test, ctx: dict, a: argparse.Namespace) -> dict:
    from saes.trainer import TrainConfig, Trainer

    t = time.time()
    torch.manual_seed(seed)
    sae = arm_sae(arm, test.shape[1], a, k)
    tc = TrainConfig(total_tokens=a.batch * len(batches), batch_tokens=a.batch, lr=a.lr, progress=False, seed=seed,
                     log_every=max(1, len(batches) // 5), dead_tokens=a.batch * a.dead_batches)
    tr = Trainer(sae, tc).fit(batches)
    sae = tr.saes_[""].eval()
    train_s = time.time() - t
    row = {"arm": arm, "seed": seed, "k": k, "config": sae.cfg.to_dict(), **fvu_study.evaluate(sae, test),
           "train_seconds": round(train_s, 1)}
    row["explained_variance"] = 1 - row["fvu"]
    ce = mean_ce(ctx["model"], ctx["site"], ctx["windows"], ctx["mask"], lambda acts: sae(acts).x_hat.to(acts.dtype))
    clean, zero = ctx["ce_clean"], ctx["ce_zero"]
    row.update(ce_with_sae=ce, ce_clean=clean, ce_zero_ablation=zero, ce_loss_recovered=(zero - ce) / (zero - clean))
    with torch.no_grad():
        decoder = sae.atoms() if hasattr(sae, "atoms") else sae.W_dec
    ab = first_letter_absorption(sae.encode, decoder.detach(), ctx["letters"], ctx["acfg"], probes=ctx["probes"])
    row["absorption"] = {key: v for key, v in ab.items() if key not in ("config",)}
    row["seconds"] = round(time.time() - t, 1)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--train-tokens", type=int, default=262_144)
    p.add_argument("--eval-tokens", type=int, default=8_192)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=2304)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..SEEDS-1 per arm (recorded ones are kept)")
    p.add_argument("--k", type=int, default=None, help="k of the fixed-k arms (default: the recorded runs' k, "
                   "else the threshold arm's mean held-out L0, rounded)")
    p.add_argument("--residual-fraction", type=float, default=0.45,
                   help="threshold-stopped MP-SAE: a row stops once its residual is this fraction of its norm")
    p.add_argument("--cap", type=int, default=32, help="threshold-stopped MP-SAE: most pursuit steps per row")
    p.add_argument("--dead-batches", type=int, default=50,
                   help="steps without firing after which a latent counts as dead (TopK's AuxK, MP-SAE's resampling)")
    p.add_argument("--windows", type=int, default=16, help="token windows for CE loss recovered")
    p.add_argument("--words-per-letter", type=int, default=100)
    p.add_argument("--icl-examples", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    p.add_argument("--activations", type=Path, default=None, help="safetensors file of captured rows to reuse "
                   "(written if missing; default OUT/activations.safetensors)")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    site = f"blocks.{a.layer}.hook_resid_post"
    from safetensors.torch import load_file, save_file

    from interp import load_model
    from interp.data import sample_windows

    cache = a.activations or (a.out / "activations.safetensors")
    n = a.train_tokens + a.eval_tokens
    if cache.is_file() and load_file(str(cache))["x"].shape[0] >= n:
        rows = load_file(str(cache))["x"][:n]
    else:
        rows = fvu_study.capture_rows(site, n, a.context_size, a.batch)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": rows.contiguous()}, str(cache.with_suffix(".tmp")))
        cache.with_suffix(".tmp").replace(cache)
    rows_sha = fingerprint(rows)
    rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))]
    train, test = rows[: a.train_tokens], rows[a.train_tokens:]
    batches = [b for b in train.split(a.batch) if b.shape[0] == a.batch]
    model, tok = load_model("smollm2-135m")
    acfg = AbsorptionConfig(words_per_letter=a.words_per_letter, icl_examples=a.icl_examples)
    letters = letter_data(a.out / "letter_acts.safetensors", model, tok, site, acfg)
    data = {"captured rows": rows_sha, "word activations": fingerprint(letters.acts, letters.labels,
                                                                                letters.test)}
    probes = letter_probes(letters)
    windows, mask = sample_windows(tok, a.windows, a.context_size, seed=1234)
    ctx = {"model": model, "site": site, "windows": windows, "mask": mask, "letters": letters, "probes": probes,
           "acfg": acfg, "ce_clean": mean_ce(model, site, windows, mask),
           "ce_zero": mean_ce(model, site, windows, mask, torch.zeros_like)}
    path = a.out / "results.json"
    recorded = read_recorded(path)
    recorded_k = check_resume(recorded, a, data)
    results = recorded.get("runs", [])
    done = {(r["arm"], r["seed"]) for r in results}
    args = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(a).items()}
    k = None
    for arm in ARMS:
        if arm != "mp_threshold":
            l0 = [r["l0"] for r in results if r["arm"] == "mp_threshold"]
            k = recorded_k or a.k or max(1, round(sum(l0) / len(l0)))
        for seed in range(a.seeds):
            if (arm, seed) in done:
                continue
            row = run_one(arm, seed, k, batches, test, ctx, a)
            print(json.dumps({key: v for key, v in row.items() if key not in ("config", "absorption")}
                             | {"absorption": row["absorption"]["full_absorption_rate"]}), flush=True)
            results.append(row)
            write_json(path, {"site": site, "args": args, "data_fingerprint": data, "runs": results, "partial": True})
    l0 = [r["l0"] for r in results if r["arm"] == "mp_threshold"]
    out = {"site": site, "args": args, "data_fingerprint": data,
           "n_train": train.shape[0], "n_eval": test.shape[0], "k": k,
           "threshold_mean_l0": sum(l0) / len(l0) if l0 else None,
           "probe_f1": dict(zip(letters.classes, probes.f1)),
           "runs": results, "summary": summarise(results), "seconds": round(time.time() - t0, 1)}
    write_json(path, out)
    plot(out["summary"], results, a.out / "absorption_ev_ce.png")
    return out


def _interval(v: list[float]) -> dict[str, float]:
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    # the two-sided 95% Student t quantile at n - 1 degrees of freedom, for any number of seeds
    half = float(t_dist.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": m, "sd": sd, "ci95": [m - half, m + half], "values": v}


def summarise(results: list[dict], n_boot: int = 2000) -> dict:
    """Per arm: mean, sd and t-interval over seeds of L0, EV, CE loss recovered and both absorption
    scores; a bootstrap over letters of the seed-averaged absorption rates, and of each arm minus TopK."""
    by_arm = {arm: sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"]) for arm in ARMS}
    by_arm = {arm: rs for arm, rs in by_arm.items() if rs}
    letters = sorted(set.intersection(*(set(r["absorption"]["letters"]) for rs in by_arm.values() for r in rs)))
    summary: dict = {"letters": letters}
    for arm, rs in by_arm.items():
        summary[arm] = {key: _interval([r[key] for r in rs])
                        for key in ("l0", "explained_variance", "ce_loss_recovered")}
    if not letters:  # no letter passed the probe checks: no absorption to compare
        return summary
    per_letter = {arm: torch.tensor([[r["absorption"]["letters"][c]["full_absorption_rate"] for c in letters]
                                     for r in rs]).mean(0) for arm, rs in by_arm.items()}
    gen = torch.Generator().manual_seed(0)
    boot = torch.randint(0, len(letters), (n_boot, len(letters)), generator=gen)
    for arm, rs in by_arm.items():
        s = summary[arm]
        for key in ("full_absorption_rate", "absorption_fraction", "mean_main_latents"):
            s[key] = _interval([r["absorption"][key] for r in rs])
        means = per_letter[arm][boot].mean(1)
        s["full_absorption_rate_letter_bootstrap95"] = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
        if arm != "topk" and "topk" in per_letter:
            diff = (per_letter[arm] - per_letter["topk"])[boot].mean(1)
            s["minus_topk_full_absorption"] = {
                "mean": float((per_letter[arm] - per_letter["topk"]).mean()),
                "letter_bootstrap95": torch.quantile(diff, torch.tensor([0.025, 0.975])).tolist(),
                "letters_lower": int((per_letter[arm] < per_letter["topk"]).sum()),
                "letters_higher": int((per_letter[arm] > per_letter["topk"]).sum())}
    return summary


def plot(summary: dict, results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = (("full_absorption_rate", "full absorption rate"), ("absorption_fraction", "absorption fraction"),
            ("explained_variance", "explained variance"), ("ce_loss_recovered", "CE loss recovered"))
    arms = [arm for arm in ARMS if arm in summary]
    fig = Figure(figsize=(12, 3.2))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        if key not in summary[arms[0]]:
            ax.set_title(f"{label}: no letter evaluated", fontsize=9)
            continue
        for j, arm in enumerate(arms):
            s = summary[arm][key]
            ax.bar(j, s["mean"], 0.6, color=f"C{j}", alpha=0.5)
            ax.scatter([j] * len(s["values"]), s["values"], color=f"C{j}", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), [f"{arm}\nL0 {summary[arm]['l0']['mean']:.1f}" for arm in arms], fontsize=7)
        ax.set_title(label, fontsize=9)
        if key == "full_absorption_rate":
            for j, arm in enumerate(arms):
                lo, hi = summary[arm]["full_absorption_rate_letter_bootstrap95"]
                ax.plot([j, j], [lo, hi], color="k", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
