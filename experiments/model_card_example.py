"""Render the model card of a real trained SAE (the committed example).

Either renders the card for an existing folder of trained SAEs (``--from DIR``, e.g. the output of
``experiments/train_sae_smollm2.py``), or trains a small TopK SAE on the embedded SmolLM2-135M's
residual stream first (the default), evaluates it (explained variance, L0, CE loss recovered on
held-out documents), stores the evaluation in the checkpoint with :func:`saes.checkpoint.annotate`,
and runs :func:`saes.publish.prepare` (everything ``interp sae publish`` does except the upload).

Outputs: the SAE folder under ``--work`` (weights are not committed), and under
``experiments/results/model_card_example/``: ``README.md`` (the card), ``latent_density.png``,
each site's ``cfg.json`` and ``run.json`` (what was run, how long, what was measured).

    python experiments/model_card_example.py                       # train + render (~17 min on 2 busy cores)
    python experiments/model_card_example.py --from runs/sae_smollm2  # render an existing run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import interp
import saes
from interp.data import load_texts, pack, token_mask
from interp.provenance import recorded_command
from interp.store import ActivationStore
from saes.checkpoint import annotate, read
from saes.evaluate import DENSITY_PLOT, downstream_metrics, reconstruction_metrics
from saes.locate import list_sites
from saes.publish import prepare
from saes.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "model_card_example"
REPO_ID = "interp-toolkit/smollm2-135m-saes-example"
RUN_INFO = "example_run.json"


def train_small(work: Path, args: argparse.Namespace) -> dict:
    model, tok = interp.load_model("smollm2-135m")
    docs = list(load_texts(None, shuffle_seed=0))
    n_eval = max(1, len(docs) // 20)
    train_docs, eval_docs = docs[n_eval:], docs[:n_eval]  # disjoint documents for evaluation
    site = args.site
    buffer = args.buffer_batches * args.batch_tokens
    store = ActivationStore(model, tok, [site], dataset=train_docs, context_size=args.context_size,
                            batch_tokens=args.batch_tokens, buffer_tokens=buffer, epochs=None, seed=1)
    sae = saes.build("topk", d_model=model.config.hidden_size, d_sae=args.d_sae, k=args.k)
    cfg = TrainConfig(total_tokens=args.tokens, batch_tokens=args.batch_tokens, log_every=10)
    t0 = time.time()
    trainer = Trainer({site: sae}, cfg, out_dir=work).fit(store)
    train_s = time.time() - t0
    sae = trainer.saes_[site].eval()

    eval_store = ActivationStore(model, tok, [site], dataset=eval_docs, context_size=args.context_size,
                                 batch_tokens=args.batch_tokens, buffer_tokens=buffer, epochs=1, seed=2)
    t0 = time.time()
    report = reconstruction_metrics(sae, eval_store, site=site, n_batches=args.eval_batches, progress=False)
    windows = torch.stack(list(pack(eval_docs, tok, args.context_size))[: args.eval_windows])
    report.update(downstream_metrics(model, sae, site, windows, splice_mask=token_mask(windows, tok),
                                     progress=False))
    eval_s = time.time() - t0
    folder = work / site
    annotate(folder, metrics=report, metadata={"model_name": "smollm2-135m", "hook_name": site,
                                               "context_size": args.context_size, "prepend_bos": False,
                                               "dataset_path": "interp default offline corpus (pydocs)"})
    return {"mode": "trained here", "site": site, "d_sae": args.d_sae, "k": args.k, "train_tokens": args.tokens,
            "batch_tokens": args.batch_tokens, "buffer_tokens": buffer, "train_seconds": round(train_s, 1),
            "eval_seconds": round(eval_s, 1),
            "eval_rows": report["n_rows"], "eval_windows": int(windows.shape[0]),
            "metrics": {k: v for k, v in report.items() if k in ("explained_variance", "l0_mean", "ce_loss_recovered",
                                                                  "ce_clean", "ce_with_sae", "ce_zero_ablation",
                                                                  "dead_fraction", "fvu")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", default=None, help="render an existing folder of trained SAEs")
    ap.add_argument("--work", default="runs/model_card_example", help="where the trained SAE is written")
    ap.add_argument("--out", "--results", dest="results", default=str(RESULTS),
                    help="where the card, plot, cfg.json and run.json go")
    ap.add_argument("--site", default="blocks.6.hook_resid_post")
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--buffer-batches", type=int, default=4, help="shuffle buffer, in batches")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=32)
    args = ap.parse_args()

    if args.source:
        work = Path(args.source)
        info = work / RUN_INFO  # written when this script trained the SAEs there
        run = json.loads(info.read_text()) if info.is_file() else {"mode": f"rendered from {args.source}"}
        if (work / "report.json").is_file():  # experiments/train_sae_smollm2.py's record of its run
            run["source_report"] = json.loads((work / "report.json").read_text())
    else:
        work = Path(args.work)
        if work.exists():
            shutil.rmtree(work)
        run = train_small(work, args)
        run["command"] = recorded_command("experiments/model_card_example.py", sys.argv[1:])
        (work / RUN_INFO).write_text(json.dumps(run, indent=1, default=str))
    plan = prepare(work, REPO_ID)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for name in ("README.md", DENSITY_PLOT):
        shutil.copyfile(work / name, results / name)
    for site in list_sites(work):
        dst = results / site / "cfg.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / site / "cfg.json", dst)
        run.setdefault("card_metrics", {})[site] = read(work / site).training.get("metrics", {})
    if args.source:
        run["rendered_by"] = f"python experiments/model_card_example.py --from {args.source}"
    run.update({
                "files_that_would_be_uploaded": plan.files,
                "note": "CPU run on a 2-core machine shared with other jobs; timings are indicative only"})
    for v in run.get("card_metrics", {}).values():  # keep run.json short: drop the long per-latent lists
        v.pop("l0_histogram", None)
    (results / "run.json").write_text(json.dumps(run, indent=1, default=str))
    print(json.dumps({k: run[k] for k in run if k != "files_that_would_be_uploaded"}, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
