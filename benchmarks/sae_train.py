"""TopK SAE training speed and quality: this project vs SAELens vs sparsify, one run, same data.

All three train a TopK SAE (d_sae = 16 x 576, k = 32, fp32) on the same cached activations of the
embedded model (layer 12 ``hook_resid_post``), the same batches in the same order, the same number
of steps, the same Adam learning rate and the same schedule shape (1 % linear warm-up, linear decay
over the last 20 %). Inputs are pre-scaled once so that ``E||x||^2 = d_model`` for everyone (each
library's own input normalisation is off). Each library keeps its own initialisation, ``b_dec``
init and AuxK details:

* this project: :class:`saes.Trainer` (sparse TopK kernels, ``b_dec`` from the first batch's typical rows' mean);
* SAELens: ``TopKTrainingSAE`` + its ``SAETrainer`` fed by an iterator of the same tensors
  (its loop: MSE + AuxK, gradient clipping at 1.0);
* sparsify: ``SparseCoder`` and its ``forward`` loss (FVU + AuxK / 32) in the loop its
  ``Trainer.fit`` runs (mean ``b_dec`` init, unit-norm decoder, parallel-gradient removal, Adam).

Each library runs in its own subprocess (so peak memory is its own): tokens/s is timed over the
training steps after the first (warm-up) step; final FVU is measured by one function
(``1 - explained variance`` over the whole held-out set) on batches none of them trained on.
The encoder matmul limit is measured in the same run: ``[batch, d_model] @ [d_model, d_sae]`` timed
alone, as tokens/s and FLOP/s; no TopK trainer can be faster than that. It is timed before and after the
whole run (``fraction_of_encoder_matmul_limit``: the median tokens/s over the mean of the two) and once in every
round, before the libraries in even rounds and after them in odd ones
(``fraction_of_encoder_matmul_limit_paired``: the median over rounds of each round's tokens/s over the limit
timed in that round; a shared CPU drifts by 10-30 % within a run, and the pairing follows it).

    python benchmarks/sae_train.py --cache CACHE --steps 40
    (write the cache with: interp capture --sites blocks.12.hook_resid_post --tokens 250000 --out DIR)

Time to a target FVU (``--eval-every N``, by default a tenth of the steps, at least 1; 0: off): each library
records ``fvu_curve``, its held-out FVU (the same function, under ``no_grad``, in eval mode and fp32, with the
weights as they stand) before steps 0, N, 2N ... on the first held-out batch, and after the last step on the
whole held-out set (the point is ``final_fvu``). Each point carries ``step``, ``tokens`` (``step x batch``)
and ``train_seconds``: the library's own clock from the start of step 0 (the warm-up step counts here) to that
point, with every evaluation taken off it; tokens/s comes from the same clock, so it counts training only
(``eval_seconds_excluded`` says how much was taken off). The target is sparsify's final held-out FVU in the
same round, or ``--target-fvu``; ``summary.time_to_target`` gives, per round and library, the training seconds
at which its curve first reaches FVU <= target, linear in time between the two points that bracket the
crossing (0 when the first point is there already, None when no point is), and ``time_to_target_vs_sparsify``
the median over rounds of our per-round time divided by sparsify's (< 1: we get there first; None unless every
round reached it). The intermediate points see one held-out batch, the last one all of them: a curve is only
as smooth as that batch. Each point also carries ``heldout_fvu_typical``, the FVU over the held-out rows that
are not massive activations, and ``summary.time_to_target_typical`` (with ``time_to_target_typical_vs_sparsify``)
is the same on those: sparsify's final typical-row FVU as the target, typical-row curves. A single massive
held-out row can rule the FVU over every row, and so the all-rows target.

    python benchmarks/sae_train.py --cache DIR --steps 200 --eval-every 20 --libraries interp sparsify saelens

The cost of the trainer's non-finite guard (:mod:`saes.guard`) is measured in the same run: the rows
``interp-noguard`` (guard off) and ``interp-grads`` (loss and gradients checked) beside ``interp``
(the default, loss checked every step); ``summary.guard_overhead_loss`` / ``guard_overhead_grads`` are
the fractions of step time they cost (median over rounds of the paired per-round ratio), and
``summary.guard_check_timed_alone`` times the check by itself on the same SAE's loss and gradients,
as a fraction of a step (whole runs differ by a few percent from round to round on a shared CPU, far
more than the check costs). Only the guard:

    python benchmarks/sae_train.py --cache DIR --steps 40 --libraries interp interp-noguard interp-grads --repeats 5

bf16 (``--bf16``): each library that has a bf16 path gets a second row trained under bf16 autocast of
its SAE forward, on the same batches with the same budget (weights and Adam stay fp32 everywhere):
``interp-bf16`` (``TrainConfig(bf16=True)``), ``saelens-bf16`` (``SAETrainerConfig(autocast=True)``)
and ``sparsify-bf16`` (its step under ``torch.autocast``; on CUDA sparsify's ``SparseCoder.forward``
is decorated with bf16 autocast, so its plain row is bf16 there too). ``summary.bf16`` gives, per
library, the median per-round ratio of bf16 to fp32 tokens/s and the relative change of the final
held-out FVU (measured in fp32), and ``speedup_bf16_vs_<peer>_bf16`` compares the bf16 rows. Where bf16
matrix products take torch's slow path (a CPU without bf16 units, :mod:`interp.precision`) the bf16 rows are
left out and ``bf16_skipped`` says why:

    python benchmarks/sae_train.py --cache DIR --steps 40 --bf16

Each library at its own defaults (rows ``interp-default`` and ``sparsify-signum``): the rows above share one
Adam learning rate and schedule (``--lr``, by default sparsify's Adam rule ``2e-4 / sqrt(d_sae / 2**14)``),
which isolates speed and learning per token but is not what either library does out of the box.
``interp-default`` is this project's trainer at its default learning rate (``TrainConfig(lr=None)``);
``sparsify-signum`` is sparsify with every default of its ``TrainConfig``: not Adam but ``SignSGD`` under
schedulefree's ``ScheduleFreeWrapper`` (momentum 0.95, ``5e-3 / sqrt(d_sae / 2**14)``, no schedule) and no
AuxK loss, evaluated on its averaged weights (the ones it saves). Each row records the rate it used (``lr``);
``summary.time_to_target_at_defaults`` times every row to ``sparsify-signum``'s final held-out FVU:

    python benchmarks/sae_train.py --cache DIR --steps 200 --batch 1024 \
        --libraries interp sparsify interp-default sparsify-signum

Seeds (``--seeds S [S ...]``, default 0): round r draws every library's initial weights and the order of the
training rows from ``seeds[r % len(seeds)]`` (the held-out rows stay the same), so each round pairs the libraries
on one seed; with several seeds ``summary.fvu_over_seeds`` gives each library's final FVU per seed and, against
this project, the per-seed differences, their mean and standard error and the seeds where this project's FVU is
at or below. ``fvu_minus_best_peer`` and the bf16 FVU change are per round, then the median:

    python benchmarks/sae_train.py --cache DIR --steps 200 --batch 1024 --libraries interp sparsify \
        --repeats 5 --seeds 0 1 2 3 4

``--device cuda`` runs every library on the GPU (the data is moved there before timing); ``--quick``
trains on a small planted-dictionary data set instead of a cache, with tiny sizes, every library in
this process: it checks the code path only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402

SITE = "blocks.12.hook_resid_post"
RESULTS = Path(__file__).parent / "results" / "sae_train.json"


def planted_rows(n_rows: int, d_model: int = 64, seed: int = 0) -> torch.Tensor:
    """Quick-mode data: sparse non-negative mixtures of a fixed random unit-norm dictionary (4 x d_model
    atoms, about 8 active per row) plus an offset."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(4 * d_model, d_model, generator=g), dim=1)
    z = (torch.rand(n_rows, 4 * d_model, generator=g) < 8 / (4 * d_model)).float()
    return (z * 2 * torch.rand(n_rows, 4 * d_model, generator=g)) @ atoms + torch.randn(d_model, generator=g)


