"""Train a TopK SAE on SmolLM2-135M's layer-12 residual stream and evaluate it with every metric.

Writes to ``--out``: the SAE (``<site>/cfg.json`` + ``sae_weights.safetensors`` + ``sparsity.safetensors``),
``train_history.json``, resume checkpoints, ``eval/eval.json`` + ``eval/sparsity.safetensors`` +
``eval/latent_density.png``, and ``report.json`` (config, timings, all metrics, the command).

    python experiments/train_sae_smollm2.py --out runs/sae_l12 --tokens 2000000
    python experiments/train_sae_smollm2.py --out /tmp/x --tokens 8192 --batch-tokens 1024 \\
        --d-sae 1152 --eval-tokens 2048 --eval-windows 2          # the reduced run the tests use

Training data: ``--cache DIR`` (from ``interp capture``), else live activations of the default corpus.
Evaluation data: live activations of the default corpus in a different document order
(``--eval-seed``), and ``--eval-windows`` token windows for the downstream loss, where the SAE is
spliced in at the positions the store feeds to training (not position 0, not separators).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from interp.provenance import recorded_command

SITE = "blocks.12.hook_resid_post"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=16 * 576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--cache", default=None, help="activation cache holding blocks.12.hook_resid_post")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=204_800)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import saes
    from interp.data import sample_windows
    from interp.models import load_model
    from interp.store import ActivationStore, CachedActivations
    from saes.checkpoint import save
    from saes.evaluate import evaluate
    from saes.trainer import TrainConfig, Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load_model("smollm2-135m", device=device)
    buffer = max(4 * args.batch_tokens, min(32 * args.batch_tokens, args.tokens))
    if args.cache:
        data = CachedActivations(args.cache, batch_tokens=args.batch_tokens, seed=args.seed, sites=[SITE], epochs=None)
    else:
        data = ActivationStore(model, tok, [SITE], context_size=args.context_size, batch_tokens=args.batch_tokens,
                               buffer_tokens=buffer, seed=args.seed, device=device)
    torch.manual_seed(args.seed)
    sae = saes.build("topk", d_model=576, d_sae=args.d_sae, k=args.k).to(device)
    cfg = TrainConfig(total_tokens=args.tokens, batch_tokens=args.batch_tokens, lr=args.lr,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, log_every=10)
    t0 = time.perf_counter()
    tr = Trainer({SITE: sae}, cfg, out_dir=out).fit(data, resume=args.resume)
    train_s = time.perf_counter() - t0

    eval_bt = min(4096, args.eval_tokens)
    eval_data = ActivationStore(model, tok, [SITE], context_size=args.context_size, batch_tokens=eval_bt,
                                buffer_tokens=max(eval_bt, min(16 * eval_bt, args.eval_tokens)),
                                seed=args.eval_seed, device=device)
    windows, mask = sample_windows(tok, args.eval_windows, args.context_size, seed=args.eval_seed)
    t1 = time.perf_counter()
    report = evaluate(sae, eval_data, site=SITE, n_batches=max(1, args.eval_tokens // eval_bt), model=model,
                      windows=windows, splice_mask=mask, out_dir=out / "eval", batch_size=8)
    eval_s = time.perf_counter() - t1
    metrics = {k: v for k, v in report.items() if k not in ("latent_density", "l0_histogram")}
    save(sae, out / SITE, metadata={"model_name": "smollm2-135m", "hook_name": SITE,
                                    "context_size": args.context_size, "prepend_bos": False},
         sparsity=report["latent_density"],
         training={"n_tokens": tr.steps_ * args.batch_tokens, "metrics": metrics})
    result = {"command": recorded_command("experiments/train_sae_smollm2.py", argv or sys.argv[1:]),
              "site": SITE, "d_sae": args.d_sae, "k": args.k, "train_tokens": tr.steps_ * args.batch_tokens,
              "batch_tokens": args.batch_tokens, "train_seconds": train_s,
              "train_tokens_per_s": tr.steps_ * args.batch_tokens / train_s, "eval_seconds": eval_s,
              "input_scale_folded": tr.scales_[SITE], "final_train_log": tr.history_[-1] if tr.history_ else None,
              "eval": metrics, "device": str(device)}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
