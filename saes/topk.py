"""TopK SAE (Gao et al. 2024): keep the ``k`` largest pre-activations per row, then ReLU.

Training uses the sparse kernels of :mod:`saes.kernels` (no dense ``[batch, d_sae]`` gradient)
and the AuxK loss on dead latents. Decoder rows are kept at unit norm by the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saes.base import SAE, SAEError, UntiedSAEConfig, register
from saes.kernels import gather_pre, sparse_decode, sparse_fvu, sparse_fvu_applies, topk_forward
from saes.losses import TrainState, TrainStep, active_mask, auxk_loss, fvu_loss, total_variance


@dataclass(frozen=True, kw_only=True)
class TopKConfig(UntiedSAEConfig):
    """Config of :class:`TopKSAE`."""

    k: int = 32
    """Active latents per row: each row keeps its ``k`` largest pre-activations (at most ``k`` nonzero
    after the ReLU)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss (None: ``d_model // 2``, as in Gao et al.)."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss."""
    sparse_kernels: bool = True
    """Train with the sparse gather/scatter kernels (False: plain dense autograd, for checking)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
            raise SAEError(f"{type(self).__name__}.k must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or self.k_aux < 1):
            raise SAEError(f"{type(self).__name__}.k_aux must be a positive integer or None, got {self.k_aux!r}")
        if not self.aux_coeff >= 0:
            raise SAEError(f"{type(self).__name__}.aux_coeff must be >= 0, got {self.aux_coeff!r}")

    @property
    def k_aux_(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_model // 2)


def _topk_dense(pre: Tensor, k: int) -> Tensor:
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


@register("topk")
class TopKSAE(SAE):
    """``codes = ReLU(TopK(W_enc^T (x - b_dec) + b_enc))``."""

    config_class = TopKConfig
    sparsity_setting = "lower k"
    normalize_decoder = True
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        # W_enc [d_model, d_sae] is stored as the transpose of a contiguous [d_sae, d_model] block:
        # the sparse backward produces its gradient in that layout, so no transposing copy is
        # needed each step (the forward matmul reads either layout at the same speed).
        self.W_enc = nn.Parameter(self.W_enc.detach().T.contiguous().T)

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return _topk_dense(pre, self.cfg.k)

    def encode_sparse(self, x: Float[Tensor, "batch d_model"]) -> Tensor:
        """``encode(x)`` as a sparse COO tensor, from the top-k indices (no dense ``[batch, d_sae]`` codes)."""
        if x.dim() != 2:
            raise SAEError(f"encode_sparse expects [batch, d_model={self.cfg.d_model}] input, got {tuple(x.shape)}")
        pre = self.encode_pre(x)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)  # as activation(): the same latents, same values
        idx, order = idx.sort(dim=-1)  # each row's latents ascending: the entries come out coalesced
        vals = vals.gather(-1, order).relu()
        rows = torch.arange(pre.shape[0], device=pre.device)[:, None].expand_as(idx)
        fired = vals != 0
        return torch.sparse_coo_tensor(torch.stack([rows[fired], idx[fired]]), vals[fired], tuple(pre.shape),
                                       is_coalesced=True, check_invariants=False)  # valid by construction

    def training_loss(self, x: Float[Tensor, "batch d_model"], state: TrainState) -> TrainStep:
        self._check_input(x)
        center = self.cfg.apply_b_dec_to_input
        b_dec = self.b_dec if center else None
        mse = tv = None
        if self.cfg.sparse_kernels:
            x = x.to(self.dtype)
            # before the encoder, whose [batch, d_sae] product leaves x in no cache: x is read here while it is in one
            tv = total_variance(x, state)
            idx, vals, pre, xc = topk_forward(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, center=center,
                                              workspace=state.workspace, sink=state.grads)
            if sparse_fvu_applies(idx, self.W_dec, x):  # the decode and its loss in one (x_hat comes back detached)
                mse, x_hat = sparse_fvu(idx, vals, self.W_dec, self.b_dec, x, tv, state.grads)
            else:
                x_hat = sparse_decode(idx, vals, self.W_dec, self.b_dec, state.grads)
            active = vals > 0
            # the latents of the active entries, with no boolean-mask selection (no read back to the host on a GPU):
            # the inactive ones point at a spare last slot
            fired = torch.zeros(self.cfg.d_sae + 1, dtype=torch.bool, device=x.device)
            fired = fired.index_fill_(0, torch.where(active, idx, self.cfg.d_sae).reshape(-1), True)[:-1]
            l0 = active.sum(dtype=torch.float32) / active.shape[0]

            def gather(i: Tensor) -> Tensor:
                return gather_pre(pre, i, xc, self.W_enc, self.b_enc, b_dec, state.grads)
        else:
            out = self(x)
            x_hat, pre = out.x_hat, out.pre_acts
            l0, fired = active_mask(out.codes)

            def gather(i: Tensor) -> Tensor:
                return pre.gather(1, i)
        if mse is None:
            mse, _ = fvu_loss(x, x_hat, state, tv)
        aux = auxk_loss(x, x_hat, pre, gather, self.W_dec, state, self.cfg.k_aux_)
        loss = mse + self.cfg.aux_coeff * aux
        return TrainStep(loss, x_hat, l0, fired, {"fvu": mse.detach(), "auxk": aux.detach()})