def load_batches(cache: str | None, batch: int, steps: int, eval_batches: int, seed: int = 0) -> tuple[list, list]:
    """Every row of the cache (no cache: :func:`planted_rows`), pre-scaled as the trainer scales its inputs
    (:func:`saes.losses.input_scale` of the first batch: massive activations left out; the plain mean used
    before put batch-4,096 runs on layer 12 at 0.525 x this scale); the last
    ``eval_batches * batch`` rows are held out, the rest is cycled through (a new permutation per pass, drawn
    from ``seed``) to make ``steps`` training batches."""
    if cache is None:
        rows = planted_rows(max(4, eval_batches + 2) * batch)
    else:
        from interp.cache import CachedActivations

        src = CachedActivations(cache, batch_tokens=batch, seed=0, sites=[SITE], epochs=1)
        rows = torch.cat([b[SITE].float() for b in src])
    from saes.losses import input_scale

    rows = rows * input_scale(rows[:batch])  # the trainer's estimate on the first batch, massive rows left out
    n_held = eval_batches * batch
    if rows.shape[0] < n_held + batch:
        raise SystemExit(f"the cache holds {rows.shape[0]} rows; need at least {n_held + batch}")
    pool, held = rows[:-n_held], rows[-n_held:]
    g = torch.Generator().manual_seed(seed)
    train, order, pos = [], torch.randperm(pool.shape[0], generator=g), 0
    for _ in range(steps):
        if pos + batch > pool.shape[0]:
            order, pos = torch.randperm(pool.shape[0], generator=g), 0
        train.append(pool[order[pos:pos + batch]].contiguous())
        pos += batch
    return train, list(held.split(batch)), pool.shape[0]


