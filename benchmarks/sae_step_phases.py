"""Where a TopK SAE training step's time goes: this project's trainer, each phase of its step timed by the wall
clock, beside the encoder matmul alone (the ceiling ``benchmarks/sae_train.py`` compares a step with).

The trainer runs through ``sae_train.py``'s own ``interp`` runner (:func:`sae_train.run_ours`: same cache,
pre-scaled rows, learning rate and schedule), with a :class:`Clock` as its timer; the functions it calls are
wrapped with timers, and the step, from one batch handed to the trainer to
the next, is cut into:

* ``encoder_matmul``: :func:`saes.kernels.encoder_matmul`, the dense pre-activations;
* ``top_k``: :func:`saes.kernels.topk_indices`;
* ``loss_rest``: the rest of the SAE's ``training_loss`` (the gathers, the sparse decode, the loss terms);
* ``backward``: from the end of ``training_loss`` to the decoder's gradient projection: ``loss.backward()``
  (the encoder's and decoder's sparse backward) and the non-finite guard's check of the loss;
* ``projection``: :func:`saes.losses.remove_parallel_grad`;
* ``optimizer``: from the projection's end to the decoder renormalisation: the Adam step, the schedule and
  ``zero_grad``; where the trainer takes the one-pass decoder step (:func:`saes.optim.unit_rows_applies`),
  the Adam step alone, with the projection and the renorm inside it (both read 0, and the schedule and
  ``zero_grad`` count in ``rest``);
* ``renorm``: :func:`saes.losses.normalize_rows`;
* ``rest``: the remainder (dead-latent counters, logging, handing over the next batch).

Each round is a fresh SAE trained ``--steps`` steps, and the encoder matmul timed alone
(``sae_train.matmul_limit``: every kernel, the fastest is the ceiling), one before the other in alternating
order; per round, each phase's median over the steps after ``--warmup``, and ``fraction_of_ceiling``, the
ceiling's time over the step's: the share of the matmul ceiling a step reaches, as ``sae_train.py``'s
``fraction_of_encoder_matmul_limit`` is for whole runs (from their mean step, every step after the first). The
summary gives the medians over rounds, each phase's share of the step, and the median of the per-round fractions
(on a shared CPU both drift within a run; each round pairs a step with the ceiling measured beside it). The five
timers cost about 0.5 microseconds each a step on the CPU (a wrapped no-op, 100,000 calls); on CUDA each one
synchronises the device (so the phases add up, and the step is slower than unwrapped).

    python benchmarks/sae_step_phases.py --cache DIR --batch 1024 --rounds 5
    (the cache: interp capture --sites blocks.12.hook_resid_post --tokens 250000 --out DIR)

``--encoder-kernels onednn addmm`` makes each round an A/B of the encoder matmul's kernel on CPU (the trainer picks
oneDNN where torch dispatches AVX-512, ``addmm`` elsewhere: :func:`saes.kernels.prefer_onednn`): a fresh SAE is
trained once per kernel named, the matmul forced onto it, in alternating order with the ceiling; the summary gives
each kernel's phases and fraction, and the median of the rounds' step ratios. ``--step-kernels native torch`` is
the same A/B for the compiled kernels of :mod:`saes.native` (top-k and the one-pass decoder step) against the
torch paths the trainer takes where they are not built.

``--decode-kernels embedding_bag bag_sum`` is the same A/B for the sparse decode, on any device: torch's
``embedding_bag`` (the trainer's path off the CPU; its CUDA backward reads a count back to the host each step)
against :class:`saes.kernels.BagSum` (sorted sparse products, nothing read back), for the GPU to say which it
should take; both with the loss by torch ops. ``sparse_fvu`` (CPU) is the decode and the loss in one
(:class:`saes.kernels.SparseFVU`, the CPU's path in float32 where the compiled kernels are built with OpenMP).

``--grad-kernels sparse dense`` is the same A/B for the weight gradients on CPU: kept sparse by the backward and
made row by row in the optimizer's pass (:mod:`saes.sparse_grads`, the trainer's choice where the compiled kernels
are built with OpenMP) against written whole by the backward and read back by Adam.

``--profile-steps N`` adds, after the rounds, N steps of a fresh SAE under ``torch.profiler`` with no phase timer
(only the per-step stamp of whole runs): the free-running step, each op's calls and self time per step (the
device's on a GPU) and the host's calls into the device runtime per step (kernel launches, copies and
synchronisations), for a step that is bound by launches rather than by the matmul; and, from a second run of the
same steps, the ops that make the host wait for the device (:func:`host_reads`).

``--quick`` trains on planted rows at tiny sizes: the code path only.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sae_train  # noqa: E402

from saes import hostsync, kernels, native, optim  # noqa: E402
from saes import trainer as trainer_module  # noqa: E402

PHASES = ("encoder_matmul", "top_k", "loss_rest", "backward", "projection", "optimizer", "renorm", "rest")
RESULTS = Path(__file__).parent / "results" / "sae_step_phases.json"
TIMED = ((kernels, "encoder_matmul", "encoder_matmul"), (kernels, "topk_indices", "top_k"),
         (trainer_module, "remove_parallel_grad", "projection"), (trainer_module, "normalize_rows", "renorm"),
         (optim.Adam, "step", "adam"))
"""``(module, function, phase)``: the functions the trainer calls through their module, timed as that phase."""
ENCODER_KERNELS = ("onednn", "addmm")
STEP_KERNELS = ("native", "torch")
DECODE_KERNELS = ("embedding_bag", "bag_sum", "sparse_fvu")
GRAD_KERNELS = ("sparse", "dense")


class Clock:
    """Start and end times of the wrapped calls, in order, for one training run; the timer that
    :func:`sae_train.run_ours` takes (``watch``, ``tick``, ``lr_used``)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.events: list[tuple[str, float, float]] = []
        self.batches: list[float] = []
        self.lr_used: float | None = None

    def watch(self, sae: torch.nn.Module, recon=None) -> None:
        """Time the SAE's ``training_loss`` (``recon``, the runner's reconstruction function, is not needed)."""
        sae.training_loss = self.wrap("training_loss", sae.training_loss)

    def tick(self) -> None:
        """A batch handed to the trainer (and once after the last step)."""
        self.batches.append(self.now())

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = self.now()
            out = fn(*args, **kwargs)
            self.events.append((name, start, self.now()))
            return out

        return timed

    def steps(self) -> list[dict[str, float]]:
        """Per step, each phase in seconds, and ``step``: from one batch handed over to the next."""
        out = []
        for i in range(len(self.batches) - 1):
            lo, hi = self.batches[i], self.batches[i + 1]
            ev: dict[str, list[tuple[float, float]]] = {}
            for name, s, e in self.events:
                if lo <= s < hi:
                    ev.setdefault(name, []).append((s, e))

            def total(name: str, ev: dict = ev) -> float:
                return sum(e - s for s, e in ev.get(name, []))

            (ls, le), = ev["training_loss"]
            row = {"step": hi - lo, "encoder_matmul": total("encoder_matmul"), "top_k": total("top_k")}
            if "projection" in ev:
                proj, norm = ev["projection"][0], ev["renorm"][0]
                row.update(backward=proj[0] - le, projection=proj[1] - proj[0], optimizer=norm[0] - proj[1],
                           renorm=norm[1] - norm[0])
            else:  # the one-pass decoder step: projection and renorm inside Adam's
                adam = ev["adam"][0]
                row.update(backward=adam[0] - le, projection=0.0, optimizer=adam[1] - adam[0], renorm=0.0)
            row["loss_rest"] = (le - ls) - row["encoder_matmul"] - row["top_k"]
            row["rest"] = row["step"] - sum(row[p] for p in PHASES if p != "rest")
            out.append(row)
        return out


