"""MP-SAE speed against overcomplete's ``MpSAE`` and SAELens' ``MatchingPursuitTrainingSAE``.

Same d_model, d_sae, pursuit steps (``--n-steps``; overcomplete's ``k``, SAELens' ``max_iterations``)
and batch for everyone. Measured:

* encode throughput (tokens/s, no autograd, eval mode). Ours twice: "warm" (the Gram matrix of
  the fixed dictionary is cached, the steady state of inference) and "cold" (Gram matrix built
  inside the timed call);
* one training step (forward, backward, Adam step; ours also renormalises the atoms): seconds;
* bytes autograd keeps for backward in one training forward (distinct saved storages);
* code parity: ours in overcomplete's mode (``coefficients="signed_max"``, accumulate, no decoder
  bias) against ``MpSAE.encode`` with the same dictionary; ours in SAELens' mode (``nonneg``,
  accumulate, ``b_dec``) against SAELens' encoder;
* encode rounds and train-step rounds (``--rounds``): every encoder (every implementation's train step) timed
  once per round, the order reversed every other round, and the ratio taken between medians; the peers'
  timings swing up to 2x between runs on a shared CPU, so the medians are the figures to quote (``rounds`` and
  ``train_rounds`` in the JSON). Every timed function is called once untimed first, ours and the peers' alike,
  and the single-call rows keep the best of ``--reps`` (``--peer-reps``, default the same) calls.

SAELens runs with ``residual_threshold=0``, ``max_iterations=n_steps`` and
``stop_on_duplicate_support=False`` so that it takes exactly ``n_steps`` steps like the others.

overcomplete 0.3.0 imports torchvision at package level, which cannot load against this project's
torch 2.13 CPU build; run this script with an interpreter that has ``overcomplete`` installed
(``--no-deps``) and load it with ``--overcomplete-bypass``, which imports ``overcomplete.sae``
without executing ``overcomplete/__init__.py`` (its vision-model and plotting imports); the MpSAE
code that runs is unmodified. See benchmarks/results/mp_sae.json for the command used.

    python benchmarks/mp_sae.py --overcomplete-bypass   # with the interpreter that has overcomplete

bf16 rows (ours): encode with ``pursuit_dtype="bfloat16"`` (the selection in bf16, coefficients of
the chosen atoms recomputed in fp32), warm, with its quality against the fp32 encode on the same
rows and dictionary (FVU of both, its relative change, the fraction of rows with the same support;
random data and a random dictionary, so the FVU itself is high and only the change means much); and
a training step under bf16 autocast (``TrainConfig(bf16=True)`` selects in bf16 too). Where bf16 matrix
products take torch's slow path (a CPU without bf16 units: :mod:`interp.precision`) these rows are left out and
``config.bf16_skipped`` says why (``--quick`` runs them anyway).

``--device cuda`` runs every implementation on the GPU (timings synchronised); ``--quick`` uses tiny
sizes (the code path only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import saes.mp  # noqa: E402,F401 - registers mpsae
from interp import precision  # noqa: E402
from saes.base import build  # noqa: E402
from saes.losses import normalize_rows, remove_parallel_grad  # noqa: E402


def load_overcomplete(bypass: bool):
    if bypass:
        spec = importlib.util.find_spec("overcomplete")
        if spec is None:
            return None
        pkg = types.ModuleType("overcomplete")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["overcomplete"] = pkg
    try:
        from overcomplete.sae import MpSAE
    except Exception as e:  # noqa: BLE001 - report any import failure in the table
        print(f"overcomplete unavailable: {type(e).__name__}: {e}")
        return None
    return MpSAE


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: bool = True) -> float:
    """Best of `reps` calls, after one untimed call (first-call costs, an optimizer's state) for every side alike:
    only our side had one before, and the peers' single timed call was their first ever."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--n-steps", type=int, default=32, help="matching-pursuit steps per row")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2, help="repetitions of our own timings (best kept)")
    p.add_argument("--peer-reps", type=int, default=None, help="repetitions of the peers' timings (default: "
                   "--reps; every side is warmed up once first)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    p.add_argument("--overcomplete-bypass", action="store_true")
    p.add_argument("--rounds", type=int, default=5, help="encode rounds in alternating order (medians reported)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mp_sae.json")
    p.add_argument("--note", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="d_model 32, d_sae 128, 4 steps, batch 64: the code path only")
    a = p.parse_args(argv)
    if a.quick:
        a.d_model, a.d_sae, a.n_steps, a.batch, a.reps, a.rounds = 32, 128, 4, 64, 1, 2
    a.peer_reps = a.reps if a.peer_reps is None else a.peer_reps
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, m, n_steps, B, dev = a.d_model, a.d_sae, a.n_steps, a.batch, a.device
    x = (torch.randn(B, d) * 2 + 0.5).to(dev)
    rows: list[dict] = []

    def add(name, **kw):
        rows.append({"impl": name, **kw})
        print(json.dumps(rows[-1]))

    # ---------------------------------------------------------------- ours
    ours = build("mpsae", d_model=d, d_sae=m, n_steps=n_steps).to(dev)
    with torch.no_grad():
        ours.b_dec.copy_(torch.randn(d) * 0.1)
    ours.eval()
    cold = timed(lambda: (setattr(ours, "_gram", None), ours.encode(x)), a.reps)
    ours.encode(x)
    warm = timed(lambda: ours.encode(x), a.reps)
    add("ours (nonneg, accumulate) encode warm", tokens_per_s=B / warm, seconds=warm)
    add("ours (nonneg, accumulate) encode cold", tokens_per_s=B / cold, seconds=cold)
    direct = build("mpsae", d_model=d, d_sae=m, n_steps=n_steps, correlation_update="direct").to(dev).eval()
    direct.load_state_dict(ours.state_dict())
    t_direct = timed(lambda: direct.encode(x), 1)
    add("ours encode, direct path forced", tokens_per_s=B / t_direct, seconds=t_direct)
    ours.train()
    from saes.losses import TrainState

    def train_step(sae, bf16: bool = False):
        """One optimizer step of `sae` on `x` (forward, backward, Adam, atoms back to the sphere)."""
        opt = torch.optim.Adam(sae.parameters(), lr=1e-5)

        def step():
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
                out = sae.training_loss(x, TrainState(step=0, global_rows=B))
            out.loss.backward()
            remove_parallel_grad(sae.W_dec)
            opt.step()
            opt.zero_grad(set_to_none=True)
            normalize_rows(sae.W_dec)

        return step

    our_step = train_step(ours)
    t_train = timed(our_step, a.reps)
    mem = saved_bytes(lambda: ours.training_loss(x, TrainState(step=0, global_rows=B)))
    add("ours (nonneg, accumulate) train step", seconds=t_train, saved_bytes=mem)
    bf16_skipped = None if a.quick else precision.skip_reason(dev, "the bf16 rows")
    if bf16_skipped:
        print(bf16_skipped, file=sys.stderr, flush=True)
    else:
        fast = build("mpsae", d_model=d, d_sae=m, n_steps=n_steps, train_gram_dtype="bfloat16").to(dev)
        fast.load_state_dict(ours.state_dict())
        fast_step = train_step(fast)
        t_train_bf16 = timed(fast_step, a.reps)
        add("ours train step, train_gram_dtype=bfloat16", seconds=t_train_bf16)
        auto = build("mpsae", d_model=d, d_sae=m, n_steps=n_steps).to(dev)
        auto.load_state_dict(ours.state_dict())
        auto_step = train_step(auto, bf16=True)
        t_train_autocast = timed(auto_step, a.reps)
        add("ours train step, bf16 autocast (TrainConfig(bf16=True))", seconds=t_train_autocast)
        ours.eval()
        low = build("mpsae", d_model=d, d_sae=m, n_steps=n_steps, pursuit_dtype="bfloat16").to(dev).eval()
        low.load_state_dict(ours.state_dict())
        t_low = timed(lambda: low.encode(x), a.reps)  # the warm-up caches the bf16 Gram matrix, as for fp32
        r32, r16 = ours.pursue(x), low.pursue(x)
        total = (x - x.mean(0)).pow(2).sum()
        fvu32, fvu16 = float((x - r32.x_hat).pow(2).sum() / total), float((x - r16.x_hat).pow(2).sum() / total)
        add("ours encode warm, pursuit_dtype=bfloat16", tokens_per_s=B / t_low, seconds=t_low, fvu_fp32=fvu32,
            fvu_bf16=fvu16, fvu_relative_change=(fvu16 - fvu32) / fvu32,
            same_support_frac=((r32.codes != 0) == (r16.codes != 0)).all(1).float().mean().item())
        ours.train()

    # ---------------------------------------------------------------- SAELens
    sl_row = {}
    try:
        from sae_lens.saes.matching_pursuit_sae import MatchingPursuitTrainingSAE, MatchingPursuitTrainingSAEConfig

        sl = MatchingPursuitTrainingSAE(MatchingPursuitTrainingSAEConfig(
            d_in=d, d_sae=m, residual_threshold=0.0, max_iterations=n_steps, stop_on_duplicate_support=False,
            device=str(dev)))
        with torch.no_grad():
            sl.W_dec.copy_(ours.W_dec)
            sl.b_dec.copy_(ours.b_dec)
        ours.eval()
        with torch.no_grad():
            t_sl = timed(lambda: sl.encode(x), a.peer_reps)
            codes_sl = sl.encode(x)
            codes_ours = ours.encode(x)
        add("SAELens MatchingPursuit encode", tokens_per_s=B / t_sl, seconds=t_sl,
            max_abs_code_diff_vs_ours=(codes_sl - codes_ours).abs().max().item(),
            same_support_frac=((codes_sl != 0) == (codes_ours != 0)).all(1).float().mean().item())
        sl_opt = torch.optim.Adam(sl.parameters(), lr=1e-5)

        def sl_forward():
            acts, _ = sl.encode_with_hidden_pre(x)
            return (sl.decode(acts) - x).pow(2).sum(-1).mean()

        def sl_step():
            sl_forward().backward()
            sl_opt.step()
            sl_opt.zero_grad(set_to_none=True)

        t_sl_train = timed(sl_step, a.peer_reps)
        add("SAELens MatchingPursuit train step", seconds=t_sl_train, saved_bytes=saved_bytes(sl_forward))
        sl_row = {"encode": t_sl, "train": t_sl_train}
    except Exception as e:  # noqa: BLE001
        add("SAELens MatchingPursuit", error=f"{type(e).__name__}: {e}")

    # ---------------------------------------------------------------- overcomplete
    oc_row = {}
    MpSAE = load_overcomplete(a.overcomplete_bypass)
    if MpSAE is not None:
        oc = MpSAE(d, m, k=n_steps, device=str(dev))  # overcomplete's name for the pursuit steps
        with torch.no_grad():
            oc.dictionary._weights.copy_(ours.W_dec)
        oc.eval()
        mine = build("mpsae", d_model=d, d_sae=m, n_steps=n_steps, coefficients="signed_max",
                     decoder_bias=False).to(dev).eval()
        with torch.no_grad():
            mine.W_dec.copy_(ours.W_dec)
            t_oc = timed(lambda: oc.encode(x), a.peer_reps)
            _, codes_oc = oc.encode(x)
            res = mine.pursue(x)
            t_mine = timed(lambda: mine.encode(x), a.reps)
        add("ours (signed_max, accumulate, no bias) encode warm", tokens_per_s=B / t_mine, seconds=t_mine)
        add("overcomplete MpSAE encode", tokens_per_s=B / t_oc, seconds=t_oc,
            max_abs_code_diff_vs_ours=(codes_oc - res.codes).abs().max().item(),
            same_support_frac=((codes_oc != 0) == (res.codes != 0)).all(1).float().mean().item())
        oc.train()
        oc.dropout = None
        oc_opt = torch.optim.Adam(oc.parameters(), lr=1e-5)

        def oc_forward():
            _, _, x_hat = oc(x)
            return (x_hat - x).pow(2).sum(-1).mean()

        def oc_step():
            oc_forward().backward()
            oc_opt.step()
            oc_opt.zero_grad(set_to_none=True)

        t_oc_train = timed(oc_step, a.peer_reps)
        add("overcomplete MpSAE train step", seconds=t_oc_train, saved_bytes=saved_bytes(oc_forward))
        oc_row = {"encode": t_oc, "train": t_oc_train}
    encoders = {"ours (nonneg, accumulate) encode warm": lambda: ours.encode(x)}
    if sl_row:
        encoders["SAELens MatchingPursuit encode"] = lambda: sl.encode(x)
    if oc_row:
        oc.eval()
        encoders["overcomplete MpSAE encode"] = lambda: oc.encode(x)
    ours.eval()
    rounds = encode_rounds(encoders, a.rounds)
    steps = {"ours (nonneg, accumulate) train step": our_step}
    if sl_row:
        steps["SAELens MatchingPursuit train step"] = sl_step
    if oc_row:
        oc.train()
        steps["overcomplete MpSAE train step"] = oc_step
    ours.train()
    train_rounds = alternating_rounds(steps, a.rounds)
    peers = [r for r in (sl_row, oc_row) if r]
    speedup = {}
    if peers:
        speedup = {"encode_vs_faster_peer_warm": min(r["encode"] for r in peers) / warm,
                   "encode_vs_faster_peer_cold": min(r["encode"] for r in peers) / cold,
                   "train_step_vs_faster_peer": min(r["train"] for r in peers) / t_train,
                   "train_step_vs_faster_peer_median": train_rounds["faster_peer_over_ours_median"]}
        if not bf16_skipped:
            speedup["train_step_bf16_gram_vs_faster_peer"] = min(r["train"] for r in peers) / t_train_bf16
            speedup["train_step_bf16_autocast_vs_faster_peer"] = min(r["train"] for r in peers) / t_train_autocast
    if not bf16_skipped:
        speedup["encode_bf16_pursuit_vs_fp32_warm"] = warm / t_low
        speedup["train_step_bf16_autocast_vs_fp32"] = t_train / t_train_autocast
    print(f"\n{'implementation':55s} {'tokens/s':>10s} {'seconds':>9s} {'saved MB':>9s}")
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""
        mb = f"{r['saved_bytes'] / 2**20:.0f}" if "saved_bytes" in r else ""
        print(f"{r['impl']:55s} {tps:>10s} {r.get('seconds', float('nan')):9.3f} {mb:>9s}")
    print("speedup:", json.dumps(speedup))
    print("encode rounds (median seconds):", json.dumps(rounds["median_seconds"]),
          "ratio of medians:", rounds.get("encode_vs_faster_peer_warm_median"))
    result = {"config": {"d_model": d, "d_sae": m, "n_steps": n_steps, "batch": B, "quick": a.quick,
                         "dtype": "float32 (rows naming bf16: see the module docstring)", "device": str(dev),
                         "threads": torch.get_num_threads(), "reps_ours": a.reps, "reps_peers": a.peer_reps,
                         **({"bf16_skipped": bf16_skipped} if bf16_skipped else {})},
              "rows": rows, "speedup": speedup, "rounds": rounds, "train_rounds": train_rounds,
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "sae_lens": _version("sae_lens"), "overcomplete": _version("overcomplete")},
              "command": " ".join(["python", "benchmarks/mp_sae.py", *sys.argv[1:]]),  # no path of this machine
              "load_average_1min_at_end": round(os.getloadavg()[0], 2),
              "note": a.note or "2-core CPU; the load average says whether other jobs shared it "
                                "(about 1 or less: quiet)"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(a.out)
    return result


@torch.no_grad()
def encode_rounds(encoders: dict, n_rounds: int) -> dict:
    """Each encoder once per round, in the given order on even rounds and reversed on odd ones;
    per-round seconds, medians, and our warm encode against the faster peer's median."""
    out = alternating_rounds(encoders, n_rounds)
    if "faster_peer_over_ours_median" in out:
        out["encode_vs_faster_peer_warm_median"] = out.pop("faster_peer_over_ours_median")
    return out


def alternating_rounds(fns: dict, n_rounds: int) -> dict:
    """Each function once per round (the first named is ours), in the given order on even rounds and reversed on
    odd ones; per-round seconds, medians, and the faster peer's median over ours (``faster_peer_over_ours_median``).
    Every side has had its warm-up call before (:func:`timed`)."""
    import statistics

    names = list(fns)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(n_rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync()
            t = time.perf_counter()
            fns[name]()
            _sync()
            seconds[name].append(time.perf_counter() - t)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    out = {"rounds": n_rounds, "order": names, "seconds": seconds, "median_seconds": median}
    peers = [median[n] for n in names[1:]]
    if peers:
        out["faster_peer_over_ours_median"] = min(peers) / median[names[0]]
    return out


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