def lr_factor(step: int, n: int) -> float:
    warm, decay = int(0.01 * n), int(0.2 * n)
    if step < warm:
        return (step + 1) / (warm + 1)
    if decay and step >= n - decay:
        return max(0.0, (n - step) / decay)
    return 1.0


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Timer:
    """Timestamps each step (the first step is warm-up and is not counted) and, every ``every`` steps, records
    the held-out FVU of the SAE being trained (:meth:`watch`) on ``held`` before the step, off the clock.

    ``t[s]`` is stamped just before step ``s`` (``t[steps]`` after the last one); the time spent evaluating
    is subtracted from every later stamp, so differences of stamps are training time only.

    Where the watched SAE is on a CUDA device, each stamp is a CUDA event recorded on the stream, and the host
    waits for the device only at evaluations and when ``t`` is read: a training loop that queues its next step
    before the last one has run is timed so, as it runs outside a benchmark (a host wait at every stamp would
    cost each library the time to queue a step's first kernels, a loop that never waits most). The times are
    the stream's: the first stamp runs when nothing is queued, so ``t[s] - t[0]`` is the wall-clock time from
    there. Elsewhere, the host's clock."""

    def __init__(self, steps: int = 0, every: int = 0, held: list | None = None, batch: int = 0):
        self._stamps: list = []
        """Host times (seconds, evaluation time already taken off), or ``(CUDA event, evaluation seconds
        before it)``."""
        self.steps, self.every, self.held, self.batch = steps, every, held or [], batch
        self.curve: list[dict] = []
        self.eval_seconds = 0.0
        self._sae = self._recon = None
        self._around: tuple = (lambda: None, lambda: None)
        self.lr_used: float | None = None
        """The learning rate the runner trained with, when it is not the one it was given."""

    def watch(self, sae: torch.nn.Module, recon, around: tuple | None = None) -> None:
        """The SAE to evaluate and its reconstruction function (``x -> x_hat``); ``around``: two callables run
        before and after each evaluation (a schedule-free optimizer swaps its averaged weights in and out)."""
        self._sae, self._recon = sae, recon
        self._around = around or self._around

    def _on_cuda(self) -> bool:
        param = next(self._sae.parameters(), None) if isinstance(self._sae, torch.nn.Module) else None
        return param is not None and param.is_cuda

    @property
    def t(self) -> list[float]:
        """The stamps in seconds (on CUDA, waits for the device once)."""
        if not self._stamps or not isinstance(self._stamps[0], tuple):
            return list(self._stamps)
        torch.cuda.synchronize()
        first = self._stamps[0][0]
        return [first.elapsed_time(ev) / 1000 - before for ev, before in self._stamps]

    def tick(self) -> None:
        if self._on_cuda():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._stamps.append((ev, self.eval_seconds))
        else:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._stamps.append(time.perf_counter() - self.eval_seconds)
        step = len(self._stamps) - 1
        if self.every and self._recon is not None and step < self.steps and step % self.every == 0:
            start = time.perf_counter()
            self._around[0]()
            self.record(step, **heldout_report(self._sae, self._recon, self.held))
            self._around[1]()
            if self._on_cuda():  # the stream's time from this step's stamp to the evaluation's end
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                self.eval_seconds += self._stamps[-1][0].elapsed_time(end) / 1000
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.eval_seconds += time.perf_counter() - start

    def record(self, step: int, fvu: float, fvu_typical: float | None = None) -> None:
        """A curve point: ``fvu`` measured before step ``step`` (``step == steps``: after the last one), and
        ``fvu_typical``, the FVU over the rows that are not massive activations, when given."""
        t = self.t
        self.curve.append({"step": step, "tokens": step * self.batch, "train_seconds": t[step] - t[0],
                           "heldout_fvu": fvu, **({} if fvu_typical is None else {"heldout_fvu_typical": fvu_typical})})


def run_ours(train, lr, k, d_sae, device, timer: Timer, seed: int = 0, bf16: bool = False, guard: str = "loss"):
    import saes
    from saes.trainer import TrainConfig, Trainer

    torch.manual_seed(seed)
    sae = saes.build("topk", d_model=train[0].shape[-1], d_sae=d_sae, k=k).to(device)
    timer.watch(sae, lambda x: sae(x).x_hat)

    class Source:
        def __iter__(self):
            for x in train:
                timer.tick()
                yield x

    n, b = len(train), train[0].shape[0]
    cfg = TrainConfig(total_tokens=n * b, batch_tokens=b, lr=lr, normalize_inputs=False, progress=False,
                      log_every=n, nonfinite_guard=guard, bf16=bf16)
    timer.lr_used = cfg.lr_for(sae)
    Trainer(sae, cfg).fit(Source())
    timer.tick()
    return lambda x: sae(x).x_hat


def run_saelens(train, lr, k, d_sae, device, timer: Timer, seed: int = 0, bf16: bool = False):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    n, b, d = len(train), train[0].shape[0], train[0].shape[-1]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k, dtype="float32", device=str(device)))
    cfg = SAETrainerConfig(total_training_samples=n * b, train_batch_size_samples=b, lr=lr, lr_end=0.0,
                           lr_scheduler_name="constant", lr_warm_up_steps=int(0.01 * n),
                           lr_decay_steps=int(0.2 * n), device=str(device), dead_feature_window=2442,
                           autocast=bf16)
    timer.watch(sae, lambda x: sae(x))

    def provider():
        for x in train:
            timer.tick()
            yield x

    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        SAETrainer(cfg, sae, provider()).fit()
    timer.tick()
    sae.eval()
    return lambda x: sae(x)