def run_round(train: list[torch.Tensor], args, lr: float, seed: int, kernel: str | None = None) -> dict:
    """One fresh SAE trained on ``train`` by ``sae_train.run_ours`` with every phase timed; medians over the steps
    after the warm-up. ``kernel`` ``onednn`` or ``addmm`` forces the encoder matmul onto that kernel (through
    :func:`saes.kernels.prefer_onednn`), ``torch`` keeps the trainer off :mod:`saes.native`'s kernels, ``native``
    (or None) leaves the trainer's own choice; ``embedding_bag`` or ``bag_sum`` decodes by that path on any device
    (through :func:`saes.kernels.bag_sum_applies`); ``dense`` writes the weight gradients whole (no
    :class:`saes.sparse_grads.SparseGrads`), ``sparse`` leaves the trainer's choice."""
    clock = Clock(args.device)
    with contextlib.ExitStack() as patches:  # the timers come off again, whatever happens
        for module, name, phase in TIMED:
            patches.enter_context(mock.patch.object(module, name, clock.wrap(phase, getattr(module, name))))
        if kernel in ENCODER_KERNELS:
            patches.enter_context(mock.patch.object(kernels, "prefer_onednn", lambda: kernel == "onednn"))
        if kernel == "torch":
            patches.enter_context(mock.patch.object(native, "library", lambda: None))
        if kernel in DECODE_KERNELS and kernel != "sparse_fvu":
            patches.enter_context(mock.patch.object(kernels, "bag_sum_applies", lambda W: kernel == "bag_sum"))
            patches.enter_context(mock.patch.object(kernels, "sparse_fvu_applies", lambda *a: False))
        if kernel == "dense":
            patches.enter_context(mock.patch.object(optim, "sparse_applies", lambda opt: False))
        sae_train.run_ours(train, lr, args.k, args.d_sae, args.device, clock, seed)
    steps = clock.steps()[args.warmup:]
    return {"seed": seed, "steps_timed": len(steps),
            "ms": {p: 1000 * statistics.median(s[p] for s in steps) for p in ("step", *PHASES)}}


