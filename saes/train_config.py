"""The hyper-parameters of an SAE training run (:class:`TrainConfig`): what :class:`saes.Trainer` trains
with, checked when built, and the learning-rate schedule they define."""

from __future__ import annotations

import math
from dataclasses import dataclass

from saes import guard
from saes.base import SAEError

B_DEC_INITS = ("typical_mean", "geometric_median", "mean", "zeros")
"""The values of :attr:`TrainConfig.b_dec_init`."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of a training run (shared by every site)."""

    total_tokens: int
    """Activation rows to train on (all processes together)."""
    batch_tokens: int = 4096
    """Rows per optimizer step (the global batch; each DDP process trains on its slice)."""
    lr: float | None = None
    """Adam learning rate (None: ``2e-4 / sqrt(d_sae / 16384)`` times the architecture's ``default_lr_factor``:
    4 for every architecture: chosen by held-out FVU for TopK in ``experiments/sae_lr_rule.py``, and measured for
    BatchTopK, ReLU, JumpReLU and MP-SAE in ``experiments/sae_sparsity_defaults.py``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_frac: float = 0.01
    """Fraction of steps with a linear learning-rate warm-up from 0: over its ``W = int(warmup_frac * steps)`` steps
    the rate is ``(i + 1) / (W + 1)`` of the base at the i-th of them."""
    decay_frac: float = 0.2
    """Fraction of steps at the end with a linear decay of the learning rate towards 0: over its ``D =
    int(decay_frac * steps)`` steps the rate is ``(D - i) / D`` of the base at the i-th of them, so the first runs
    at the full rate and the last at ``1 / D`` (0 would be reached one step after the run). With ``D`` of 1 or 0
    (runs shorter than ``2 / decay_frac`` steps) nothing decays."""
    b_dec_init: str = "typical_mean"
    """How ``b_dec`` starts, from the first batch: ``"typical_mean"`` (the mean of the rows that are not
    massive activations, :func:`saes.losses.typical_mean`; chosen over several seeds in
    ``experiments/sae_b_dec_init.md``), ``"geometric_median"``, ``"mean"`` (every row) or ``"zeros"``."""
    normalize_inputs: bool = True
    """Scale inputs so that ``E||x||^2 = d_model`` (estimated on the first batch's typical rows, massive
    activations left out: :func:`saes.losses.input_scale`; folded into the weights at the end)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many rows without firing (AuxK uses the dead ones)."""
    bf16: bool = False
    """Run the SAE forward under bf16 autocast (weights and Adam stay fp32; an MP-SAE also runs its
    pursuit's selection in bf16, see ``MPSAEConfig.pursuit_dtype``)."""
    checkpoint_every: int = 0
    """Write a resume checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Resume checkpoints kept on disk."""
    log_every: int = 20
    """Steps between progress-bar / wandb updates and history entries."""
    wandb_project: str | None = None
    """Log to this wandb project when wandb is installed."""
    seed: int = 0
    """Seed of the torch and python RNGs at the start of the run."""
    progress: bool = True
    """Show a progress bar."""
    nonfinite_guard: str = "loss"
    """Check every step before applying it: ``"loss"`` (the loss is finite), ``"grads"`` (the loss and
    every gradient), ``"off"``. A non-finite value stops the run with :class:`saes.guard.NonFiniteError`
    naming the step and the input rows that were NaN or inf; the last resume checkpoint is kept."""

    def __post_init__(self) -> None:
        for name in ("total_tokens", "batch_tokens", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SAEError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        for name in ("checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise SAEError(f"TrainConfig.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.dead_tokens, int) or isinstance(self.dead_tokens, bool) or self.dead_tokens < 1:
            # 0 would count every latent dead at every step: AuxK on all of them and a logged dead fraction of 1
            raise SAEError(f"TrainConfig.dead_tokens must be a positive integer, got {self.dead_tokens!r}; to never "
                           "count a latent dead, give more than total_tokens")
        if self.lr is not None and not self.lr > 0:
            raise SAEError(f"TrainConfig.lr must be > 0 or None, got {self.lr!r}")
        for name in ("warmup_frac", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise SAEError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.warmup_frac + self.decay_frac > 1:
            raise SAEError("TrainConfig.warmup_frac + decay_frac must be <= 1, "
                           f"got {self.warmup_frac} + {self.decay_frac}")
        if self.b_dec_init not in B_DEC_INITS:
            raise SAEError(f"TrainConfig.b_dec_init must be one of {', '.join(map(repr, B_DEC_INITS))}, "
                           f"got {self.b_dec_init!r}")
        if self.nonfinite_guard not in guard.GUARDS:
            raise SAEError(f"TrainConfig.nonfinite_guard must be one of {guard.GUARDS}, got {self.nonfinite_guard!r}")

    def lr_for(self, sae) -> float:
        """The Adam learning rate of ``sae``: ``lr``, else :func:`default_lr` of its width times its
        architecture's ``default_lr_factor``."""
        if self.lr is not None:
            return self.lr
        return default_lr(sae.cfg.d_sae) * sae.default_lr_factor

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_tokens)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the learning rate at ``step`` (warm-up, constant, linear decay)."""
        n = self.total_steps
        warm, decay = int(self.warmup_frac * n), int(self.decay_frac * n)
        if step < warm:
            return (step + 1) / (warm + 1)
        if decay and step >= n - decay:
            return max(0.0, (n - step) / decay)
        return 1.0


def default_lr(d_sae: int) -> float:
    """The base of the trainer's default Adam learning rate for ``d_sae`` latents, ``2e-4 / sqrt(d_sae / 16384)``
    (sparsify's Adam rule); each architecture multiplies it by its ``default_lr_factor`` (4 for every one here)."""
    return 2e-4 / math.sqrt(d_sae / 16384)
