"""The trainer's non-finite guard: one NaN row must not silently turn the weights into NaN.

Every step, before the optimizer applies anything, the trainer checks that the loss is finite
(``TrainConfig.nonfinite_guard="loss"``, the default), or the loss and every gradient (``"grads"``);
``"off"`` skips the check. Under ``torch.distributed`` the processes agree on the outcome, so all of them
stop together.

On the first non-finite value the step is not applied and :class:`NonFiniteError` is raised, naming
the step, the rows of that batch that held NaN or inf inputs (or saying that none did, so the run
diverged), and the last good resume checkpoint, which is kept as it was.

On the CPU the check is one reduction and one read of its result per site and step (its cost is measured by
``benchmarks/sae_train.py``). Off the CPU, reading the result every step would stall the host
(:mod:`saes.hostsync`), so where the optimizer can skip a step on the device (torch's fused Adam takes a
``found_inf`` flag, as for mixed-precision loss scaling) the trainer keeps the outcome there (:class:`Deferred`):
a flag that, once set, stays set, so that the bad step and every step after it are not applied, and reads it
every :data:`DEFERRED_STEPS` steps, before every log, checkpoint and at the end. The error then names the first
bad step as above, and says how many steps ran unapplied after it; the weights and the checkpoints are those
of the last good step, as with a check every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from saes import distributed as ddp
from saes.base import SAEError

GUARDS = ("loss", "grads", "off")
"""Values of ``TrainConfig.nonfinite_guard``."""


class NonFiniteError(SAEError):
    """The loss (or a gradient) of a training step is NaN or infinite; the step was not applied."""


DEFERRED_STEPS = 8
"""Steps between two reads of a :class:`Deferred` flag (at most; logs, checkpoints and the end read it too)."""


def nonfinite(loss: Tensor, params: Iterable[torch.nn.Parameter] | None) -> Tensor:
    """A boolean scalar on the loss's device, not read back: whether `loss` (and, when `params` is given, a
    gradient) is NaN or infinite on some process."""
    ok = torch.isfinite(loss.detach()).all()
    if params is not None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            ok = ok & torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return ddp.allsum((~ok).to(torch.int32).reshape(1)).squeeze(0) > 0


def finite(loss: Tensor, params: Iterable[torch.nn.Parameter] | None) -> bool:
    """Whether `loss` (and, when `params` is given, every gradient) is finite on every process."""
    return not bool(nonfinite(loss, params).item())


class Deferred:
    """One SAE's non-finite flag kept on its device, read back every few steps (see the module docstring).

    ``flag`` is a float32 scalar (0 or 1) that the trainer hands its fused Adam as ``found_inf``: from the first
    bad step on, it stays 1 and no step is applied. :meth:`record` adds a step (its outcome, loss, batch and
    learning rate, kept until the next :meth:`first_bad`: the batches of at most :data:`DEFERRED_STEPS` steps)."""

    def __init__(self, device: torch.device):
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self.pending: list[tuple[int, Tensor, Tensor, Tensor, float]] = []

    def record(self, step: int, loss: Tensor, params: Iterable[torch.nn.Parameter] | None, batch: Tensor,
               lr: float) -> None:
        bad = nonfinite(loss, params)
        torch.maximum(self.flag, bad.to(self.flag.dtype), out=self.flag)
        self.pending.append((step, bad, loss.detach(), batch, lr))

    @property
    def due(self) -> bool:
        return len(self.pending) >= DEFERRED_STEPS

    def first_bad(self) -> tuple[int, Tensor, Tensor, float, int] | None:
        """``(step, loss, batch, lr, steps run after it)`` of the first bad step since the last call, or None:
        one read back for all of them. Forgets them."""
        if not self.pending:
            return None
        pending, self.pending = self.pending, []
        bad = torch.stack([b for _, b, *_ in pending]).tolist()
        for i, (step, _, loss, batch, lr) in enumerate(pending):
            if bad[i]:
                return step, loss, batch, lr, len(pending) - 1 - i
        return None


def bad_rows(x: Tensor, limit: int = 10) -> tuple[list[int], int]:
    """The first `limit` indices of rows of `x` ``[rows, d]`` holding NaN or inf, or values so large that the row's
    squared norm overflows float32 (a finite 1e20 does), and how many there are."""
    flat = x.reshape(x.shape[0], -1)
    rows = ((~torch.isfinite(flat)).any(-1) | ~torch.isfinite(flat.float().pow(2).sum(-1))).nonzero().flatten()
    return rows[:limit].tolist(), int(rows.numel())


def error(*, site: str, step: int, total_steps: int, loss: Tensor, batch: Tensor, lr: float,
          checkpoints: Path | None, last_good: int | None, unapplied_after: int = 0,
          bf16: bool = False) -> NonFiniteError:
    """The one-line error for a non-finite step (`step` counts from 0; the message counts from 1).
    ``unapplied_after``: steps that ran after it, not applied either, before the check (:class:`Deferred`)."""
    value = float(loss.detach().float())
    what = f"the loss is {value}" if not torch.isfinite(loss.detach()).all() else "a gradient is NaN or infinite"
    where = f"site {site!r}: " if site else ""
    rows, n_bad = bad_rows(batch)
    if n_bad:
        more = f" (and {n_bad - len(rows)} more)" if n_bad > len(rows) else ""
        cause = (f"rows {rows}{more} of this batch of {batch.shape[0]} (batch {step + 1} of the data) hold NaN or "
                 "inf inputs, or values so large that their squares overflow: filter or fix them in the data source")
    else:
        cause = (f"no input row of this batch is NaN, inf or overflowing, so the training diverged: lower lr (now "
                 f"{lr:.3g})" + (", or turn bf16 off" if bf16 else ""))
    if checkpoints is None:
        kept = "nothing was saved (no out_dir)"
    elif last_good is None:
        kept = f"no resume checkpoint was written yet under {checkpoints} (set checkpoint_every to keep some)"
    else:
        kept = (f"the last good resume checkpoint, step {last_good} under {checkpoints}, is kept: fix the data and "
                "resume from it")
    after = (f" (nor the {unapplied_after} step{'s' if unapplied_after > 1 else ''} after it, run before the "
             "check)" if unapplied_after else "")
    return NonFiniteError(f"training stopped at step {step + 1} of {total_steps}: {where}{what}; {cause}. "
                          f"The step was not applied{after}; {kept}")
