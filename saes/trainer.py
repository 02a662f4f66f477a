"""Train SAEs on an activation store (live or cached) from one data stream: one SAE per site, or
several per site (sizes, ``k`` ...) that read the same activations (``sites=``).

What an architecture must provide to be trained here (``saes.mp`` and any new one)
-------------------------------------------------------------------------------------
* The :class:`saes.base.SAE` contract: parameters ``W_enc [d_model, d_sae]``, ``b_enc``,
  ``W_dec [d_sae, d_model]``, ``b_dec``; everything else needed at inference registered as a
  parameter or buffer (it is checkpointed through ``state_dict``).
* ``training_loss(x, state) -> saes.losses.TrainStep`` where ``x`` is ``[rows, d_model]`` in the
  SAE's dtype, already multiplied by the input scale, and ``state`` is a
  :class:`saes.losses.TrainState` (step, total steps, ``dead_mask``, ``global_rows``, ``allsum``).
  ``TrainStep.loss`` must be this process's *share* of the global loss: sums over rows divided by
  constants taken over the global batch (use :func:`saes.losses.fvu_loss`, ``global_rows``,
  :func:`saes.losses.total_variance`), so that summed gradients over DDP processes equal one
  process on the whole batch. ``fired [d_sae]`` feeds dead-latent tracking; ``terms`` is logged.
* Optional class attribute ``normalize_decoder = True``: the trainer then removes the gradient
  component parallel to each decoder row before the step and renormalises rows after it (in one pass with
  Adam's step where :func:`saes.optim.unit_rows_applies`: the compiled kernel of :mod:`saes.native`).
* Optional: weight gradients left in ``state.grads`` (a :class:`saes.sparse_grads.SparseGrads`, where the trainer
  gives one) rather than in ``.grad``; the optimizer makes them row by row as it steps. Only for parameters the
  optimizer holds: the run stops with an error naming any left over.
* Optional ``after_step(state)``: called after every optimizer step (e.g. clamp thresholds).
* Optional ``init_from_data(x)``: called once with the first (scaled, global) batch, after
  ``b_dec`` is set (e.g. atoms started from data rows).
* Optional ``fold_input_scale(scale)``: fold the input normalisation into the weights at the end
  (default :func:`saes.losses.fold_input_scale`, right for any SAE whose codes only depend on
  ``(x - b_dec) @ W_enc`` and whose reconstruction is ``codes @ W_dec + b_dec``).

The loop: Adam (torch's fused kernel where it runs, :mod:`saes.optim`; on CPU a TopK SAE's weight gradients are
kept sparse and made inside the optimizer's pass, :mod:`saes.sparse_grads`) with linear warm-up and a linear
decay to zero at the end; ``b_dec`` initialised from the first batch (by default the mean of its typical
rows); inputs scaled so that ``E||x||^2 = d_model`` (folded into the saved weights); optional bf16 autocast; a
finite-value check of every step (:mod:`saes.guard`); periodic atomic resume checkpoints
(:mod:`saes.resume`); gradient all-reduce over ``torch.distributed`` processes (:mod:`saes.distributed`); a
progress bar with loss / L0 / FVU / dead fraction and optional wandb. On CPU, freed blocks are kept for
the next step while the run lasts (:mod:`saes.malloc`: no page faults on weight-sized tensors each step).
Every SAE draws its random numbers from its own torch RNG stream (what the trainer keeps per SAE is in
:mod:`saes.train_state`), so SAEs trained together from one stream come out exactly as each would trained
alone on the same batches. What a run writes to ``out_dir`` and reads back (the folder's lock, held by rank 0 so
that a second run into the same folder is refused with the holder's PID; resume checkpoints; the exported SAEs)
is :mod:`saes.run_folder`'s.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from interp import precision
from saes import distributed as ddp
from saes import guard, hostsync, malloc, optim, run_folder, sparse_grads
from saes import resume as resume_ckpt
from saes.base import SAE, SAEError
from saes.losses import (
    TrainState,
    fold_input_scale,
    geometric_median,
    input_scale,
    normalize_rows,
    remove_parallel_grad,
    total_variance,
    typical_mean,
)
from saes.train_config import TrainConfig
from saes.train_state import SiteState


class Trainer:
    """``Trainer(saes, cfg, out_dir=...).fit(data)``; ``saes`` is one SAE or ``{name: SAE}``.

    Without ``sites`` each name is the site its SAE reads (``{site: SAE}``, one SAE per site). To train
    several SAEs on one site from the same activations (sizes, ``k`` ...), name each SAE and map the
    names to sites: ``sites="blocks.12.hook_resid_post"`` (every SAE reads that site) or
    ``sites={name: site}``, e.g. ``Trainer({"k32": a, "k64": b}, cfg, sites="blocks.12.hook_resid_post")``.
    Each SAE has its own optimizer, schedule, input scale, dead-latent counters and RNG stream, so the
    result is exactly that of training each alone on the same batches (one forward of the model, or one
    read of the cache, for all of them).

    After ``fit``: ``saes_`` (input scale folded into the weights, ready for raw activations),
    ``history_`` (logged metrics), ``scales_``, ``steps_``, ``tokens_``, all keyed by name; with
    ``out_dir``, every SAE is saved to ``out_dir/<name>/`` (a ``/`` in a name becomes ``_``; names that
    would share a folder are refused) with ``hook_name`` set to its site, and resume checkpoints live in
    ``out_dir/checkpoints`` (keyed by name).

    ``out_dir/train_history.json`` is ``history_``: one entry every ``log_every`` steps (and at the
    last) with ``step``, ``tokens`` (rows trained on so far) and, per SAE name, the live metrics of
    that step: ``loss``, ``fvu`` (fraction of variance unexplained on the batch), ``l0`` (mean active
    latents per row), ``dead`` (fraction of latents not fired for ``dead_tokens`` rows) and the
    architecture's loss terms (e.g. ``auxk``). A resume restores the history saved with the
    checkpoint, so it stays whole; a resume that accepted changed settings adds an entry
    ``{"step", "tokens", "event": "resume", "changes": {name: [saved, new]}}``.

    ``metadata`` (SAELens' keys: ``model_name``, ``context_size``, ``prepend_bos``, ``dataset_path``)
    is written into every saved SAE, with ``hook_name`` set to its site; ``data_summary`` (what the
    activations came from, e.g. an activation source's ``describe()``) is kept in its training
    summary under ``"data"``, with the number of rows trained on."""

    def __init__(self, saes: SAE | dict[str, SAE], cfg: TrainConfig, *, sites: str | dict[str, str] | None = None,
                 out_dir: str | Path | None = None, metadata: dict[str, Any] | None = None,
                 data_summary: dict[str, Any] | None = None):
        if isinstance(saes, SAE):
            saes = {"": saes}
        if not isinstance(saes, dict) or not saes or not all(isinstance(s, SAE) for s in saes.values()):
            raise SAEError(f"Trainer expects an SAE or a non-empty dict {{name: SAE}}, got {saes!r}")
        for name, sae in saes.items():
            if not hasattr(sae, "training_loss"):
                raise SAEError(f"SAE {type(sae).__name__} named {name!r} has no training_loss(x, state); "
                               "see saes.trainer's docstring for what an architecture must provide")
        self.saes, self.cfg = dict(saes), cfg
        self.site_of = _site_map(self.saes, sites)
        run_folder.check_folders(self.saes)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.metadata, self.data_summary = dict(metadata or {}), dict(data_summary or {})

    # ---------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        dev = next(iter(self.saes.values())).device
        self.rank, self.world = ddp.setup(dev)
        self.sites: dict[str, SiteState] = {}
        for name, sae in self.saes.items():
            lr = self.cfg.lr_for(sae)
            groups = optim.param_groups(sae, lr, sae.lr_factors())
            opt = optim.adam(groups, lr=lr, betas=self.cfg.betas)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.cfg.lr_factor)
            since = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
            self.sites[name] = st = SiteState(sae, opt, sched, since)
            if self._defers(st):
                st.deferred = guard.Deferred(sae.device)
                opt.found_inf = st.deferred.flag  # torch's fused Adam skips its step while the flag is set
            if self.world == 1 and st.deferred is None and optim.sparse_applies(opt):
                st.grads = sparse_grads.SparseGrads()

    def _defers(self, st: SiteState) -> bool:
        """Whether this SAE's guard keeps its flag on the device (:class:`saes.guard.Deferred`): off the CPU
        (:func:`saes.hostsync.sync_free`), with torch's fused Adam (which can skip a step on the device) and no
        ``after_step`` (which would still change the weights after a skipped step)."""
        return (self.cfg.nonfinite_guard != "off" and hostsync.sync_free(st.sae.device)
                and bool(st.opt.defaults.get("fused")) and getattr(st.sae, "after_step", None) is None)

    def _check_deferred(self) -> None:
        """Read every deferred flag (one read back per SAE) and stop at the first bad step."""
        found = []
        for name, st in self.sites.items():
            bad = st.deferred.first_bad() if st.deferred is not None else None
            if bad is not None:
                found.append((bad[0], name, bad))
        if found:
            _, name, (step, loss, batch, lr, after) = min(found, key=lambda f: f[0])
            raise self._nonfinite(name, step, loss, batch, lr, unapplied_after=after)

    def _nonfinite(self, name: str, step: int, loss: torch.Tensor, batch: torch.Tensor, lr: float,
                   unapplied_after: int = 0) -> guard.NonFiniteError:
        """The error that stops the run at a non-finite step (no gradient is left behind)."""
        for st in self.sites.values():
            st.opt.zero_grad(set_to_none=True)
            if st.grads is not None:
                st.grads.clear()
        return guard.error(site=name, step=step, total_steps=self.cfg.total_steps, loss=loss, batch=batch, lr=lr,
                           last_good=self._last_saved, unapplied_after=unapplied_after, bf16=self.cfg.bf16,
                           checkpoints=self.out_dir / "checkpoints" if self.out_dir is not None else None)

    def _split(self, batch) -> dict[str, torch.Tensor]:
        """``{name: rows}``: each SAE's rows, taken from the batch by its site (a site read by several
        SAEs hands all of them the same tensor)."""
        needed = list(dict.fromkeys(self.site_of.values()))
        if isinstance(batch, torch.Tensor):
            if len(needed) != 1:
                raise SAEError(f"the data source yields one tensor per batch, but the SAEs read {len(needed)} sites "
                               f"{needed}: yield dicts {{site: tensor}} (e.g. an activation store of those sites)")
            batch = {needed[0]: batch}
        if not isinstance(batch, dict):
            raise SAEError(f"the data source must yield tensors [rows, d_model] or dicts {{site: tensor}}, "
                           f"got {type(batch).__name__}")
        if len(needed) == 1 and len(batch) == 1:
            by_site = {needed[0]: next(iter(batch.values()))}
        else:
            missing = [s for s in needed if s not in batch]
            if missing:
                raise SAEError(f"the data source yields sites {sorted(batch)}, but SAEs were given for {missing}")
            by_site = batch
        return {name: by_site[site] for name, site in self.site_of.items()}

    def _init_from_data(self, batch: dict[str, torch.Tensor]) -> None:
        for name, st in self.sites.items():
            x = batch[name].to(st.sae.device, torch.float32)
            if self.cfg.normalize_inputs:
                st.scale = input_scale(x)
            x = x * st.scale
            with torch.no_grad():
                if self.cfg.b_dec_init == "geometric_median":
                    st.sae.b_dec.copy_(geometric_median(x))
                elif self.cfg.b_dec_init == "mean":
                    st.sae.b_dec.copy_(x.mean(0))
                elif self.cfg.b_dec_init == "typical_mean":
                    st.sae.b_dec.copy_(typical_mean(x))
            init = getattr(st.sae, "init_from_data", None)
            if init is not None:
                with st.own_rng():
                    init(x.to(st.sae.dtype))

    # ---------------------------------------------------------------------------------------------
    def fit(self, data: Iterable, *, resume: bool = False, overwrite: bool = False,
            accept_changes: bool = False) -> Trainer:
        """Train on ``data`` (tensors or ``{site: tensor}`` of ``batch_tokens`` rows); returns self.

        Args:
            resume: continue from the newest resume checkpoint in ``out_dir/checkpoints`` (from step 0,
                with a warning, when there is none). Settings that change the result (the config but
                :data:`saes.resume.NOT_RESULT`, the SAE configs, the data source's description; not what only
                sets the initial weights) must match the checkpoint's, else :class:`SAEError` lists every
                difference.
            overwrite: without ``resume``, delete the resume checkpoints an earlier run left in
                ``out_dir`` (without it they are refused: a run never mixes its checkpoints with another's).
            accept_changes: with ``resume``, accept changed settings and record them in the history.
        """
        if resume and self.out_dir is None:
            raise SAEError("resume=True needs out_dir (where the checkpoints are)")
        self._setup()
        on_cpu = any(sae.device.type == "cpu" for sae in self.saes.values())
        with run_folder.own_output(self.out_dir, self.rank), malloc.reuse_freed_memory(on_cpu):
            return self._fit(data, resume=resume, overwrite=overwrite, accept_changes=accept_changes)

    def _fit(self, data: Iterable, *, resume: bool, overwrite: bool, accept_changes: bool) -> Trainer:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        import random

        random.seed(cfg.seed)
        for st in self.sites.values():  # every SAE starts its own stream from the seed
            st.seed_rng()
        self.history_: list[dict[str, Any]] = []
        self.tokens_ = step = 0
        ckpt_root = self.out_dir / "checkpoints" if self.out_dir is not None else None
        loaded = resume_ckpt.start(ckpt_root, resume=resume, overwrite=overwrite, is_main=self.rank == 0)
        ddp.barrier()
        if loaded is not None:
            step = run_folder.load_checkpoint(self, *loaded, data, accept_changes)
        self._last_saved = step if loaded is not None else None
        it = iter(data)
        if loaded is not None and not hasattr(data, "load_state_dict"):
            for _ in range(step):  # a plain iterable: replay it to the saved position
                next(it)
        run = self._wandb()
        bar = tqdm(total=cfg.total_steps, initial=step, disable=not cfg.progress or self.rank != 0, desc="sae train")
        autocast = (torch.autocast(next(iter(self.saes.values())).device.type, dtype=torch.bfloat16)
                    if cfg.bf16 else contextlib.nullcontext())
        if cfg.bf16:
            for dev in {sae.device for sae in self.saes.values()}:
                precision.warn_if_slow(dev, "SAE training with bf16=True (autocast of the SAE forward)",
                                       "train in float32 on this machine (bf16=False; interp sae train: drop --bf16)")
        try:
            while step < cfg.total_steps:
                try:
                    batch = self._split(next(it))
                except StopIteration:
                    warnings.warn(f"data ran out after {step} of {cfg.total_steps} steps", stacklevel=3)
                    break
                rows = {name: t.shape[0] for name, t in batch.items()}
                if any(r != cfg.batch_tokens for r in rows.values()):
                    raise SAEError(f"the data source yielded batches of {rows} rows, but TrainConfig.batch_tokens is "
                                   f"{cfg.batch_tokens}: set them equal (losses are normalised by the global batch)")
                if step == 0:
                    self._init_from_data(batch)
                logs = {}
                for name, st in self.sites.items():
                    logs[name] = self._step(name, st, batch[name], step, autocast)
                step += 1
                self.tokens_ += cfg.batch_tokens
                bar.update(1)
                log = step % cfg.log_every == 0 or step == cfg.total_steps
                save = ckpt_root is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                                                  or step == cfg.total_steps)
                if log or save or any(st.deferred is not None and st.deferred.due for st in self.sites.values()):
                    self._check_deferred()
                if log:
                    self._log(step, logs, bar, run)
                    self._check_diverged(step, logs)
                if save:
                    self._check_state_finite(step)
                    run_folder.save_checkpoint(self, ckpt_root, step, data)
            self._check_deferred()  # the data ran out
        finally:  # a stopped run ends its progress line, so an error prints on a line of its own
            bar.close()
            for st in self.sites.values():
                st.workspace.clear()
        if run is not None:
            run.finish()
        if self.rank == 0:
            self._warn_dense()
        self.steps_ = step
        self.scales_ = {name: st.scale for name, st in self.sites.items()}
        for st in self.sites.values():
            fold = getattr(st.sae, "fold_input_scale", None)
            fold(st.scale) if fold is not None else fold_input_scale(st.sae, st.scale)
        self.saes_ = {name: st.sae for name, st in self.sites.items()}
        if self.out_dir is not None and self.rank == 0:
            run_folder.export(self)
        ddp.barrier()
        return self

    def _stop_line(self) -> str:
        kept = (f"the last good resume checkpoint, step {self._last_saved}, is kept" if self._last_saved is not None
                else "no resume checkpoint was written before it")
        return f"lower lr (now {self.cfg.lr if self.cfg.lr is not None else 'the default'}); {kept}"

    def _check_diverged(self, step: int, logs: dict[str, dict[str, torch.Tensor]]) -> None:
        """Stop a run whose reconstruction has blown up: finite losses can still diverge (FVU 2e9 after an lr of
        100), and such an SAE would otherwise be saved and exported as if trained. Off with the guard
        (``nonfinite_guard="off"``)."""
        if self.cfg.nonfinite_guard == "off":
            return
        for name, m in logs.items():
            st = self.sites[name]
            fvu, zero = float(m.get("fvu", 0.0)), float(st.fvu_of_zero)
            if st.first_fvu is None and math.isfinite(fvu):
                st.first_fvu = fvu
            ref = max(zero, st.first_fvu or 0.0, 1.0)
            if not math.isfinite(fvu) or fvu > DIVERGED_FVU * ref:
                raise TrainingDiverged(
                    f"training diverged at step {step} of {self.cfg.total_steps}: SAE {name or '(unnamed)'!r} has "
                    f"FVU {fvu:.3g} on its batch, over {DIVERGED_FVU:g} x {ref:.3g} (the larger of its first logged "
                    f"FVU, {st.first_fvu if st.first_fvu is not None else float('nan'):.3g}, and that of outputting "
                    f"zeros, {zero:.3g}); " + self._stop_line())

    def _check_state_finite(self, step: int) -> None:
        """Refuse to write a resume checkpoint whose weights or Adam moments are not finite (squared gradients can
        overflow to inf while the loss and gradients stay finite): a resume would carry them on. Off with the guard
        (``nonfinite_guard="off"``)."""
        if self.cfg.nonfinite_guard == "off":
            return
        for name, st in self.sites.items():
            tensors = [("weights", p) for p in st.sae.parameters()] + [
                ("Adam moments", v) for s in st.opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
            finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()  # one read back
            bad = sorted({what for (what, _), ok in zip(tensors, finite) if not ok})
            if bad:
                raise TrainingDiverged(f"training diverged by step {step}: SAE {name or '(unnamed)'!r} holds NaN or "
                                       f"inf in its {' and '.join(bad)}, so no checkpoint was written; "
                                       + self._stop_line())

    def final_metrics(self, name: str) -> dict[str, float]:
        """The metrics last logged for the SAE named ``name`` (empty before the first log)."""
        logged = [e for e in self.history_ if "event" not in e]
        return logged[-1].get(name, {}) if logged else {}

    def _warn_dense(self) -> None:
        """A :class:`DenseCodesWarning` for each SAE whose last logged L0 is above ``d_model / 2``."""
        for name, st in self.sites.items():
            l0 = self.final_metrics(name).get("l0")
            d = st.sae.cfg.d_model
            if l0 is not None and l0 > d / 2:
                knob = st.sae.sparsity_setting
                warnings.warn(DenseCodesWarning(
                    f"SAE {name or type(st.sae).__name__!r} ended training with L0 {l0:.0f} (active latents per row, "
                    f"of {st.sae.cfg.d_sae}) above d_model / 2 = {d / 2:g}: no dictionary of {d}-dimensional atoms "
                    "gives such codes uniquely (a sparse code is unique only below half the dictionary's spark, at "
                    f"most (d_model + 1) / 2); {knob + ', ' if knob else ''}train on more tokens, or use a TopK SAE"),
                    stacklevel=precision.outside_stacklevel(sys._getframe()))

    def _log(self, step: int, logs: dict[str, dict[str, torch.Tensor]], bar, run) -> None:
        self.history_.append({"step": step, "tokens": self.tokens_,
                              **{k: {m: float(v) for m, v in d.items()} for k, d in logs.items()}})
        first = next(iter(logs.values()))
        bar.set_postfix({k: f"{float(first[k]):.4g}" for k in ("loss", "l0", "fvu", "dead")})
        if run is not None:
            run.log({f"{s}/{m}": float(v) for s, d in logs.items() for m, v in d.items()}, step=step)

    def _step(self, name: str, st: SiteState, batch: torch.Tensor, step: int, autocast) -> dict[str, torch.Tensor]:
        sae, cfg = st.sae, self.cfg
        x = to_device(ddp.local_rows(batch, self.rank, self.world), sae.device, sae.dtype) * st.scale
        # no latent can be dead before since_fired may reach dead_tokens: the step then reads nothing about them
        dead = st.since_fired >= cfg.dead_tokens if st.since_bound >= cfg.dead_tokens else None
        if st.grads is not None:
            st.grads.clear()  # nothing of a step that was not applied
        state = TrainState(step=step, total_steps=cfg.total_steps, dead_mask=dead,
                           global_rows=cfg.batch_tokens, allsum=ddp.allsum, world_size=self.world,
                           workspace=st.workspace, grads=st.grads)
        with st.own_rng(), autocast:
            out = sae.training_loss(x, state)
        out.loss.backward()
        ddp.allsum_grads(sae.parameters())
        checked = sae.parameters() if cfg.nonfinite_guard == "grads" else None
        if st.deferred is not None:
            st.deferred.record(step, out.loss, checked, batch, st.opt.param_groups[0]["lr"])
        elif cfg.nonfinite_guard != "off" and not (guard.finite(out.loss, checked) and (
                checked is None or st.grads is None or st.grads.finite())):
            raise self._nonfinite(name, step, out.loss, batch, st.opt.param_groups[0]["lr"])
        norm = getattr(sae, "normalize_decoder", False)
        # projection, Adam and renorm in one kernel (which does not take the deferred flag); with the gradient made
        # in that pass where it was kept sparse
        one_pass = norm and st.deferred is None and (optim.unit_rows_applies(st.opt, sae.W_dec)
                                                     or (st.grads is not None and st.grads.holds(sae.W_dec)))
        if norm and not one_pass:
            remove_parallel_grad(sae.W_dec, unit_rows=step > 0)  # normalize_rows ran after every earlier step
        st.opt.step(unit_rows={sae.W_dec: step > 0} if one_pass else None, sparse=st.grads)
        if st.grads:
            left = [n for n, p in sae.named_parameters() if st.grads.holds(p)] or ["a tensor that is no parameter"]
            st.grads.clear()
            raise SAEError(f"the optimizer left the sparse gradients of {', '.join(left)} unapplied; an SAE may only "
                           "keep the gradients of parameters its optimizer holds (saes.sparse_grads)")
        st.sched.step()
        st.opt.zero_grad(set_to_none=True)
        if norm and not one_pass:
            normalize_rows(sae.W_dec, keep=st.deferred.flag if st.deferred is not None else None)
        after = getattr(sae, "after_step", None)
        if after is not None:
            with st.own_rng():
                after(state)
        fired = out.fired if self.world == 1 else ddp.allsum(out.fired.to(torch.int32)) > 0
        st.since_fired += cfg.batch_tokens
        st.since_bound += cfg.batch_tokens
        st.since_fired.masked_fill_(fired, 0)
        if (step + 1) % cfg.log_every and step + 1 != cfg.total_steps:
            return {}
        sq = ddp.allsum((out.x_hat.detach().float() - x.float()).pow(2).sum().reshape(1))
        terms = {k: ddp.allsum(v.detach().float().reshape(1)).squeeze(0) for k, v in out.terms.items()}
        tv = total_variance(x, state)
        st.fvu_of_zero = ddp.allsum(x.float().pow(2).sum().reshape(1)).squeeze(0) / tv  # for _check_diverged
        return {**terms, "loss": ddp.allsum(out.loss.detach().reshape(1)).squeeze(0),
                "fvu": (sq.squeeze(0) / tv),
                "l0": ddp.allsum(out.l0.detach().float().reshape(1)).squeeze(0) / self.world,
                "dead": (st.since_fired >= cfg.dead_tokens).float().mean()}

    def _wandb(self):
        if not self.cfg.wandb_project or self.rank != 0:
            return None
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb_project is set but wandb is not installed; not logging", stacklevel=3)
            return None
        return wandb.init(project=self.cfg.wandb_project, config=run_folder.jsonable(self.cfg))


DIVERGED_FVU = 10.0
"""A logged FVU above this many times the larger of the run's first logged FVU, that of outputting zeros and 1 stops
the run as diverged."""


class TrainingDiverged(SAEError):
    """The reconstruction blew up (FVU far above that of outputting zeros), or the weights or Adam's moments hold
    NaN or inf at a checkpoint, while every loss and gradient stayed finite. Not checked with
    ``TrainConfig.nonfinite_guard="off"``."""


class DenseCodesWarning(UserWarning):
    """A trained SAE whose codes are not sparse: L0 above ``d_model / 2`` at the end of training."""


def to_device(rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` on ``device`` in ``dtype``. From CPU memory to a CUDA device through a page-locked copy and a
    transfer the host does not wait for: torch's copy from ordinary (pageable) memory waits until the device has
    run everything queued before it (:mod:`saes.hostsync`), once a step for a data source on the CPU."""
    if rows.device.type == "cpu" and torch.device(device).type == "cuda":
        rows = rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device, dtype)


def _site_map(saes: dict[str, SAE], sites: str | dict[str, str] | None) -> dict[str, str]:
    """``{name: site}``: the site each SAE reads."""
    if sites is None:
        return {name: name for name in saes}
    if isinstance(sites, str):
        return {name: sites for name in saes}
    if not isinstance(sites, dict) or not all(isinstance(v, str) for v in sites.values()):
        raise SAEError(f"Trainer(sites=...) takes a site name or a dict {{name: site}}, got {sites!r}")
    missing, extra = [n for n in saes if n not in sites], [n for n in sites if n not in saes]
    if missing or extra:
        raise SAEError(f"Trainer(sites=...) must name the site of every SAE and nothing else: no site for {missing}, "
                       f"sites for names that have no SAE {extra}; the SAEs are named {list(saes)}")
    return {name: sites[name] for name in saes}
