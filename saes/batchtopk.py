"""BatchTopK SAE (Bussmann et al. 2024): keep the ``k * batch`` largest activations of the whole
batch while training; at inference a single global threshold, tracked during training as a running
mean of the smallest kept activation, replaces the batch-level choice (so L0 averages ``k``).

Under data-parallel training each process picks the top ``k * rows`` of its own share of the batch
(the threshold is averaged over processes), so two processes are not bit-for-bit one process."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from saes.base import SAE, SAEError, UntiedSAEConfig, register
from saes.losses import TrainState, TrainStep, active_mask, auxk_loss, fvu_loss


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(UntiedSAEConfig):
    """Config of :class:`BatchTopKSAE`."""

    k: int = 32
    """Active latents per row *on average over the batch*: training keeps the ``k * batch`` largest
    activations of the whole batch, so one row may hold more or fewer than ``k``; at inference the
    learned threshold keeps about ``k`` per row on average (TopK's ``k`` holds for every row)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss (None: ``d_model // 2``)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss."""
    threshold_momentum: float = 0.01
    """Weight of each batch's smallest kept activation in the running threshold."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise SAEError(f"{type(self).__name__}.k must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or self.k_aux < 1):
            raise SAEError(f"{type(self).__name__}.k_aux must be a positive integer or None, got {self.k_aux!r}")
        if not 0 < self.threshold_momentum <= 1:
            raise SAEError(f"{type(self).__name__}.threshold_momentum must be in (0, 1], "
                           f"got {self.threshold_momentum!r}")


@register("batchtopk")
class BatchTopKSAE(SAE):
    """``codes = pre * (pre > threshold)`` at inference; batch-level top-k while training."""

    config_class = BatchTopKConfig
    sparsity_setting = "lower k"
    normalize_decoder = True
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # -1 means "not set yet" (the first training batch sets it); inference clamps it at 0
        self.register_buffer("threshold", torch.full((), -1.0))

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return pre * (pre > self.threshold.clamp_min(0))

    def batch_topk(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        """The training-time nonlinearity: the ``k * batch`` largest positive values of the batch."""
        flat = pre.relu().reshape(-1)
        n = min(self.cfg.k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)

    def training_loss(self, x: Float[Tensor, "batch d_model"], state: TrainState) -> TrainStep:
        self._check_input(x)
        pre = self.encode_pre(x)
        codes = self.batch_topk(pre)
        x_hat = self.decode(codes)
        self._update_threshold(codes, state)
        l0, fired = active_mask(codes)
        mse, _ = fvu_loss(x, x_hat, state)
        aux = auxk_loss(x, x_hat, pre.detach(), lambda i: pre.gather(1, i), self.W_dec, state,
                        self.cfg.k_aux if self.cfg.k_aux is not None else max(1, self.cfg.d_model // 2))
        loss = mse + self.cfg.aux_coeff * aux
        return TrainStep(loss, x_hat, l0, fired, {"fvu": mse.detach(), "auxk": aux.detach()})

    @torch.no_grad()
    def _update_threshold(self, codes: Tensor, state: TrainState) -> None:
        """The running threshold, updated on the device with nothing read back to the host (see
        :mod:`saes.hostsync`): the smallest positive code of the batch (0 where none is), averaged over
        processes; the first batch sets it, later ones move it by ``threshold_momentum``."""
        pos = codes > 0
        low = torch.where(pos, codes, torch.full((), torch.inf, dtype=codes.dtype, device=codes.device)).amin()
        low = torch.where(pos.any(), low, torch.zeros_like(low)).float()
        low = state.allsum(low.reshape(1)).squeeze(0) / state.world_size
        m = self.cfg.threshold_momentum
        self.threshold.copy_(torch.where(self.threshold < 0, low, self.threshold * (1 - m) + m * low))