def summarise(rounds: list[dict]) -> dict:
    """Medians over rounds, each phase's share of the median step, and the median of the per-round fractions of
    the matmul ceiling."""
    ms = {p: statistics.median(r["ms"][p] for r in rounds) for p in ("step", *PHASES)}
    ceiling = statistics.median(r["ceiling_ms"] for r in rounds)
    return {"ms": ms, "share_of_step": {p: ms[p] / ms["step"] for p in PHASES},
            "non_matmul_ms": ms["step"] - ms["encoder_matmul"], "ceiling_ms": ceiling,
            "step_fraction_of_ceiling": statistics.median(r["fraction_of_ceiling"] for r in rounds),
            "in_step_matmul_over_ceiling": statistics.median(r["ms"]["encoder_matmul"] / r["ceiling_ms"]
                                                             for r in rounds)}


RUNTIME_PREFIXES = ("cu", "hip")
"""Profiler events whose names start so are the host's calls into the device runtime (launches, copies, syncs)."""


class ProfileTimer(sae_train.Timer):
    """``sae_train.Timer`` (a stamp per step, as in whole runs: a CUDA event on a GPU, which the host does not wait
    for) that also steps a ``torch.profiler`` schedule at each batch handed to the trainer."""

    def __init__(self, prof):
        super().__init__()
        self.prof = prof

    def tick(self) -> None:
        super().tick()
        self.prof.step()


class CountingTimer(sae_train.Timer):
    """``sae_train.Timer`` that also notes, at each batch handed to the trainer, how many ops of each kind an
    :class:`saes.hostsync.SyncOps` has counted so far."""

    def __init__(self, ops: hostsync.SyncOps):
        super().__init__()
        self.ops, self.marks = ops, []

    def tick(self) -> None:
        self.marks.append(collections.Counter(self.ops.counts))
        super().tick()


def host_reads(train: list, args, lr: float, steps: range) -> dict:
    """The ops of the trainer's steps ``steps`` (of a fresh SAE trained on ``train``) that make the host wait for
    the device on CUDA, per step, by :class:`saes.hostsync.SyncOps` (the paths this device takes: on the CPU
    reading back costs nothing and the CPU's own paths do; the steps are slower under the counter)."""
    with hostsync.SyncOps() as ops:
        timer = CountingTimer(ops)
        sae_train.run_ours(train, lr, args.k, args.d_sae, args.device, timer, seed=0)
    total = timer.marks[steps.stop] - timer.marks[steps.start]
    return {"steps": len(steps), "total": total.total() / len(steps),
            "by_op": {k: v / len(steps) for k, v in sorted(total.items())}}


