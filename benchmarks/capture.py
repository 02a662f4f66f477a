"""Capture speed on the embedded model against the bare forward and the peers, in one run.

    python benchmarks/capture.py [--batch 8 --seq 128 --repeats 7]

Rows (fp32, CPU by default): bare HF forward; HF with output_hidden_states=True; this project
capturing all 30 ``hook_resid_post``; this project capturing only ``blocks.6.hook_resid_post``;
TransformerLens' TransformerBridge ``run_with_cache`` of all residuals; nnsight tracing the same 30
sites. Rows are timed round-robin (one call of each per round, the order reversed every other round) and
the median is reported, so load from other processes hits every row alike; every round's time is kept
in the JSON (``rounds_s``). ``bare backbone forward`` is the blocks and final norm without the
unembedding, which is what a capture of every layer runs (capture stops after its deepest site).
Writes benchmarks/results/capture.json.

``capture`` copies every kept tensor that shares memory with the forward pass (a model may still
modify it in place), so the all-30 row includes those copies; its target stays <= 1.05x the bare forward.

``--bf16`` adds a row capturing every resid_post from a bf16 copy of the model
(``load_model(..., dtype="bfloat16")``, what ``interp capture --model-dtype bfloat16`` loads) and
its quality against the fp32 model on the same tokens: per layer, the relative error
``||a_bf16 - a_fp32|| / ||a_fp32||`` over all kept positions, and the median and 99th percentile of
the per-row relative errors over positions after the first (position 0 is an attention sink whose
large norm dominates any whole-tensor norm) (``bf16_quality``). Where bf16 matrix products take torch's slow
path (a CPU without bf16 units: :mod:`interp.precision`) the row is left out and ``bf16_skipped`` says why.

``--device cuda`` times on the GPU (each call synchronised); ``--quick --model DIR`` runs a tiny model
with tiny sizes: the code path only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from interp import capture, load_model, precision
from interp.models import _ALIASES, _embedded_copy


def bf16_quality(ref: dict[str, torch.Tensor], low: dict[str, torch.Tensor]) -> dict:
    """Relative error of bf16-model activations against the fp32 model's, per site: whole tensor, and
    per row over positions after the first (median, 99th percentile); the largest over sites beside."""
    per_site = {}
    for site, a in ref.items():
        a, b = a.float(), low[site].float()
        rows = ((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12))[:, 1:].flatten()
        per_site[site] = {"relative_error": float((b - a).norm() / a.norm()),
                          "row_relative_error_median": float(rows.median()),
                          "row_relative_error_p99": float(rows.quantile(0.99))}
    worst = {k: max(v[k] for v in per_site.values()) for k in next(iter(per_site.values()))}
    return {"max_over_sites": worst, "per_site": per_site}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m", help="model name or folder (the peers load it too)")
    ap.add_argument("--bf16", action="store_true", help="add the bf16-model capture row and its quality")
    ap.add_argument("--quick", action="store_true", help="batch 2 x 16 tokens, 2 repeats: the code path only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 16, 2

    model, tok = load_model(args.model, device=args.device)
    n_layers = model.config.num_hidden_layers
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), min(40000, vocab), (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    all_sites = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
    one_site = f"blocks.{min(6, n_layers - 1)}.hook_resid_post"
    all_row, one_row = f"interp.capture, all {n_layers} resid_post", f"interp.capture, {one_site}"
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)

    def bare():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def backbone():  # the blocks and the final norm, no unembedding: what capture of every layer runs
        with torch.no_grad():
            model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def hidden_states():
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        [h.cpu() for h in out.hidden_states]

    def ours_all():
        capture(model, ids, all_sites)

    def ours_layer6():
        capture(model, ids, one_site)

    rows = {"bare HF forward": bare, "bare backbone forward (no lm_head)": backbone,
            "HF output_hidden_states=True": hidden_states, all_row: ours_all, one_row: ours_layer6}
    # capture() returns CPU tensors by default; the bridge and nnsight keep theirs on the model's device. Off the
    # CPU (and in --quick, so that the row is tested) a row keeps them there too: the like-for-like comparison.
    kept_row = f"interp.capture, all {n_layers} resid_post, kept on the device"
    if args.quick or not str(args.device).startswith("cpu"):
        rows[kept_row] = lambda: capture(model, ids, all_sites, device=ids.device)
    quality = None
    bf16_skipped = None if args.quick or not args.bf16 else precision.skip_reason(args.device, "--bf16 row")
    if bf16_skipped:
        print(bf16_skipped, file=sys.stderr, flush=True)
    if args.bf16 and not bf16_skipped:
        low_model, _ = load_model(args.model, device=args.device, dtype="bfloat16")
        low_row = f"interp.capture, all {n_layers} resid_post, bf16 model"
        rows[low_row] = lambda: capture(low_model, ids, all_sites)
        quality = bf16_quality(capture(model, ids, all_sites), capture(low_model, ids, all_sites))

    # The bridge switches its model to eager attention in place, so it gets its own copy.
    from transformer_lens.model_bridge import TransformerBridge

    bmodel, _ = load_model(args.model, device=args.device)
    name = str(_embedded_copy()) if args.model.lower() in _ALIASES else args.model
    bridge = TransformerBridge.boot_transformers(name, hf_model=bmodel, tokenizer=tok)

    def tl_bridge():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        assert len([k for k in cache.keys() if k.endswith("hook_resid_post")]) == n_layers

    rows["TransformerBridge.run_with_cache (resid_post)"] = tl_bridge

    import nnsight

    nmodel, _ = load_model(args.model, device=args.device)
    lm = nnsight.LanguageModel(nmodel, tokenizer=tok)

    def nnsight_trace():
        saved = []
        with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask}):
            for layer in lm.model.layers:
                saved.append(layer.output.save())
        assert len(saved) == n_layers

    nnsight_row = f"nnsight trace ({n_layers} layer outputs)"
    rows[nnsight_row] = nnsight_trace

    for fn in rows.values():  # warm-up
        fn()
    load_before = list(os.getloadavg())
    times: dict[str, list[float]] = {k: [] for k in rows}
    order = list(rows)
    for r in range(args.repeats):  # one call of each row per round; the order reverses every round
        for name in (order if r % 2 == 0 else order[::-1]):
            sync()
            t0 = time.perf_counter()
            rows[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["bare HF forward"]
    all30 = all_row
    per_round = {"all30_over_bare": [a / b for a, b in zip(times[all30], times["bare HF forward"])],
                 "all30_over_backbone": [a / b for a, b in zip(times[all30],
                                                               times["bare backbone forward (no lm_head)"])]}
    tokens = args.batch * args.seq
    table = [{"row": k, "median_s": round(v, 4), "tokens_per_s": round(tokens / v, 1),
              "x_bare_forward": round(v / base, 3)} for k, v in med.items()]
    checks = {
        "all30_within_1.05x_bare": med[all_row] / base <= 1.05,
        "layer6_at_most_0.35x_bare": med[one_row] / base <= 0.35,
        "all30_at_least_1.3x_faster_than_bridge":
            med["TransformerBridge.run_with_cache (resid_post)"] / med[all_row] >= 1.3,
    }
    if quality is not None:
        per_round["all30_bf16_over_all30_fp32"] = [a / b for a, b in zip(times[low_row], times[all30])]
    result = {"command": "python benchmarks/capture.py " + " ".join(  # a flag that is on is written bare
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if k != "out" and v is not False),
        "model": ("smollm2-135m (GGUF Q4_1 dequantized to fp32)" if args.model.lower() in _ALIASES else args.model),
        "quick": args.quick, "batch": args.batch, "seq": args.seq,
        "device": args.device,
        "dtype": "float32" + (" (and a bf16 copy: the bf16 row)" if quality is not None else ""),
        "bf16_quality": quality, **({"bf16_skipped": bf16_skipped} if bf16_skipped else {}),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "rows": table, "targets_met": checks,
        "rounds_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "round_order": "rows in the order of rounds_s on even rounds, reversed on odd rounds",
        "per_round_ratio_median": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "speedup_vs_bridge_all30": round(med["TransformerBridge.run_with_cache (resid_post)"] / med[all_row], 2),
        "speedup_vs_nnsight_all30": round(med[nnsight_row] / med[all_row], 2),
        **({"speedup_vs_bridge_all30_kept_on_device":
            round(med["TransformerBridge.run_with_cache (resid_post)"] / med[kept_row], 2),
            "speedup_vs_nnsight_all30_kept_on_device": round(med[nnsight_row] / med[kept_row], 2)}
           if kept_row in med else {})}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'row':48s} {'median s':>9s} {'tok/s':>8s} {'x bare':>7s}")
    for r in table:
        print(f"{r['row']:48s} {r['median_s']:9.3f} {r['tokens_per_s']:8.0f} {r['x_bare_forward']:7.3f}")
    print("targets:", checks)
    print("median of per-round ratios:", result["per_round_ratio_median"])
    if quality is not None:
        print("bf16 model against fp32, largest over sites:", quality["max_over_sites"])
    return result


if __name__ == "__main__":
    main()
