"""TopK training kernels on CPU against the torch ops they replace, on real activations.

Three pieces of the sparse TopK step (:mod:`saes.kernels`) are timed beside torch's own op on the same tensors:

* ``topk_indices`` (the trainer's top-k: :func:`saes.native.topk` where it is built, ``topk_kernel``) and
  ``two_level_topk`` (the torch-only two levels) against ``Tensor.topk``, on the encoder pre-activations of a batch;
* :class:`saes.kernels.BagSum` forward + backward (its compiled or CSR weight gradient and its values' gradient)
  against ``F.embedding_bag``'s (``trainer_uses_bag_sum``: whether the step takes it, by
  ``saes.kernels.bag_sum_applies``);
* the values' gradient alone, ``<g[b], W_dec[idx[b, j]]>`` for every entry: :func:`saes.native.gather_dot` (where
  built) against ``torch.sparse.sampled_addmm`` on the same pattern (``grad_vals``, ``grad_vals_close``).

Both are measured for a freshly initialised SAE and after training it (``--steps`` trainer steps on the same
cache), since which latents fire, and so the layout of the sparse products, changes as an SAE trains. Each
row also records ``rows_with_second_topk`` (the share of rows where the two-level top-k needs its second
``topk``) and checks the results: the same top-k values as ``Tensor.topk`` and gradients equal to
``embedding_bag``'s to float rounding (``bag_sum_grads_relative_error``: the larger of the two
gradients' ``||ours - torch|| / ||torch||``). Rounds alternate the order of the two ops; each round's figure is the
median of ``--calls`` calls, every round is in the JSON and the row gives the median over rounds.

    python benchmarks/sae_kernels.py --cache CACHE --rounds 5
    (write the cache with: interp capture --sites blocks.12.hook_resid_post --tokens 850000 --out DIR)

``--quick`` runs tiny sizes on planted data (no cache): it checks the code path only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sae_train import load_batches, machine, recorded_command

RESULTS = Path(__file__).parent / "results" / "sae_kernels.json"
SETTINGS = ((4096, 9216, 32, 50), (1024, 9216, 32, 200), (1024, 36864, 64, 200))
"""(batch, d_sae, k, training steps before the "trained" rows): the settings of ``sae_train.py``'s runs."""
QUICK = ((256, 4096, 8, 5),)


def _timed(fn, calls: int) -> float:
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def compare(ref, ours, rounds: int, calls: int) -> dict:
    """Milliseconds of ``ref`` and ``ours``: ``rounds`` rounds in alternating order, each the median of
    ``calls`` calls after one warm-up call each."""
    ref(), ours()
    per = {"torch": [], "ours": []}
    for r in range(rounds):
        order = (("torch", ref), ("ours", ours)) if r % 2 == 0 else (("ours", ours), ("torch", ref))
        for name, fn in order:
            per[name].append(_timed(fn, calls))
    med = {k: statistics.median(v) for k, v in per.items()}
    return {"torch_ms": med["torch"], "ours_ms": med["ours"], "speedup": med["torch"] / med["ours"],
            "torch_ms_rounds": per["torch"], "ours_ms_rounds": per["ours"]}