def profile_steps(train: list, args, lr: float, n: int) -> dict:
    """``n`` steps of a fresh SAE under ``torch.profiler``, with no phase timer (the step runs free between the
    per-step stamps): the step's time, each op's calls and self time per step (the device's where there is
    one), the host's calls into the device runtime per step (kernel launches, copies, synchronisations), and the
    ops that read back to the host in the same steps of a second run (:func:`host_reads`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = str(args.device).startswith("cuda")
    wait = min(args.warmup, max(len(train) - n - 2, 0))
    n = max(min(n, len(train) - wait - 2), 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, schedule=schedule(wait=wait, warmup=1, active=n, repeat=1)) as prof:
        timer = ProfileTimer(prof)
        sae_train.run_ours(train[:wait + n + 2], lr, args.k, args.d_sae, args.device, timer, seed=0)
    # profiler step j runs from the stamp before training step j - 1 to the one after it: steps wait .. wait+n-1
    # are the active ones (the profiler's own start and stop fall outside their stamps)
    step_ms = [1000 * (b - a) for a, b in zip(timer.t[wait:wait + n], timer.t[wait + 1:wait + 1 + n])]

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    def on_host(e) -> bool:  # an op or runtime call of the host; else a kernel (whose name may start with "cu")
        return getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU

    reads = host_reads(train[:wait + n + 2], args, lr, range(wait, wait + n))
    events = prof.key_averages()
    ops = sorted(events, key=(device_us if cuda else (lambda e: e.self_cpu_time_total)), reverse=True)
    runtime = {e.key: e.count / n for e in events if on_host(e) and e.key.startswith(RUNTIME_PREFIXES)}
    # a host op's self device time is its kernels' time again: the device's busy time sums the kernels alone
    return {"steps": n, "step_ms_median": statistics.median(step_ms), "step_ms": step_ms,
            "device_ms_per_step": sum(device_us(e) for e in events if not on_host(e)) / 1000 / n if cuda else None,
            "runtime_calls_per_step": dict(sorted(runtime.items(), key=lambda kv: -kv[1])),
            "kernel_launches_per_step": sum(v for k, v in runtime.items() if "LaunchKernel" in k),
            "host_reads_per_step": reads,
            "top_ops": [{"name": e.key, "on": "host" if on_host(e) else "device", "calls_per_step": e.count / n,
                         "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / n,
                         **({"self_device_ms_per_step": device_us(e) / 1000 / n} if cuda else {})}
                        for e in ops[:25]]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="cache folder holding blocks.12.hook_resid_post (required unless --quick)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=16 * 576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=60, help="training steps per round")
    p.add_argument("--warmup", type=int, default=10, help="steps of each round left out of its medians")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--lr", type=float, default=None, help="default: sae_train.py's shared rate for --d-sae")
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoder-kernels", nargs="+", choices=ENCODER_KERNELS, default=None,
                   help="an A/B of the encoder matmul's kernel (CPU): each round trains once per kernel named, in "
                        "alternating order; default: the trainer's own choice for this CPU")
    p.add_argument("--step-kernels", nargs="+", choices=STEP_KERNELS, default=None,
                   help="an A/B of saes.native's compiled kernels against the torch paths (CPU), as --encoder-kernels")
    p.add_argument("--decode-kernels", nargs="+", choices=DECODE_KERNELS, default=None,
                   help="an A/B of the sparse decode's path on any device: torch's embedding_bag (whose CUDA backward "
                        "reads a count back to the host) or saes.kernels.BagSum (sorted sparse products), both with "
                        "the loss by torch ops, or (CPU) sparse_fvu, the decode and loss in one, as --encoder-kernels; "
                        "default: the trainer's own choice (sparse_fvu on CPU in float32 with the compiled kernels)")
    p.add_argument("--grad-kernels", nargs="+", choices=GRAD_KERNELS, default=None,
                   help="an A/B of the weight gradients (CPU): kept sparse and made by the optimizer as it steps "
                        "(saes.sparse_grads, the trainer's choice where the compiled kernels are built) or written "
                        "whole by the backward, as --encoder-kernels")
    p.add_argument("--quick", action="store_true", help="planted rows, tiny sizes: the code path only")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the rounds, profile this many free-running steps of a fresh SAE (torch.profiler: "
                        "ops, kernel launches and synchronisations per step); 0: off")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.d_sae, args.k, args.steps, args.warmup = 128, 256, 8, 6, 2
    elif args.cache is None:
        p.error("--cache is required (or --quick)")
    given = [f for f, v in (("--encoder-kernels", args.encoder_kernels), ("--step-kernels", args.step_kernels),
                            ("--decode-kernels", args.decode_kernels), ("--grad-kernels", args.grad_kernels)) if v]
    if len(given) > 1:
        p.error(f"{' and '.join(given)} are separate A/Bs: give one of them per run")
    ab_flag = given[0] if given else None
    ab = (args.encoder_kernels or args.step_kernels or args.decode_kernels
          or args.grad_kernels)  # the kernels one A/B compares, or None
    if ab and not args.decode_kernels and not str(args.device).startswith("cpu"):
        p.error(f"{ab_flag} compares CPU kernels; --device is {args.device}: leave it out there")
    if args.decode_kernels and "sparse_fvu" in args.decode_kernels and not str(args.device).startswith("cpu"):
        p.error(f"--decode-kernels sparse_fvu is a CPU kernel; --device is {args.device}: compare embedding_bag "
                "and bag_sum there")
    if ab and len(set(ab)) != len(ab):
        p.error(f"{ab_flag} names a kernel twice ({' '.join(ab)}); name each once")
    lib = native.library()
    # what the sparse weight gradients and the fused decode need (on CPU)
    openmp = str(args.device).startswith("cpu") and lib is not None and bool(lib.native_openmp())
    if args.step_kernels and "native" in args.step_kernels and lib is None:
        p.error(f"{ab_flag} names native, but saes.native's kernels are not built here ({native.status()})")
    if args.grad_kernels and "sparse" in args.grad_kernels and not openmp:
        p.error(f"{ab_flag} names sparse, but saes.native's kernels are not built with OpenMP here "
                f"({native.status()})")
    if args.warmup >= args.steps - 1:
        p.error(f"--warmup {args.warmup} leaves no step of --steps {args.steps} to time; use a smaller --warmup")
    from saes.train_config import default_lr

    lr = args.lr if args.lr else default_lr(args.d_sae)
    load_before = os.getloadavg()[0]
    train, _, _ = sae_train.load_batches(args.cache, args.batch, args.steps, 1)
    train = [x.to(args.device) for x in train]
    d_model = train[0].shape[-1]
    rounds = []
    kernel_ab = ab or [None]
    order = sae_train.run_order(kernel_ab, args.rounds, list(range(args.rounds)))  # the ceiling beside each round
    per_round = len(kernel_ab) + 1
    for r in range(args.rounds):
        done = {}
        for what, _ in order[r * per_round:(r + 1) * per_round]:
            if what == "ceiling":
                limit = sae_train.fastest(sae_train.matmul_limit(args.batch, d_model, args.d_sae, args.device))
            else:
                done[what] = run_round(train, args, lr, seed=r, kernel=what)
        ceiling_ms = 1000 * limit["seconds_median"]
        for kernel, row in done.items():
            row.update(ceiling_ms=ceiling_ms, fraction_of_ceiling=ceiling_ms / row["ms"]["step"])
            print(json.dumps({"round": r, **({"kernel": kernel} if kernel else {}),
                              **{k: round(v, 2) for k, v in row["ms"].items()}, "ceiling": round(ceiling_ms, 2)}),
                  flush=True)
        limits = {"ceiling_kernel": limit["kernel"], "encoder_matmul_limit": limit}
        if ab:
            rounds.append({"seed": r, "ceiling_ms": ceiling_ms, **limits, "by_kernel": done})
        else:
            rounds.append({**done[None], **limits})
    ratio = None
    if ab:
        summary = {"by_kernel": {k: summarise([r["by_kernel"][k] for r in rounds]) for k in ab}}
        if len(ab) == 2:
            a, b = ab
            ratio = f"step_{b}_over_{a}"
            summary[ratio] = statistics.median(r["by_kernel"][b]["ms"]["step"] / r["by_kernel"][a]["ms"]["step"]
                                               for r in rounds)
    else:
        summary = summarise(rounds)
    profiled = profile_steps(train, args, lr, args.profile_steps) if args.profile_steps > 0 else None
    w_enc = torch.empty(args.d_sae, d_model, device="meta").T  # the trainer's layout, no memory
    trainer_kernel = "onednn" if kernels.onednn_ok(train[0], w_enc) else "addmm"
    result = {"benchmark": "sae_step_phases", "d_model": d_model, "d_sae": args.d_sae, "k": args.k,
              "batch_tokens": args.batch, "steps": args.steps, "warmup": args.warmup, "lr": lr,
              "quick": args.quick, "device": str(args.device), "torch_threads": torch.get_num_threads(),
              "encoder_kernel": args.encoder_kernels or trainer_kernel,
              "step_kernels": args.step_kernels or ("native" if lib is not None else "torch"),
              "grad_kernel": args.grad_kernels or ("sparse" if openmp else "dense"),
              "decode_kernel": args.decode_kernels or (
                  "sparse_fvu" if openmp
                  else "bag_sum" if kernels.bag_sum_applies(torch.empty(1, 1, device=args.device))
                  else "embedding_bag"),
              "machine": sae_train.machine(), "rounds": rounds,
              "summary": summary, **({"profile": profiled} if profiled else {}),
              "command": sae_train.recorded_command("benchmarks/sae_step_phases.py",
                                                                        sys.argv[1:] if argv is None else argv),
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "note": f"{os.cpu_count()} CPUs; the one-minute load average counts this benchmark's own "
                      f"{torch.get_num_threads()} threads: above that, something else ran"}
    for kernel, summ in (summary["by_kernel"].items() if ab else [(None, summary)]):
        what = ("encoder matmul on" if kernel in ENCODER_KERNELS else "decode by" if kernel in DECODE_KERNELS
                else "weight gradients" if kernel in GRAD_KERNELS else "step kernels:")
        print(f"\n{'phase':16s} {'ms':>8s} {'share':>7s}" + (f"   ({what} {kernel})" if kernel else ""))
        for ph in PHASES:
            print(f"{ph:16s} {summ['ms'][ph]:8.2f} {summ['share_of_step'][ph]:7.1%}")
        print(f"{'step':16s} {summ['ms']['step']:8.2f}   matmul alone {summ['ceiling_ms']:.2f} ms: "
              f"{summ['step_fraction_of_ceiling']:.1%} of the ceiling (median of the rounds' fractions)")
    if ratio:
        print(f"{ratio}: {summary[ratio]:.3f} (median of the rounds' ratios)")
    if profiled:
        print(f"\nprofiled {profiled['steps']} free-running steps: {profiled['step_ms_median']:.2f} ms a step, "
              f"{profiled['kernel_launches_per_step']:.0f} kernel launches a step; runtime calls a step: "
              + ", ".join(f"{k} {v:.0f}" for k, v in list(profiled["runtime_calls_per_step"].items())[:6]))
        reads = profiled["host_reads_per_step"]
        print(f"ops reading back to the host: {reads['total']:.2f} a step "
              + ", ".join(f"{k} {v:.2f}" for k, v in reads["by_op"].items()))
        for op in profiled["top_ops"][:10]:
            ms = op.get("self_device_ms_per_step", op["self_cpu_ms_per_step"])
            print(f"  {ms:8.3f} ms {op['calls_per_step']:6.1f} calls  {op['name'][:90]}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    return result


if __name__ == "__main__":
    main()