def sparse_coder(d: int, d_sae: int, k: int, device="cpu", seed: int = 0):
    """sparsify's ``SparseCoder`` as every sparsify row builds it: fp32, its own initialisation drawn after
    ``torch.manual_seed(seed)``."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    return SparseCoder(d, SparseCoderConfig(num_latents=d_sae, k=k), device=device, dtype=torch.float32)


@torch.no_grad()
def start_from_sparsify(sae: torch.nn.Module, seed: int = 0) -> None:
    """Give this project's TopK-style ``sae`` the very weights sparsify starts from with ``seed``
    (:func:`sparse_coder`: ``nn.Linear``'s uniform encoder, zero bias, the normalised encoder as decoder)."""
    sc = sparse_coder(sae.cfg.d_model, sae.cfg.d_sae, sae.cfg.k, sae.W_dec.device, seed)
    sae.W_enc.copy_(sc.encoder.weight.T)
    sae.b_enc.copy_(sc.encoder.bias)
    sae.W_dec.copy_(sc.W_dec)


def sparsify_fp32(sae):
    """``x -> x_hat`` of a sparsify SAE in fp32: ``SparseCoder.forward`` is decorated with bf16 autocast on CUDA,
    which turned the evaluation's ``autocast(enabled=False)`` back on inside the call."""
    forward = getattr(type(sae).forward, "__wrapped__", type(sae).forward)
    return lambda x: forward(sae, x).sae_out


def run_sparsify(train, lr, k, d_sae, device, timer: Timer, seed: int = 0, bf16: bool = False):
    n, d = len(train), train[0].shape[-1]
    sae = sparse_coder(d, d_sae, k, device, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, n))
    since = torch.zeros(d_sae, dtype=torch.long, device=device)
    timer.watch(sae, sparsify_fp32(sae))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    for step, x in enumerate(train):
        timer.tick()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since > 10_000_000
        with autocast:
            out = sae(x, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        since += x.shape[0]
        since[out.latent_indices.flatten()] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
    sae.set_decoder_norm_to_unit_norm()
    timer.tick()
    return sparsify_fp32(sae)


def run_sparsify_signum(train, lr, k, d_sae, device, timer: Timer, seed: int = 0, bf16: bool = False):
    """sparsify with every default of its ``TrainConfig``: its default optimizer (``SignSGD`` in schedulefree's
    ``ScheduleFreeWrapper``, momentum 0.95, learning rate ``5e-3 / sqrt(d_sae / 2**14)``, no schedule) and
    ``auxk_alpha = 0``; the benchmark's ``lr`` is not used. Held-out FVU is measured on the averaged weights
    (``optimizer.eval()``), the ones sparsify saves."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD

    sae = sparse_coder(train[0].shape[-1], d_sae, k, device, seed)
    timer.lr_used = 5e-3 / (d_sae / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": timer.lr_used}]), momentum=0.95)
    opt.train()
    kept: list[torch.Tensor] = []

    def averaged_in():  # the averaged weights for the evaluation; the training ones kept exactly
        kept[:] = [p.detach().clone() for p in sae.parameters()]
        opt.eval()

    def training_back():  # opt.train() interpolates back, which is not bit-exact: restore the kept copy
        opt.train()
        with torch.no_grad():
            for p, v in zip(sae.parameters(), kept):
                p.copy_(v)

    timer.watch(sae, sparsify_fp32(sae), around=(averaged_in, training_back))
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    for step, x in enumerate(train):
        timer.tick()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        with autocast:
            loss = sae(x).fvu
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    opt.eval()
    timer.tick()
    return sparsify_fp32(sae)


RUNNERS = {"interp": run_ours, "saelens": run_saelens, "sparsify": run_sparsify,
           # the same trainer with its non-finite guard off / checking gradients too: the guard's cost
           "interp-noguard": lambda *a: run_ours(*a, guard="off"),
           "interp-grads": lambda *a: run_ours(*a, guard="grads"),
           # bf16 autocast of the SAE forward, each library's own way (see the module docstring)
           "interp-bf16": lambda *a: run_ours(*a, bf16=True),
           "saelens-bf16": lambda *a: run_saelens(*a, bf16=True),
           "sparsify-bf16": lambda *a: run_sparsify(*a, bf16=True),
           # each library at its own defaults, learning rate included (the rows above share one rate)
           "interp-default": lambda train, lr, *a: run_ours(train, None, *a),
           "sparsify-signum": run_sparsify_signum}
BF16 = {lib: f"{lib}-bf16" for lib in ("interp", "saelens", "sparsify")}
"""The libraries with a bf16 path and the name of their bf16 row."""


@torch.no_grad()
def final_report(recon, held_out) -> dict:
    """Held-out reconstruction: ``fvu`` over every row, ``fvu_typical`` over the rows that are not massive
    activations and ``massive_rows`` (:class:`saes.evaluate.ReconstructionStats`; sums over the whole set)."""
    from saes.evaluate import ReconstructionStats

    acc = ReconstructionStats(held_out[0].shape[-1], 1)
    for x in held_out:
        acc.update(x, recon(x), torch.zeros(x.shape[0], 1))
    r = acc.result()
    return {"fvu": r["fvu"], "fvu_typical": r.get("fvu_typical"), "massive_rows": r["massive_rows"]}


def final_fvu(recon, held_out) -> float:
    """:func:`final_report`'s FVU over every held-out row."""
    return final_report(recon, held_out)["fvu"]


def heldout_report(sae: torch.nn.Module, recon, held_out) -> dict:
    """``{"fvu", "fvu_typical"}`` of :func:`final_report` for ``sae`` as it stands mid-training: in eval mode (its
    mode is restored after) and in fp32 (autocast off)."""
    was = sae.training
    sae.eval()
    try:
        with torch.autocast(held_out[0].device.type, enabled=False):
            r = final_report(recon, held_out)
        return {"fvu": r["fvu"], "fvu_typical": r["fvu_typical"]}
    finally:
        sae.train(was)


def heldout_fvu(sae: torch.nn.Module, recon, held_out) -> float:
    """:func:`heldout_report`'s FVU over every row."""
    return heldout_report(sae, recon, held_out)["fvu"]


def time_to_target(curve: list[dict], target: float, key: str = "heldout_fvu") -> float | None:
    """Training seconds at which ``curve`` (points ``{"train_seconds", key}`` in step order; ``key`` is
    ``"heldout_fvu"`` or ``"heldout_fvu_typical"``) first reaches a held-out FVU <= ``target``: linear in time
    between the last point above the target and the first at or below it; the first point's time (0 at step 0)
    when it is already there; None when no point is. A non-finite or missing point never reaches the target,
    and a crossing right after one is put at the crossing point."""
    before = None
    for point in curve:
        t, fvu = point["train_seconds"], point.get(key)
        fvu = math.nan if fvu is None else fvu
        if fvu <= target:
            if before is None or not math.isfinite(before[1]):
                return t
            return before[0] + (t - before[0]) * (before[1] - target) / (before[1] - fvu)
        before = (t, fvu)
    return None


def done_runs(path: Path, shrink: int) -> dict:
    """The runs a study's ``results.json`` at ``path`` already holds (``{}`` when there is none), so that a rerun
    into the same folder skips them; a file written with another ``--shrink`` is refused."""
    old = json.loads(path.read_text()) if path.exists() else {}
    if old and old.get("shrink") != shrink:
        raise SystemExit(f"{path} was written with --shrink {old.get('shrink')}; use another --out")
    return old.get("runs", {})


def recorded_command(script: str, argv: list[str]) -> str:
    """The command line as recorded in a result: ``python SCRIPT ARGS``, with every cache folder (a path on the
    machine that ran it) written as its flag's name: ``--cache CACHE``, ``--tune-cache TUNE_CACHE``, and any other
    machine path so too (:func:`interp.provenance.recorded_command`)."""
    from interp.provenance import recorded_command as path_free

    return path_free(script, argv, placeholder_flags=("cache",))


def eval_every(args) -> int:
    """``--eval-every``, its default (a tenth of the steps, at least 1) filled in."""
    if args.eval_every is None:
        return max(1, args.steps // 10)
    if args.eval_every < 0:
        raise SystemExit(f"--eval-every is {args.eval_every}; expected a number of steps >= 1, or 0 for no curve")
    return args.eval_every


def worker(args) -> dict:
    train, held, pool_rows = load_batches(args.cache, args.batch, args.steps, args.eval_batches, args.seed)
    train, held = [x.to(args.device) for x in train], [x.to(args.device) for x in held]
    from saes.train_config import default_lr  # sparsify's Adam rule: the rate the shared-rate rows train at

    lr = args.lr if args.lr else default_lr(args.d_sae)
    every = eval_every(args)
    timer = Timer(args.steps, every, held[:1], args.batch)  # intermediate points: the first held-out batch
    _reset_peak_rss()
    rss0 = _peak_rss_mb()
    recon = RUNNERS[args.worker](train, lr, args.k, args.d_sae, args.device, timer, args.seed)
    peak = _peak_rss_mb()
    t = timer.t
    if len(t) != args.steps + 1:
        raise SystemExit(f"{args.worker} timed {len(t) - 1} steps; expected {args.steps}")
    timed = t[-1] - t[1]
    report = final_report(recon, held)
    fvu = report["fvu"]
    res = {"library": args.worker, "seed": args.seed, "steps": args.steps, "tokens": args.steps * args.batch,
           "tokens_per_s": (args.steps - 1) * args.batch / timed, "train_seconds": t[-1] - t[0],
           "final_fvu": fvu, "final_fvu_typical": report["fvu_typical"],
           "held_out_massive_rows": report["massive_rows"], "peak_rss_mb": peak,
           "peak_rss_over_data_mb": peak - rss0, "lr": timer.lr_used or lr, "distinct_training_rows": pool_rows,
           "held_out_rows": sum(x.shape[0] for x in held)}
    if every:
        timer.record(args.steps, fvu, report["fvu_typical"])  # after the last step, on every held-out batch
        res.update(eval_every=every, eval_seconds_excluded=timer.eval_seconds, fvu_curve=timer.curve)
    if str(args.device).startswith("cuda"):
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))
    return res