def measure(sae, x: torch.Tensor, k: int, rounds: int, calls: int) -> dict:
    from saes import kernels, native

    with torch.no_grad():
        pre = kernels.pre_acts(x, sae.W_enc, sae.b_enc, sae.b_dec)
    idx = kernels.topk_indices(pre, k)
    b, d_sae = pre.shape
    same_values = bool(torch.equal(pre.gather(1, idx).sort(1).values, pre.topk(k, dim=-1).values.sort(1).values))
    second = (float((~kernels.two_level_candidates(pre, k)[3]).float().mean())
              if kernels.two_level_applies(pre, k) else None)
    topk = compare(lambda: pre.topk(k, dim=-1, sorted=False), lambda: kernels.topk_indices(pre, k), rounds, calls)
    two = compare(lambda: pre.topk(k, dim=-1, sorted=False), lambda: kernels.two_level_topk(pre, k), rounds, calls)
    two_idx = kernels.two_level_topk(pre, k)
    same_values &= bool(torch.equal(pre.gather(1, two_idx).sort(1).values, pre.topk(k, dim=-1).values.sort(1).values))

    g = torch.randn(b, sae.W_dec.shape[1], generator=torch.Generator().manual_seed(0))
    vals = pre.gather(1, idx).relu().requires_grad_()
    W = sae.W_dec.detach().clone().requires_grad_()

    def ref():
        return torch.autograd.grad(F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum"), (vals, W), g)

    def ours():
        return torch.autograd.grad(kernels.BagSum.apply(idx, vals, W), (vals, W), g)

    # sums of thousands of terms in another order: compared by norm (a latent that fires on 2,000 rows of a
    # fresh SAE has gradient entries near 260, where float32's spacing alone is 3e-5)
    rel = max(float((a - w).norm() / w.norm()) for a, w in zip(ours(), ref()))
    bag = compare(ref, ours, rounds, calls)
    dots = None
    Wd = sae.W_dec.detach()
    if native.sparse_applies(idx, g, Wd):
        crow = torch.arange(0, b * k + 1, k)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(b * k), (b, d_sae), check_invariants=False)

        def sampled():
            return torch.sparse.sampled_addmm(pattern, g, Wd.T, beta=0.0).values().view(b, k)

        dots = {**compare(sampled, lambda: native.gather_dot(idx, g, Wd), rounds, calls),
                "close": bool(torch.allclose(native.gather_dot(idx, g, Wd), sampled(), rtol=1e-4, atol=1e-5))}
    return {"topk": topk, "topk_kernel": "native" if native.topk_applies(pre, k) else "two_level",
            "topk_two_level": two, "rows_with_second_topk": second, "topk_same_values": same_values,
            "bag_sum_forward_backward": bag, "bag_sum_grads_relative_error": rel, "bag_sum_grads_close": rel < 1e-5,
            "grad_vals": dots,
            "entries_per_latent": b * k / d_sae,
            "trainer_uses_bag_sum": kernels.bag_sum_applies(W)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="activation cache with blocks.12.hook_resid_post (interp capture)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=9, help="calls per round (the round's figure is their median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes on planted data: the code path only")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if not args.quick and not args.cache:
        p.error("--cache is needed (or --quick)")
    torch.set_num_threads(args.threads)
    import saes
    from saes.malloc import reuse_freed_memory
    from saes.trainer import TrainConfig, Trainer

    load_before = os.getloadavg()
    rows = []
    for batch, d_sae, k, steps in (QUICK if args.quick else SETTINGS):
        train, held, _ = load_batches(None if args.quick else args.cache, batch, steps, 1)
        torch.manual_seed(0)
        sae = saes.build("topk", d_model=train[0].shape[1], d_sae=d_sae, k=k)
        for stage in ("init", "trained"):
            if stage == "trained":
                cfg = TrainConfig(total_tokens=steps * batch, batch_tokens=batch, lr=2e-4, normalize_inputs=False,
                                  progress=False, log_every=steps)
                Trainer(sae, cfg).fit(train)
            with reuse_freed_memory():  # as in a training run
                row = {"batch": batch, "d_sae": d_sae, "k": k, "sae": stage,
                       "trained_steps": steps if stage == "trained" else 0,
                       **measure(sae, held[0], k, args.rounds, args.calls)}
            rows.append(row)
            print(json.dumps({key: (round(v["speedup"], 3) if isinstance(v, dict) else v) for key, v in row.items()}),
                  flush=True)
    result = {"benchmark": "sae_kernels", "quick": args.quick, "dtype": "float32", "device": "cpu",
              "torch_threads": args.threads, "machine": machine(), "rounds": args.rounds,
              "calls_per_round": args.calls, "rows": rows,
              "command": recorded_command("benchmarks/sae_kernels.py", sys.argv[1:] if argv is None else argv),
              "load_average_before_after": [list(load_before), list(os.getloadavg())]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
