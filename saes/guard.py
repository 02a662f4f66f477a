"""The trainer's non-finite guard: one NaN row must not silently turn the weights into NaN.

Every step, before the optimizer applies anything, the trainer checks that the loss is finite
(``TrainConfig.nonfinite_guard="loss"``, the default), or the loss and every gradient (``"grads"``);
``"off"`` skips the check. The check is one reduction and one host synchronisation per site and step
(its cost is measured by ``benchmarks/sae_train.py``). Under ``torch.distributed`` the processes agree
on the outcome, so all of them stop together.

On the first non-finite value the step is not applied and :class:`NonFiniteError` is raised, naming
the step, the rows of that batch that held NaN or inf inputs (or saying that none did, so the run
diverged), and the last good resume checkpoint, which is kept as it was.
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


def finite(loss: Tensor, params: Iterable[torch.nn.Parameter] | None) -> bool:
    """Whether `loss` (and, when `params` is given, every gradient) is finite on every process."""
    ok = torch.isfinite(loss.detach()).all()
    if params is not None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            ok = ok & torch.stack([torch.isfinite(g).all() for g in grads]).all()
    bad = (~ok).to(torch.int32).reshape(1)
    return not bool(ddp.allsum(bad).item())


def bad_rows(x: Tensor, limit: int = 10) -> tuple[list[int], int]:
    """The first `limit` indices of rows of `x` ``[rows, d]`` holding NaN or inf, and how many there are."""
    rows = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero().flatten()
    return rows[:limit].tolist(), int(rows.numel())


def error(*, site: str, step: int, total_steps: int, loss: Tensor, checked_grads: bool, batch: Tensor,
          lr: float, checkpoints: Path | None, last_good: int | None) -> NonFiniteError:
    """The one-line error for a non-finite step (`step` counts from 0; the message counts from 1)."""
    value = float(loss.detach().float())
    what = f"the loss is {value}" if not torch.isfinite(loss.detach()).all() else "a gradient is NaN or infinite"
    where = f"site {site!r}: " if site else ""
    rows, n_bad = bad_rows(batch)
    if n_bad:
        more = f" (and {n_bad - len(rows)} more)" if n_bad > len(rows) else ""
        cause = (f"rows {rows}{more} of this batch of {batch.shape[0]} (batch {step + 1} of the data) hold NaN or "
                 "inf inputs: filter or fix them in the data source")
    else:
        cause = (f"no input row of this batch is NaN or inf, so the training diverged: lower lr (now {lr:.3g})"
                 + ("" if checked_grads else ", or turn bf16 off"))
    if checkpoints is None:
        kept = "nothing was saved (no out_dir)"
    elif last_good is None:
        kept = f"no resume checkpoint was written yet under {checkpoints} (set checkpoint_every to keep some)"
    else:
        kept = (f"the last good resume checkpoint, step {last_good} under {checkpoints}, is kept: fix the data and "
                "resume from it")
    return NonFiniteError(f"training stopped at step {step + 1} of {total_steps}: {where}{what}; {cause}. "
                          f"The step was not applied; {kept}")
