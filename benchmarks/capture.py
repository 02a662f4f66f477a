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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from interp import capture, load_model
from interp.models import _embedded_copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "capture.json"))
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m", device=args.device)
    n_layers = model.config.num_hidden_layers
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    all_sites = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]

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
        capture(model, ids, "blocks.6.hook_resid_post")

    rows = {"bare HF forward": bare, "bare backbone forward (no lm_head)": backbone,
            "HF output_hidden_states=True": hidden_states,
            "interp.capture, all 30 resid_post": ours_all, "interp.capture, blocks.6.hook_resid_post": ours_layer6}

    # The bridge switches its model to eager attention in place, so it gets its own copy.
    from transformer_lens.model_bridge import TransformerBridge

    bmodel, _ = load_model("smollm2-135m", device=args.device)
    bridge = TransformerBridge.boot_transformers(str(_embedded_copy()), hf_model=bmodel, tokenizer=tok)

    def tl_bridge():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        assert len([k for k in cache.keys() if k.endswith("hook_resid_post")]) == n_layers

    rows["TransformerBridge.run_with_cache (resid_post)"] = tl_bridge

    import nnsight

    nmodel, _ = load_model("smollm2-135m", device=args.device)
    lm = nnsight.LanguageModel(nmodel, tokenizer=tok)

    def nnsight_trace():
        saved = []
        with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask}):
            for layer in lm.model.layers:
                saved.append(layer.output.save())
        assert len(saved) == n_layers

    rows["nnsight trace (30 layer outputs)"] = nnsight_trace

    for fn in rows.values():  # warm-up
        fn()
    load_before = list(os.getloadavg())
    times: dict[str, list[float]] = {k: [] for k in rows}
    order = list(rows)
    for r in range(args.repeats):  # one call of each row per round; the order reverses every round
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["bare HF forward"]
    all30 = "interp.capture, all 30 resid_post"
    per_round = {"all30_over_bare": [a / b for a, b in zip(times[all30], times["bare HF forward"])],
                 "all30_over_backbone": [a / b for a, b in zip(times[all30],
                                                               times["bare backbone forward (no lm_head)"])]}
    tokens = args.batch * args.seq
    table = [{"row": k, "median_s": round(v, 4), "tokens_per_s": round(tokens / v, 1),
              "x_bare_forward": round(v / base, 3)} for k, v in med.items()]
    checks = {
        "all30_within_1.05x_bare": med["interp.capture, all 30 resid_post"] / base <= 1.05,
        "layer6_at_most_0.35x_bare": med["interp.capture, blocks.6.hook_resid_post"] / base <= 0.35,
        "all30_at_least_1.3x_faster_than_bridge":
            med["TransformerBridge.run_with_cache (resid_post)"] / med["interp.capture, all 30 resid_post"] >= 1.3,
    }
    result = {"command": "python benchmarks/capture.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "model": "smollm2-135m (GGUF Q4_1 dequantized to fp32)", "batch": args.batch, "seq": args.seq,
        "device": args.device, "dtype": "float32", "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
        "rows": table, "targets_met": checks,
        "rounds_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "round_order": "rows in the order of rounds_s on even rounds, reversed on odd rounds",
        "per_round_ratio_median": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "load_average_before_after": [load_before, list(os.getloadavg())],
        "speedup_vs_bridge_all30": round(med["TransformerBridge.run_with_cache (resid_post)"]
                                         / med["interp.capture, all 30 resid_post"], 2),
        "speedup_vs_nnsight_all30": round(med["nnsight trace (30 layer outputs)"]
                                          / med["interp.capture, all 30 resid_post"], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'row':48s} {'median s':>9s} {'tok/s':>8s} {'x bare':>7s}")
    for r in table:
        print(f"{r['row']:48s} {r['median_s']:9.3f} {r['tokens_per_s']:8.0f} {r['x_bare_forward']:7.3f}")
    print("targets:", checks)
    print("median of per-round ratios:", result["per_round_ratio_median"])


if __name__ == "__main__":
    main()
