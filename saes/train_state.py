"""What the trainer (:mod:`saes.trainer`) keeps for each SAE it trains: its optimizer and schedule, its input
scale and dead-latent counters, its scratch buffers, its non-finite flag where the guard defers its reads, and its
own random-number streams.

Every SAE draws its random numbers (atom dropout, data-row picks ...) from its own torch RNG stream, seeded with
``TrainConfig.seed``: :meth:`SiteState.own_rng` swaps that stream in around the SAE's work, so SAEs trained
together from one data stream come out exactly as each would trained alone on the same batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from saes import guard
from saes.base import SAE
from saes.sparse_grads import SparseGrads


@dataclass
class SiteState:
    """One SAE's training state (checkpointed by :func:`saes.resume.pack_sites`)."""

    sae: SAE
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    since_fired: torch.Tensor
    """``[d_sae]`` rows since each latent last fired."""
    scale: float = 1.0
    rng: torch.Tensor | None = None
    """This SAE's own CPU RNG state (swapped in around its steps)."""
    device_rng: torch.Tensor | None = None
    """Its RNG state on its accelerator (None on CPU)."""
    workspace: dict = dataclasses.field(default_factory=dict)
    """Scratch buffers its ``training_loss`` reuses from step to step (emptied when ``fit`` ends)."""
    since_bound: int = 0
    """An upper bound of ``since_fired`` known to the host: while it is under ``dead_tokens`` no latent can be
    dead, and the step reads nothing about dead latents from the device."""
    deferred: guard.Deferred | None = None
    """The non-finite flag kept on the device (:class:`saes.guard.Deferred`), where the guard defers its reads."""
    grads: SparseGrads | None = None
    """Where the sparse backwards leave the weight gradients for the optimizer to make as it steps
    (:mod:`saes.sparse_grads`), where it applies."""
    fvu_of_zero: torch.Tensor | float = 1.0
    """FVU of outputting zeros on the last logged batch (``E||x||^2`` over its total variance): the trainer's
    divergence check compares the logged FVU with it."""
    first_fvu: float | None = None
    """The first FVU this run logged (a ReLU or JumpReLU SAE starts far above that of zeros: 15.7 against 2.05
    at 9,216 latents on the embedded model's layer 12), the divergence check's other reference."""

    def seed_rng(self) -> None:
        """Start this SAE's own RNG stream at the current global state (right after ``manual_seed(cfg.seed)``,
        or the state a resume checkpoint restored)."""
        self.rng = torch.get_rng_state()
        mod = _rng_module(self.sae.device)
        self.device_rng = mod.get_rng_state(self.sae.device) if mod is not None else None

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Run the block on this SAE's own RNG stream; the global stream is left as it was."""
        dev = self.sae.device
        mod = _rng_module(dev)
        with torch.random.fork_rng(devices=[dev] if mod is not None else [], device_type=dev.type if mod else "cuda"):
            torch.set_rng_state(self.rng)
            if mod is not None:
                mod.set_rng_state(self.device_rng, dev)
            yield
            self.rng = torch.get_rng_state()
            if mod is not None:
                self.device_rng = mod.get_rng_state(dev)


def _rng_module(device: torch.device):
    """``torch.cuda`` (or the module of another accelerator) for ``device``; None on CPU."""
    return None if device.type == "cpu" else getattr(torch, device.type)
