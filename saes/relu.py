"""Standard ReLU SAE with an L1 penalty weighted by decoder-row norms (Anthropic, April 2024
update): the decoder is free to grow, and ``|z_i| * ||W_dec_i||`` is what the penalty sees, so
shrinking codes while growing rows does not cheat the penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from saes.base import SAE, SAEError, UntiedSAEConfig, register
from saes.losses import TrainState, TrainStep, active_mask, fvu_loss, rows_of_batch, warmup_coeff

DEC_INIT_NORM = 0.1
"""Default :attr:`ReluConfig.dec_init_norm`. Unit rows started ReLU far above outputting zeros (FVU 15.7 against
2.05 at 9,216 latents on layer 12): every latent the input's sign lets through adds a whole unit row. Measured on
the embedded model (9,216 latents, 400 steps of 1,024 rows, the default rate and ``l1_coeff`` 5e-3; held-out FVU
at held-out L0): layer 12, norm 1 0.339 at 171, norm 0.1 0.192 at 222 (at ``l1_coeff`` 1e-2 0.273 at 90, 2e-2 0.414
at 40: about 0.22 at L0 171 between them); layer 20 (the check): norm 1 0.368 at 219, norm 0.1 0.212 at 258 (at
``l1_coeff`` 1e-2 0.301 at 113). ``experiments/sae_sparsity_defaults.md``, round 3. SAELens' standard SAE starts
its decoder rows at 0.1 too (``decoder_init_norm``)."""


@dataclass(frozen=True, kw_only=True)
class ReluConfig(UntiedSAEConfig):
    """Config of :class:`ReluSAE`."""

    l1_coeff: float = 5e-3
    """Weight of ``mean_rows sum_i |z_i| ||W_dec_i||`` (inputs normalised to mean squared norm
    ``d_model`` by the trainer), added to the FVU reconstruction loss. At the SAE's default learning rate, the
    smallest of 5e-4, 5e-3 and 1e-2 whose codes ended 400 steps below ``d_model / 2`` active latents per row on
    layer 12 of the embedded model (5e-4: 1,400 of 9,216; 5e-3: 160, FVU 0.348; 1e-2: 24, FVU 0.676;
    ``experiments/sae_sparsity_defaults.md``), with decoder rows starting at norm 1; at the new
    :data:`DEC_INIT_NORM` 0.1, 5e-3 ends at L0 222 with FVU 0.192 (1e-2: 90, 0.273)."""
    l1_warmup_steps: int = 0
    """Steps over which the L1 weight ramps up from 0."""
    dec_init_norm: float = DEC_INIT_NORM
    """Norm of each decoder row at initialisation; the encoder starts as ``enc_init_scale`` x the decoder's
    transpose, scaled by the same factor (:data:`DEC_INIT_NORM`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l1_coeff >= 0:
            raise SAEError(f"{type(self).__name__}.l1_coeff must be >= 0, got {self.l1_coeff!r}")
        v = self.dec_init_norm
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise SAEError(f"{type(self).__name__}.dec_init_norm must be a finite number > 0, got {v!r}")
        if not isinstance(self.l1_warmup_steps, int) or self.l1_warmup_steps < 0:
            raise SAEError(f"{type(self).__name__}.l1_warmup_steps must be an integer >= 0, "
                           f"got {self.l1_warmup_steps!r}")


@register("relu")
class ReluSAE(SAE):
    """``codes = ReLU(W_enc^T (x - b_dec) + b_enc)``."""

    config_class = ReluConfig
    normalize_decoder = False
    sparsity_setting = "raise l1_coeff"
    cfg: ReluConfig

    def reset_parameters(self) -> None:
        """The base initialisation (unit decoder rows, the encoder their transpose x ``enc_init_scale``), both
        scaled by ``cfg.dec_init_norm``."""
        super().reset_parameters()
        with torch.no_grad():
            self.W_dec.mul_(self.cfg.dec_init_norm)
            self.W_enc.mul_(self.cfg.dec_init_norm)

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return pre.relu()

    def training_loss(self, x: Float[Tensor, "batch d_model"], state: TrainState) -> TrainStep:
        out = self(x)
        mse, _ = fvu_loss(x, out.x_hat, state)
        l1 = (out.codes.abs() * self.W_dec.norm(dim=1)).sum() / rows_of_batch(x, state)
        coeff = warmup_coeff(self.cfg.l1_coeff, self.cfg.l1_warmup_steps, state)
        l0, fired = active_mask(out.codes)
        return TrainStep(mse + coeff * l1, out.x_hat, l0, fired, {"fvu": mse.detach(), "l1": l1.detach()})