def machine() -> dict:
    """What sets this run's speeds beside the load: the CPU's vector capability as torch sees it (oneDNN's lead over
    ``addmm`` depends on AVX-512), the CPU model, whether :mod:`saes.native`'s compiled kernels are built, and the
    versions of torch and of the peers."""
    import platform
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:  # Linux; elsewhere platform's own name
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = None
    from saes import native

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_model": model or platform.processor(),
            "native_kernels": native.library() is not None,
            "versions": {d: version(d) for d in ("torch", "eai-sparsify", "sae-lens")}}


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def matmul_limit(batch: int, d_model: int, d_sae: int, device: str = "cpu", reps: int = 5) -> dict:
    """The fp32 encoder matmul alone, median of ``reps``, with every kernel there is: torch's ``addmm`` (MKL on
    CPU) into a fresh output (``addmm``) and into an output allocated once (``preallocated``); on CPU also
    oneDNN's linear kernel (``onednn``), the one this project's trainer uses on CPUs with AVX-512
    (:func:`saes.kernels.encoder_matmul`; ``preallocated`` is its kernel elsewhere), with freed memory kept as the
    trainer keeps it. :func:`fastest` adds the top-level figures: the fastest kernel, the ceiling a training step
    is compared with. (Up to run 5 of this benchmark the top level was ``addmm`` into a fresh output; MKL there is
    2-3x slower than oneDNN on this project's AVX-512 AMD CPU.)"""
    from saes import kernels
    from saes.malloc import reuse_freed_memory

    x, w_t = torch.randn(batch, d_model, device=device), torch.randn(d_sae, d_model, device=device)
    w, b = w_t.T, torch.zeros(d_sae, device=device)
    out = torch.addmm(b, x, w)

    def timed(fn) -> dict:
        fn()
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        return {"seconds_median": t, "tokens_per_s": batch / t, "gflops": 2 * batch * d_model * d_sae / t / 1e9}

    res = {"addmm": timed(lambda: torch.addmm(b, x, w)), "preallocated": timed(lambda: torch.addmm(b, x, w, out=out))}
    if kernels.onednn_applies(x, w):
        with reuse_freed_memory():
            res["onednn"] = timed(lambda: kernels.encoder_matmul(x, w, b, onednn=True))
    return res


def fastest(limit: dict) -> dict:
    """``limit`` (of :func:`matmul_limit`) with the fastest kernel's figures at the top level and its name."""
    name = max(limit, key=lambda k: limit[k]["tokens_per_s"])
    return {**limit[name], "kernel": name, **limit}


def _mean_of(a: dict, b: dict) -> dict:
    """The mean of two timings of :func:`matmul_limit`, field by field (nested ones too)."""
    return {k: _mean_of(v, b[k]) if isinstance(v, dict) else (v + b[k]) / 2 for k, v in a.items()}


