"""Matching-pursuit SAE (MP-SAE; Costa, Fel, Lubana, Tolooshams, Ba, "From Flat to Hierarchical:
Extracting Sparse Representations with Matching Pursuit").

The encoder is ``n_steps`` unrolled matching-pursuit steps over the decoder's unit-norm atoms (the
encoder is tied: ``W_enc`` is ``W_dec.T``): pick the atom most correlated with the residual, record
its coefficient, subtract its contribution, repeat. The algorithm lives in :mod:`saes.mp_pursuit`
(selection without autograd, coefficients recomputed with autograd from the chosen atoms only).

Training runs ``n_steps`` steps per row, or, with ``residual_fraction``, stops each row once its
residual norm has fallen to that fraction of its input's norm (the paper's residual-threshold
stopping rule, in a scale-free form) with ``n_steps`` as the cap. At inference the steps can be
changed without retraining: ``max_iterations`` sets the number of steps, and a row stops early when
its residual norm falls to ``residual_threshold`` (absolute) or to ``residual_fraction`` of its
input's norm, or (``stop_on_repeated_support``) when a step re-picks an atom it already uses.
:meth:`MPSAE.pursue` takes the same options per call and reports per-step residual norms and why
each row stopped; :func:`mp_metrics` turns that into L0 min / mean / max, the mean residual
norm per step and the fraction of rows stopped by each rule.

Atoms are kept at unit norm: the forward pass divides every row of ``W_dec`` by its norm (so a
step never grows the residual even between optimizer steps), and the trainer projects the rows back
to the sphere after every step (``normalize_decoder = True``).

Why a seed can get stuck, and the cure (on by default): an atom gets a gradient only when a pursuit
picks it, so an atom that never wins a selection stays where it started, and the features left to it
are represented by mixtures of the atoms that do win. ``resample_every`` moves atoms the trainer
counts as dead (``TrainConfig.dead_tokens``) to the residual directions of the rows reconstructed
worst, where a feature no atom represents shows up. ``atom_init="data"`` (start the atoms at centred
data rows) is the other remedy tried; it starts atoms as mixtures of features and is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp import precision
from interp.deprecation import renamed_fields
from saes import mp_pursuit
from saes.base import SAE, SAEConfig, SAEError, SaeOutput, register
from saes.losses import TrainState, TrainStep, auxk_loss, fvu_loss
from saes.mp_atoms import gather_rows, init_from_rows, resample_dead
from saes.mp_pursuit import STOP_REASONS, Coefficients, Selection, l0_per_row, mp_metrics

__all__ = ["MPSAE", "MPSAEConfig", "MpResult", "mp_metrics", "resample_dead", "STOP_REASONS"]


@renamed_fields({"k": "n_steps"}, error=SAEError)
@dataclass(frozen=True, kw_only=True)
class MPSAEConfig(SAEConfig):
    """Config of :class:`MPSAE`. ``k=`` is the deprecated name of ``n_steps`` (accepted, with a warning)."""

    n_steps: int = 32
    """Matching-pursuit steps per row in training (and at inference unless ``max_iterations`` is set).
    Each step adds one atom, so L0 is at most ``n_steps`` (lower when a step re-picks an atom)."""
    coefficients: Coefficients = "nonneg"
    """``"nonneg"``: pick the most positively correlated atom, coefficient ``ReLU(<r, a>)``;
    ``"signed"``: classic MP, pick the largest ``|<r, a>|``, signed coefficient;
    ``"signed_max"``: pick the largest ``<r, a>`` but keep its sign (overcomplete's ``MpSAE``)."""
    allow_repeat: bool = True
    """An atom may be picked again by a later step (its coefficients accumulate); False masks atoms
    already used by the row."""
    decoder_bias: bool = True
    """Learn ``b_dec`` (subtracted before the pursuit, added back after); False keeps it at zero."""
    max_iterations: int | None = None
    """Steps at inference (eval mode); None: ``n_steps``. Lets one trained SAE run at another sparsity."""
    residual_threshold: float = 0.0
    """At inference a row stops once its residual norm is <= this (checked before every step, in
    the units of the input); 0 disables the rule."""
    stop_on_repeated_support: bool = False
    """At inference a row stops after a step that picks an atom it already uses (that step's
    coefficient is still added). Never fires with ``allow_repeat=False``."""
    correlation_update: Literal["auto", "gram", "direct"] = "auto"
    """How the correlations follow the residual: ``"gram"`` ``c <- c - z * G[j]`` with the
    dictionary's Gram matrix, ``"direct"`` one ``[n, d_model] x [d_model, d_sae]`` product per step,
    ``"auto"`` whichever :func:`saes.mp_pursuit.use_gram` predicts is faster. Results are equal up to
    rounding."""
    train_gram_dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the Gram matrix built at every training step (the dictionary changes each step).
    ``"bfloat16"`` builds it several times faster where the CPU/GPU has bf16 matrix units; the
    choices may then differ from exact MP on near-ties, while the coefficients of the chosen atoms
    are still recomputed exactly. Inference always uses the working dtype."""
    pursuit_dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the pursuit's selection (the correlations with every atom, the Gram matrix and
    their updates), in training and at inference. ``"bfloat16"`` halves the bytes the selection reads
    and uses bf16 matrix units where the CPU/GPU has them; the choices may then differ from exact MP
    on near-ties, and the coefficients of the chosen atoms are recomputed in the working dtype (exact
    projections, so the residual never grows; a ``nonneg`` step whose exact coefficient is not
    positive is dropped). Inside a bf16 autocast region (``TrainConfig(bf16=True)``, or
    ``torch.autocast(device, dtype=torch.bfloat16)`` around ``encode``) the selection runs in bf16
    whatever this says. Residual-threshold stopping then reads bf16 norms (decisions near the
    threshold may differ; the reported norms are exact)."""
    atom_dropout: float = 0.0
    """Probability that an atom is left out of a training batch's pursuit (fights dead atoms early
    in training); 0 disables."""
    atom_dropout_steps: int = 0
    """Atom dropout applies during the first this-many optimizer steps only."""
    revive_coeff: float = 0.0
    """Weight of the revive term: dead atoms (per the trainer's ``dead_mask``) reconstruct the
    pursuit's final residual (AuxK on the residual); 0 disables."""
    revive_k: int = 64
    """Dead atoms used per row by the revive term."""
    residual_fraction: float = 0.0
    """Threshold-stopped pursuit, in training and at inference: a row stops once its residual norm
    is <= this fraction of its centred input's norm (checked before every step), after at most
    ``n_steps`` steps (``max_iterations`` at inference); 0 disables. A fraction, not an absolute norm,
    so the rule is the same before and after the trainer's input scaling, and for rows of any norm."""
    atom_init: Literal["random", "data"] = "random"
    """How the atoms start: ``"data"``, as the normalised centred rows of the first training batch
    (distinct rows, picked at random; the trainer calls :meth:`MPSAE.init_from_data`); ``"random"``,
    Gaussian directions (also what an SAE never trained holds)."""
    resample_every: int = 50
    """Every this many optimizer steps, atoms the trainer counts as dead (not picked for
    ``TrainConfig.dead_tokens`` rows) move to the residual directions of this batch's worst
    reconstructed rows (drawn with probability proportional to the squared residual norm); 0 never."""
    resample_until: float = 0.7
    """Resampling stops after this fraction of the training steps (atoms moved later would not train)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__

        def bad(field: str, want: str) -> SAEError:
            return SAEError(f"{name}.{field} must be {want}, got {getattr(self, field)!r}")

        def pos_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not pos_int(self.n_steps):
            raise bad("n_steps", "a positive integer (MP steps per row)")
        if not self.allow_repeat and self.n_steps > self.d_sae:
            raise bad("n_steps", f"<= d_sae={self.d_sae} when allow_repeat=False")
        if self.coefficients not in ("nonneg", "signed", "signed_max"):
            raise bad("coefficients", "one of 'nonneg', 'signed', 'signed_max'")
        if self.max_iterations is not None and not pos_int(self.max_iterations):
            raise bad("max_iterations", "a positive integer or None")
        if not isinstance(self.residual_threshold, (int, float)) or not self.residual_threshold >= 0:
            raise bad("residual_threshold", "a number >= 0")
        for field in ("train_gram_dtype", "pursuit_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16"):
                raise bad(field, "'float32' or 'bfloat16'")
        if self.correlation_update not in ("auto", "gram", "direct"):
            raise bad("correlation_update", "one of 'auto', 'gram', 'direct'")
        if not 0 <= self.atom_dropout < 1:
            raise bad("atom_dropout", "in [0, 1)")
        if not isinstance(self.atom_dropout_steps, int) or self.atom_dropout_steps < 0:
            raise bad("atom_dropout_steps", "an integer >= 0")
        if not self.revive_coeff >= 0:
            raise bad("revive_coeff", ">= 0")
        if not pos_int(self.revive_k):
            raise bad("revive_k", "a positive integer")
        if not isinstance(self.residual_fraction, (int, float)) or not 0 <= self.residual_fraction < 1:
            raise bad("residual_fraction", "a number in [0, 1) (0: run every step)")
        if self.atom_init not in ("random", "data"):
            raise bad("atom_init", "'random' or 'data'")
        if not isinstance(self.resample_every, int) or isinstance(self.resample_every, bool) or self.resample_every < 0:
            raise bad("resample_every", "an integer >= 0 (0: never resample)")
        if not 0 <= self.resample_until <= 1:
            raise bad("resample_until", "in [0, 1]")
        if not self.apply_b_dec_to_input:
            raise bad("apply_b_dec_to_input", "True (MP always pursues x - b_dec; use decoder_bias=False for no bias)")


class MpResult(NamedTuple):
    """Everything one pursuit produced (no autograd)."""

    codes: Float[Tensor, "... d_sae"]
    """Dense codes."""
    x_hat: Float[Tensor, "... d_model"]
    """Reconstruction ``decode(codes)``."""
    residual: Float[Tensor, "... d_model"]
    """``x - x_hat``."""
    selection: Selection
    """Per-step choices, residual norms ``[n, steps + 1]`` and stop reasons (rows flattened)."""


@register("mpsae")
class MPSAE(SAE):
    """Matching-pursuit SAE; see the module docstring. ``W_enc`` is ``W_dec.T`` (tied)."""

    config_class = MPSAEConfig
    sparsity_setting = "lower n_steps"
    normalize_decoder = True
    cfg: MPSAEConfig

    def __init__(self, cfg: MPSAEConfig):
        nn.Module.__init__(self)  # not SAE.__init__: MP has no separate W_enc / b_enc parameters
        if not isinstance(cfg, MPSAEConfig):
            raise SAEError(f"MPSAE needs an MPSAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_model))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_model), requires_grad=cfg.decoder_bias)
        self._gram_key: tuple | None = None
        self._gram: Tensor | None = None
        self._pool: tuple[Tensor, Tensor] | None = None
        self.n_resampled_ = 0  # atoms moved by dead-atom resampling in training so far (not saved)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_model)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.b_dec.zero_()

    @property
    def W_enc(self) -> Tensor:  # noqa: N802 - the project's vocabulary
        """The tied encoder ``W_dec.T`` (a view)."""
        return self.W_dec.T

    # ------------------------------------------------------------------ helpers
    def atoms(self) -> Float[Tensor, "d_sae d_model"]:
        """Unit-norm atoms (``W_dec`` rows divided by their norm; differentiable)."""
        w = self.W_dec
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _work_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype

    def _weights_key(self) -> tuple:
        """What the cached Gram matrix was built from. Torch's in-place ops and the trainer's native steps raise
        ``W_dec``'s version; a write through ``W_dec.data`` does not, so outside training (where a notebook edits
        atoms, a step at a time or not) the key also holds a position-weighted float64 checksum of the values."""
        w = self.W_dec.detach()
        key: tuple = (self.W_dec._version, w.data_ptr(), self.training)
        if not self.training:
            rows = torch.arange(1, w.shape[0] + 1, dtype=torch.float64, device=w.device)
            cols = torch.arange(1, w.shape[1] + 1, dtype=torch.float64, device=w.device).sqrt()
            key += (float(w.sum(1, dtype=torch.float64) @ rows), float(w.sum(0, dtype=torch.float64) @ cols))
        return key

    def _gram_for(self, atoms: Tensor, n: int, steps: int) -> Tensor | None:
        mode = self.cfg.correlation_update
        if mode == "direct" or steps <= 1:
            return None
        key = (*self._weights_key(), atoms.dtype, atoms.device)
        cached = self._gram is not None and self._gram_key == key
        if mode == "auto" and not mp_pursuit.use_gram(n, self.cfg.d_model, self.cfg.d_sae, steps,
                                                     gram_cached=cached, elem_bytes=atoms.element_size()):
            return None
        if not cached:
            with torch.no_grad():
                a = atoms.detach()
                if self.training and self.cfg.train_gram_dtype == "bfloat16":
                    precision.warn_if_slow(a.device, "the MP-SAE training Gram matrix (train_gram_dtype='bfloat16')",
                                           "build it in float32 on this machine (train_gram_dtype='float32')")
                    a = a.to(torch.bfloat16)
                self._gram = (a @ a.T).to(atoms.dtype)
            self._gram_key = key
        return self._gram

    def bias(self) -> Float[Tensor, " d_model"]:
        """``b_dec``, or zeros with ``decoder_bias=False`` (whatever a trainer wrote into ``b_dec``)."""
        return self.b_dec if self.cfg.decoder_bias else torch.zeros_like(self.b_dec)

    def _check_finite(self, x: Tensor) -> None:
        """The pursuit would give a NaN or inf row zero codes without a word: refuse it instead."""
        if isinstance(x, Tensor) and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).reshape(-1, x.shape[-1]).any(-1).nonzero().flatten()
            raise SAEError(f"MPSAE input rows {bad[:10].tolist()}{' ...' if bad.numel() > 10 else ''} "
                           f"({bad.numel()} of {x.reshape(-1, x.shape[-1]).shape[0]}, counted over the flattened "
                           "leading dimensions) hold NaN or inf; the pursuit cannot encode them: drop or fix them")

    def _center(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = x.reshape(-1, self.cfg.d_model).to(self._work_dtype())
        return x - self.bias().to(x.dtype)

    def selects_in_bf16(self, device_type: str) -> bool:
        """Whether the pursuit's selection runs in bf16 here (``pursuit_dtype``, or a bf16 autocast region)."""
        return self.cfg.pursuit_dtype == "bfloat16" or (
            torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16)

    def _select(self, xc: Tensor, atoms: Tensor, *, steps: int, residual_threshold: float,
                stop_on_repeated_support: bool, residual_fraction: float = 0.0,
                excluded: Tensor | None = None) -> Selection:
        cfg = self.cfg
        low = self.selects_in_bf16(xc.device.type)
        x_sel, a_sel = xc.detach(), atoms.detach()
        if low:
            precision.warn_if_slow(xc.device, "the MP-SAE pursuit's selection (pursuit_dtype='bfloat16' or a bf16 "
                                   "autocast region)", "select in float32 on this machine (pursuit_dtype='float32', "
                                   "no bf16 autocast; interp sae train: drop --bf16)")
            x_sel, a_sel = x_sel.to(torch.bfloat16), a_sel.to(torch.bfloat16)
        with torch.autocast(xc.device.type, enabled=False):  # the selection runs in the dtype chosen here
            sel = mp_pursuit.select(
                x_sel, a_sel, steps=steps, coefficients=cfg.coefficients,
                allow_repeat=cfg.allow_repeat, residual_threshold=residual_threshold,
                residual_fraction=residual_fraction, stop_on_repeated_support=stop_on_repeated_support,
                gram=self._gram_for(a_sel, xc.shape[0], steps), excluded=excluded)
            if low:
                sel = mp_pursuit.exact_coefficients(xc.detach(), atoms.detach(), sel,
                                                    nonneg=cfg.coefficients == "nonneg")
        return sel

    def _inference_options(self, max_iterations: int | None, residual_threshold: float | None,
                           stop_on_repeated_support: bool | None,
                           residual_fraction: float | None = None) -> dict[str, Any]:
        cfg = self.cfg
        if self.training:
            opts = {"steps": cfg.n_steps, "residual_threshold": 0.0, "stop_on_repeated_support": False,
                    "residual_fraction": cfg.residual_fraction}
        else:
            opts = {"steps": cfg.max_iterations or cfg.n_steps, "residual_threshold": cfg.residual_threshold,
                    "stop_on_repeated_support": cfg.stop_on_repeated_support,
                    "residual_fraction": cfg.residual_fraction}
        for key, val in (("steps", max_iterations), ("residual_threshold", residual_threshold),
                         ("stop_on_repeated_support", stop_on_repeated_support),
                         ("residual_fraction", residual_fraction)):
            if val is not None:
                opts[key] = val
        if not 0 <= opts["residual_fraction"] < 1:
            raise SAEError(f"residual_fraction must be in [0, 1), got {opts['residual_fraction']!r}")
        if not isinstance(opts["steps"], int) or opts["steps"] < 1:
            raise SAEError(f"max_iterations must be a positive integer, got {opts['steps']!r}")
        if not cfg.allow_repeat and opts["steps"] > cfg.d_sae:
            raise SAEError(f"max_iterations must be <= d_sae={cfg.d_sae} with allow_repeat=False, got {opts['steps']}")
        if not opts["residual_threshold"] >= 0:
            raise SAEError(f"residual_threshold must be >= 0, got {opts['residual_threshold']!r}")
        return opts

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def pursue(
        self,
        x: Float[Tensor, "... d_model"],
        *,
        max_iterations: int | None = None,
        residual_threshold: float | None = None,
        stop_on_repeated_support: bool | None = None,
        residual_fraction: float | None = None,
    ) -> MpResult:
        """Run the pursuit without autograd; options default to the config (eval-mode rules)."""
        self._check_finite(x)
        opts = self._inference_options(max_iterations, residual_threshold, stop_on_repeated_support,
                                       residual_fraction)
        lead = x.shape[:-1]
        xc = self._center(x)
        atoms = self.atoms().to(xc.dtype)
        sel = self._select(xc, atoms, **opts)
        codes = mp_pursuit.dense_codes(sel.indices, sel.coefs, self.cfg.d_sae)
        x_hat_c = mp_pursuit.sparse_reconstruct(sel, atoms)
        out_dtype = self.dtype
        b = self.bias().to(xc.dtype)
        return MpResult(codes.to(out_dtype).reshape(*lead, -1), (x_hat_c + b).to(out_dtype).reshape(*lead, -1),
                        (xc - x_hat_c).to(out_dtype).reshape(*lead, -1), sel)

    def _grad_path(self, x: Tensor, **opts: Any) -> tuple[Tensor, Tensor, Selection]:
        """Codes and reconstruction with autograd (selection without)."""
        xc = self._center(x)
        atoms = self.atoms().to(xc.dtype)
        sel = self._select(xc, atoms, **opts)
        z, x_hat_c = mp_pursuit.recompute(xc, atoms, sel)
        codes = mp_pursuit.dense_codes(sel.indices, z, self.cfg.d_sae)
        return codes, x_hat_c + self.bias().to(xc.dtype), sel

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.W_dec.requires_grad or self.b_dec.requires_grad)

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        self._check_finite(x)
        lead = x.shape[:-1]
        if not self._needs_grad():
            with torch.no_grad():  # codes only: no reconstruction needed
                xc = self._center(x)
                sel = self._select(xc, self.atoms().to(xc.dtype), **self._inference_options(None, None, None))
                codes = mp_pursuit.dense_codes(sel.indices, sel.coefs, self.cfg.d_sae)
            return codes.to(self.dtype).reshape(*lead, -1)
        codes, _, _ = self._grad_path(x, **self._inference_options(None, None, None))
        return codes.to(self.dtype).reshape(*lead, -1)

    def encode_pre(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Correlations of the centred input with every atom (the pursuit's first step)."""
        xc = self._center(x)
        return (xc @ self.atoms().to(xc.dtype).T).to(self.dtype).reshape(*x.shape[:-1], -1)

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        raise SAEError("MPSAE has no pointwise activation: the pursuit needs the input; call encode(x)")

    def decode(self, codes: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_model"]:
        return codes @ self.atoms() + self.bias()

    def forward(self, x: Float[Tensor, "... d_model"]) -> SaeOutput:
        self._check_finite(x)
        lead = x.shape[:-1]
        if not self._needs_grad():
            res = self.pursue(x)
            return SaeOutput(res.x_hat, res.codes, None)
        codes, x_hat, _ = self._grad_path(x, **self._inference_options(None, None, None))
        return SaeOutput(x_hat.to(self.dtype).reshape(*lead, -1), codes.to(self.dtype).reshape(*lead, -1), None)

    # ------------------------------------------------------------------ training
    def training_loss(self, x: Float[Tensor, "batch d_model"], state: TrainState) -> TrainStep:
        """FVU of ``n_steps`` pursuit steps, plus the revive term; atom dropout early on."""
        cfg = self.cfg
        excluded = None
        if cfg.atom_dropout > 0 and state.step < cfg.atom_dropout_steps:
            excluded = torch.rand(cfg.d_sae, device=self.device) < cfg.atom_dropout
        xc = self._center(x)
        atoms = self.atoms().to(xc.dtype)
        sel = self._select(xc, atoms, steps=cfg.n_steps, residual_threshold=0.0, stop_on_repeated_support=False,
                           residual_fraction=cfg.residual_fraction, excluded=excluded)
        _, x_hat_c = mp_pursuit.recompute(xc, atoms, sel)
        if self._resamples_after(state):
            self._keep_worst_residuals(xc - x_hat_c.detach())
        x_hat = (x_hat_c + self.bias().to(xc.dtype)).to(self.dtype)
        fvu, _ = fvu_loss(x, x_hat, state)
        loss, terms = fvu, {"fvu": fvu.detach()}
        if cfg.revive_coeff > 0:
            e = (x.to(x_hat.dtype) - x_hat).detach()
            with torch.no_grad():
                pre = e @ atoms.detach().T.to(e.dtype)

            def gather(idx: Tensor) -> Tensor:
                return torch.einsum("nkd,nd->nk", atoms[idx].to(e.dtype), e)

            revive = auxk_loss(x, x_hat, pre, gather, atoms, state, cfg.revive_k)
            loss = loss + cfg.revive_coeff * revive
            terms["revive"] = revive.detach()
        with torch.no_grad():
            l0 = l0_per_row(sel)
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[sel.indices[sel.taken]] = True
        return TrainStep(loss, x_hat, l0.float().mean(), fired, terms)

    def after_step(self, state: TrainState) -> None:
        """Called by the trainer after every optimizer step (rows are already renormalised): keeps
        ``b_dec`` at zero without a decoder bias, and resamples dead atoms every ``resample_every``."""
        cfg = self.cfg
        if not cfg.decoder_bias:
            with torch.no_grad():
                self.b_dec.zero_()
        if self._resamples_after(state) and self._pool is not None:
            self.n_resampled_ += resample_dead(self.W_dec, state.dead_mask, *self._pool, seed=state.step)
        self._pool = None

    def _resamples_after(self, state: TrainState) -> bool:
        """Whether dead atoms are resampled after this training step."""
        cfg = self.cfg
        return bool(cfg.resample_every and (state.step + 1) % cfg.resample_every == 0 and state.dead_mask is not None
                    and state.step < cfg.resample_until * state.total_steps)

    @torch.no_grad()
    def init_from_data(self, x: Float[Tensor, "batch d_model"]) -> None:
        """Called by the trainer once, on the first (scaled) batch after ``b_dec`` is set: with
        ``atom_init="data"`` the atoms become distinct random centred rows, normalised (the remaining
        atoms keep their random directions when the batch has fewer rows than ``d_sae``)."""
        if self.cfg.atom_init != "data":
            return
        init_from_rows(self.W_dec, x.reshape(-1, self.cfg.d_model).to(self.W_dec.dtype) - self.bias().detach())

    @torch.no_grad()
    def _keep_worst_residuals(self, r: Tensor) -> None:
        """Keep this batch's worst residuals (over every process) for :meth:`after_step` (resample steps only)."""
        sq = r.float().pow(2).sum(1)
        m = min(self.cfg.d_sae, sq.shape[0])
        top = sq.topk(m).indices
        self._pool = gather_rows(r.detach().float()[top], sq[top], self.cfg.d_sae)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make the SAE read raw activations after training on ``scale * x``: atoms keep unit norm,
        so only ``b_dec`` changes (``/= scale``); codes come out ``1 / scale`` times the training
        ones and ``residual_threshold`` is in raw units."""
        self.b_dec.div_(scale)