def guard_check_cost(batch: int, d_model: int, d_sae: int, k: int, device: str = "cpu", reps: int = 50) -> dict:
    """The guard's own work timed alone (median of ``reps`` calls) on a real loss and real gradients of
    the benchmark's SAE: what it adds to a step, free of the step-to-step noise of whole runs."""
    import saes
    from saes import guard

    torch.manual_seed(0)
    sae = saes.build("topk", d_model=d_model, d_sae=d_sae, k=k).to(device)
    out = sae(torch.randn(batch, d_model, device=device))
    loss = (out.x_hat - torch.randn(batch, d_model, device=device)).pow(2).mean()
    loss.backward()
    res = {}
    for name, params in (("loss", None), ("grads", list(sae.parameters()))):
        times = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            guard.finite(loss, params)
            _sync(device)
            times.append(time.perf_counter() - t0)
        res[f"{name}_seconds_median"] = statistics.median(times)
    return res


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="cache folder holding blocks.12.hook_resid_post (required unless --quick)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=2, help="held-out batches (the cache's last rows)")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=16 * 576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--libraries", nargs="+", default=["interp", "interp-noguard", "sparsify", "saelens"],
                   help=f"any of {sorted(RUNNERS)}; interp-noguard / interp-grads measure the non-finite guard")
    p.add_argument("--bf16", action="store_true", help="add the bf16 row of every library in --libraries that has one")
    p.add_argument("--repeats", type=int, default=5,
                   help="runs per library (alternating order); the median is reported")
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (every library, and the matmul limit)")
    p.add_argument("--quick", action="store_true", help="planted data instead of a cache, tiny sizes, one repeat, "
                   "every library in this process: checks the code path only")
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out FVU curve point every N steps (default: steps // 10, at least 1; 0: no curve)")
    p.add_argument("--target-fvu", type=float, default=None,
                   help="held-out FVU for time_to_target (default: sparsify's final FVU in the same round)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="round r initialises every SAE and orders the training batches with seeds[r %% len(seeds)] "
                        "(the held-out rows stay the same); several seeds: summary.fvu_over_seeds")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.d_sae, args.k, args.repeats, args.eval_batches = 4, 128, 256, 8, 1, 1
    elif args.cache is None:
        p.error("--cache is required (or --quick)")
    args.eval_every = eval_every(args)
    if args.worker:
        return worker(args)
    libraries = list(args.libraries)
    bf16_skipped = slow_bf16(args)
    if bf16_skipped:
        print(bf16_skipped, file=sys.stderr, flush=True)
    elif args.bf16:
        libraries += [BF16[lib] for lib in args.libraries if lib in BF16 and BF16[lib] not in libraries]
    runs: dict[str, list[dict]] = {lib: [] for lib in libraries}
    load_before = list(os.getloadavg())
    if args.quick:
        d_model = planted_rows(1).shape[-1]
    else:
        from interp.cache import CachedActivations

        d_model = CachedActivations(args.cache, batch_tokens=args.batch, sites=[SITE], epochs=1).d_models[SITE]
    lim_before = matmul_limit(args.batch, d_model, args.d_sae, args.device)
    round_limits = []
    for lib, seed in run_order(libraries, args.repeats, args.seeds):
        if lib == "ceiling":  # the matmul alone, beside this round's libraries
            round_limits.append(fastest(matmul_limit(args.batch, d_model, args.d_sae, args.device)))
            continue
        if args.quick:  # in this process: the code path only (peak memory is not the library's own)
            runs[lib].append(worker(argparse.Namespace(**{**vars(args), "worker": lib, "seed": seed})))
            continue
        cmd = [sys.executable, __file__, "--worker", lib, "--cache", args.cache, "--steps", str(args.steps),
               "--eval-batches", str(args.eval_batches), "--batch", str(args.batch), "--d-sae", str(args.d_sae),
               "--k", str(args.k), "--device", args.device, "--eval-every", str(args.eval_every),
               "--seed", str(seed)]
        cmd += ["--lr", str(args.lr)] if args.lr else []
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{lib} failed:\n{out.stderr[-3000:]}")
        runs[lib].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{lib}: {runs[lib][-1]}", flush=True)
    lim_after = matmul_limit(args.batch, d_model, args.d_sae, args.device)
    # each library's median repeat by tokens/s (every repeat is kept); FVU is deterministic for one seed, so
    # with several seeds the row's final_fvu is that repeat's seed's (every seed's is in final_fvu_all_repeats)
    rows = {lib: {**sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2],
                  "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                  "tokens_per_s_all_repeats": [r["tokens_per_s"] for r in rs],
                  "final_fvu_all_repeats": [r["final_fvu"] for r in rs],
                  "final_fvu_typical_all_repeats": [r.get("final_fvu_typical") for r in rs],
                  "seed_all_repeats": [r["seed"] for r in rs],
                  **({"fvu_curve_all_repeats": [r["fvu_curve"] for r in rs]} if args.eval_every else {})}
            for lib, rs in runs.items()}
    limit = fastest(_mean_of(lim_before, lim_after))
    ours = rows.get("interp", {})
    print(f"\n{'library':<15}{'tokens/s':>11}{'final FVU':>11}{'peak RSS MB':>13}{'over data MB':>14}")
    for lib, r in rows.items():
        print(f"{lib:<15}{r['tokens_per_s']:>11.0f}{r['final_fvu']:>11.4f}{r['peak_rss_mb']:>13.0f}"
              f"{r['peak_rss_over_data_mb']:>14.0f}")
    print("encoder matmul alone, tokens/s (GFLOP/s): " + ", ".join(
        f"{k} {v['tokens_per_s']:.0f} ({v['gflops']:.1f})" for k, v in limit.items() if isinstance(v, dict))
        + f"; the fastest, {limit['kernel']}, is the ceiling")
    summary = {}
    if ours:
        for peer in ("saelens", "sparsify"):
            if peer in rows:
                summary[f"speedup_vs_{peer}"] = ours["tokens_per_s"] / rows[peer]["tokens_per_s"]
        peers = [p for p in ("saelens", "sparsify") if p in rows]
        if peers:  # per round (one seed a round), then the median
            summary["fvu_minus_best_peer"] = statistics.median(
                r["final_fvu"] - min(runs[p][i]["final_fvu"] for p in peers) for i, r in enumerate(runs["interp"]))
        summary["fraction_of_encoder_matmul_limit"] = ours["tokens_per_s"] / limit["tokens_per_s"]
        summary["encoder_matmul_limit_kernel"] = limit["kernel"]
        for lib in ("interp", "saelens", "sparsify"):  # each round against its own ceiling
            if lib in runs:
                key = "" if lib == "interp" else f"{lib}_"
                per_round = [run["tokens_per_s"] / lim["tokens_per_s"] for run, lim in zip(runs[lib], round_limits)]
                summary[f"{key}fraction_of_encoder_matmul_limit_paired"] = statistics.median(per_round)
                summary[f"{key}fraction_of_encoder_matmul_limit_per_round"] = per_round
        for kernel in ("addmm", "preallocated"):  # the ceilings of runs 1-5 (addmm), for comparison
            summary[f"fraction_of_encoder_matmul_limit_{kernel}"] = ours["tokens_per_s"] / limit[kernel]["tokens_per_s"]
        for peer in ("saelens", "sparsify"):  # 2x a peer needs twice its fraction: above 1, out of reach
            if peer in rows:
                summary[f"{peer}_fraction_of_encoder_matmul_limit"] = rows[peer]["tokens_per_s"] / limit["tokens_per_s"]
        if "interp-noguard" in rows:  # > 0: the default guard (loss checked every step) costs this share of a step
            # per round (the two runs of one round are neighbours in time), then the median over rounds
            off = [r["tokens_per_s"] for r in runs["interp-noguard"]]
            per_round = [1 - a["tokens_per_s"] / b for a, b in zip(runs["interp"], off)]
            summary["guard_overhead_loss"] = statistics.median(per_round)
            summary["guard_overhead_loss_per_round"] = per_round
            if "interp-grads" in rows:
                per_round = [1 - a["tokens_per_s"] / b for a, b in zip(runs["interp-grads"], off)]
                summary["guard_overhead_grads"] = statistics.median(per_round)
                summary["guard_overhead_grads_per_round"] = per_round
        if "interp-noguard" in rows:
            cost = guard_check_cost(args.batch, d_model, args.d_sae, args.k, args.device)
            step_s = args.batch / rows["interp-noguard"]["tokens_per_s"]  # one step without the guard
            summary["guard_check_timed_alone"] = {**cost, "step_seconds_without_guard": step_s,
                                                  "loss_fraction_of_step": cost["loss_seconds_median"] / step_s,
                                                  "grads_fraction_of_step": cost["grads_seconds_median"] / step_s}
    if len(set(args.seeds)) > 1:
        summary["fvu_over_seeds"] = seed_summary(runs)
        print(json.dumps({"fvu_over_seeds": summary["fvu_over_seeds"]["vs_interp"]}, indent=1))
    for typical in (False, True):  # every held-out row, then the typical rows (no massive activations)
        reach = target_summary(runs, args.target_fvu, typical=typical) if args.eval_every else {}
        if not reach:
            continue
        name = "time_to_target" + ("_typical" if typical else "")
        summary[name] = reach
        if "interp" in reach["libraries"] and "sparsify" in runs:
            summary[f"{name}_vs_sparsify"] = reach["libraries"]["interp"]["vs_sparsify"]
        print(f"training seconds to held-out FVU <= {reach['target_fvu_per_round']} ({reach['target']}):")
        for lib, r in reach["libraries"].items():
            got = "not reached in every round" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.3g}"
            print(f"  {lib:<15}{got} (per round {r['time_to_target_s_per_round']})")
    if args.eval_every and "sparsify-signum" in runs and args.target_fvu is None:
        # each library at its own defaults: the target is sparsify's final FVU with every default of its own
        defaults = target_summary(runs, None, reference="sparsify-signum")
        summary["time_to_target_at_defaults"] = defaults
        if "interp-default" in runs:
            summary["time_to_target_interp_default_vs_sparsify_signum"] = (
                defaults["libraries"]["interp-default"]["vs_sparsify_signum"])
    bf16 = bf16_summary(runs)
    if bf16:
        summary["bf16"] = bf16
        for peer in ("saelens", "sparsify"):
            if "interp-bf16" in rows and BF16[peer] in rows:
                summary[f"speedup_bf16_vs_{peer}_bf16"] = (rows["interp-bf16"]["tokens_per_s"]
                                                          / rows[BF16[peer]]["tokens_per_s"])
    if summary:
        print(json.dumps(summary, indent=1))
    result = {"benchmark": "sae_train", "site": SITE, "d_sae": args.d_sae, "k": args.k, "batch_tokens": args.batch,
              "steps": args.steps, "seeds": args.seeds, "eval_batches": args.eval_batches,
              "eval_every": args.eval_every,
              "target_fvu": args.target_fvu, "quick": args.quick,
              "data": "planted sparse dictionary (quick)" if args.quick else f"cache of {SITE}",
              "dtype": "float32 weights and Adam; rows ending in -bf16 run the SAE forward under bf16 autocast",
              "device": args.device, "torch_threads": torch.get_num_threads(), "machine": machine(),
              **({"bf16_skipped": bf16_skipped} if bf16_skipped else {}),
              "results": rows, "encoder_matmul_limit": {"before": lim_before, "after": lim_after, "mean": limit,
                                                        "per_round": round_limits},
              "summary": summary, "command": recorded_command("benchmarks/sae_train.py",
                                                              sys.argv[1:] if argv is None else argv),
              "load_average_before_after": [load_before, list(os.getloadavg())],
              "note": "libraries ran one after another in separate processes, in alternating order "
                      "(A B C, C B A, ...); each row is the median repeat, every repeat is in "
                      "tokens_per_s_all_repeats. Final FVU is measured in fp32 for every row."
                      + (" On CUDA, sparsify's SparseCoder.forward runs under bf16 autocast in its plain row "
                         "too (its own decorator)." if args.device.startswith("cuda") else "")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


def run_order(libraries: list[str], repeats: int, seeds: list[int]) -> list[tuple[str, int]]:
    """``(library, seed)`` in the order they run, with ``("ceiling", round)`` where the matmul alone is timed:
    A B C, then C B A (load that drifts over time hits everyone alike), the ceiling before the libraries in even
    rounds and after them in odd ones; round ``r`` takes ``seeds[r % len(seeds)]``."""
    order: list[tuple[str, int]] = []
    for r in range(repeats):
        seed = seeds[r % len(seeds)]
        todo = [(lib, seed) for lib in (libraries if r % 2 == 0 else libraries[::-1])]
        order += [("ceiling", r), *todo] if r % 2 == 0 else [*todo, ("ceiling", r)]
    return order


def slow_bf16(args: argparse.Namespace) -> str | None:
    """Why the ``--bf16`` rows are left out, or None: on a device where bf16 matrix products take the slow path
    (:func:`interp.precision.skip_reason`; on an AVX2-only CPU ~130x float32's time at these sizes). ``--quick``
    sizes run them anyway."""
    from interp import precision

    if not args.bf16 or args.quick:
        return None
    return precision.skip_reason(args.device, "--bf16 rows")


def _median(values: list) -> float | None:
    """Median over rounds; None unless every round has a value."""
    return None if not values or any(v is None for v in values) else statistics.median(values)


def target_summary(runs: dict[str, list[dict]], target_fvu: float | None, reference: str = "sparsify",
                   typical: bool = False) -> dict:
    """Per round, the target (``target_fvu``, else ``reference``'s final held-out FVU of that round) and each
    library's :func:`time_to_target` on its curve; per library the median over rounds of its time and of its
    per-round ratio to ``reference``'s time (None unless every round has one). Empty without ``reference`` and
    ``target_fvu``. ``typical``: the FVU over the held-out rows that are not massive activations, for the
    curves and the reference's final FVU alike (one massive row can rule the FVU over every row)."""
    n_rounds = min(len(rs) for rs in runs.values())
    if target_fvu is None and reference not in runs:
        return {}
    final, point = ("final_fvu_typical", "heldout_fvu_typical") if typical else ("final_fvu", "heldout_fvu")
    targets = [target_fvu if target_fvu is not None else runs[reference][i].get(final) for i in range(n_rounds)]
    if any(t is None for t in targets):
        return {}
    times = {lib: [time_to_target(rs[i]["fvu_curve"], targets[i], point) for i in range(n_rounds)]
             for lib, rs in runs.items()}
    rows = "typical rows" if typical else "every row"
    said = "--target-fvu" if target_fvu is not None else f"{reference}'s final held-out FVU ({rows}) in the same round"
    out = {"target_fvu_per_round": targets, "target": said, "rows": "typical" if typical else "all",
           "libraries": {}}
    key = "vs_" + reference.replace("-", "_")
    for lib, ts in times.items():
        row = {"time_to_target_s": _median(ts), "time_to_target_s_per_round": ts,
               "rounds_reached": sum(t is not None for t in ts)}
        if reference in times:
            ratios = [None if a is None or not b else a / b for a, b in zip(ts, times[reference])]
            row.update({key: _median(ratios), f"{key}_per_round": ratios})
        out["libraries"][lib] = row
    return out


def seed_summary(runs: dict[str, list[dict]]) -> dict:
    """Final held-out FVU per seed and library (a seed run in several rounds gives the same FVU, so its first
    round stands for it), and for every other library against ``interp`` the seeds both ran: per seed the
    difference ``other - interp`` (> 0: this project's SAE reconstructs better), its mean, its standard error
    (sample standard deviation over sqrt(seeds)) and the seeds where this project's FVU is <= the other's."""
    by_seed = {lib: {} for lib in runs}
    for lib, rs in runs.items():
        for r in rs:
            by_seed[lib].setdefault(r["seed"], r["final_fvu"])
    out: dict = {"final_fvu_by_seed": {lib: {str(s): f for s, f in d.items()} for lib, d in by_seed.items()},
                 "vs_interp": {}}
    ours = by_seed.get("interp", {})
    for lib, theirs in by_seed.items():
        seeds = sorted(set(ours) & set(theirs))
        if lib == "interp" or len(seeds) < 2:
            continue
        diff = [theirs[s] - ours[s] for s in seeds]
        out["vs_interp"][lib] = {"seeds": seeds, "fvu_minus_interp_per_seed": diff,
                                 "mean": statistics.mean(diff),
                                 "standard_error": statistics.stdev(diff) / len(diff) ** 0.5,
                                 "seeds_interp_at_or_below": sum(d >= 0 for d in diff)}
    return out


def bf16_summary(runs: dict[str, list[dict]]) -> dict:
    """Per library with both rows: bf16 / fp32 tokens/s (median of the per-round ratios; the two runs of a
    round are neighbours in time) and the relative change of the final held-out FVU (per round, same seed, then
    the median; ``final_fvu_fp32`` / ``_bf16`` are the first round's)."""
    out = {}
    for lib, low in BF16.items():
        if lib in runs and low in runs:
            per_round = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[lib], runs[low])]
            change = [(b["final_fvu"] - a["final_fvu"]) / a["final_fvu"] for a, b in zip(runs[lib], runs[low])]
            out[lib] = {"tokens_per_s_ratio": statistics.median(per_round), "tokens_per_s_ratio_per_round": per_round,
                        "final_fvu_fp32": runs[lib][0]["final_fvu"], "final_fvu_bf16": runs[low][0]["final_fvu"],
                        "final_fvu_relative_change": statistics.median(change),
                        "final_fvu_relative_change_per_round": change}
    return out


if __name__ == "__main__":
    main()
