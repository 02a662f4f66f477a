"""The contract every sparse autoencoder meets, and the registry keyed by architecture name.

Vocabulary (the same in every module): ``d_model``, ``d_sae``, ``W_enc [d_model, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_model]``, ``b_dec [d_model]``; ``k`` is the number of active
latents per row (TopK; BatchTopK's mean over the batch), ``n_steps`` the matching-pursuit steps per
row (MP-SAE). A renamed field stays readable under its old name for one release: a config class
lists it in ``_renamed`` (see :func:`interp.deprecation.renamed_fields`), and :meth:`SAEConfig.from_dict`
reads configs saved with the old name.

An architecture is a subclass of :class:`SAE` with its own frozen config subclass of
:class:`SAEConfig`, registered with ``@register("name")``. ``SAE.forward`` always returns
:class:`SaeOutput`; device and dtype are read from the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp.deprecation import translate
from interp.errors import InterpError
from saes import kernels


class SAEError(InterpError):
    """An SAE configuration, checkpoint or call that cannot work."""


class SaeOutput(NamedTuple):
    """What every SAE's ``forward`` returns."""

    x_hat: Float[Tensor, "... d_model"]
    """The reconstruction."""
    codes: Float[Tensor, "... d_sae"]
    """Latent activations (dense; zeros where inactive)."""
    pre_acts: Float[Tensor, "... d_sae"] | None
    """Encoder pre-activations before the sparsifying nonlinearity (None where not defined)."""


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Fields shared by every architecture. Subclasses add their own (``k``, ``n_steps``, ``l1_coeff`` ...)."""

    d_model: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents (dictionary size)."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the input before encoding (SAELens' convention)."""

    architecture: ClassVar[str] = ""
    _renamed: ClassVar[dict[str, str]] = {}
    """Old field name -> new name; the old one is still accepted, with a DeprecationWarning."""

    def __post_init__(self) -> None:
        for name in ("d_model", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SAEError(f"{type(self).__name__}.{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict, refusing unknown keys (a typo must not pass silently).

        A field's old name (``cls._renamed``, e.g. an MP-SAE config saved with ``k``) is read as the
        new one, with a DeprecationWarning; a dict holding both names is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names - set(cls._renamed) - {"architecture"}
        if extra:
            raise SAEError(f"{cls.__name__} got unknown fields {sorted(extra)}; valid fields: {sorted(names)}")
        kwargs = translate({k: v for k, v in d.items() if k != "architecture"}, cls._renamed, cls.__name__,
                           error=SAEError, stacklevel=2)
        return cls(**kwargs)


ENC_INIT_SCALE = 3 ** -0.5
"""Default of :attr:`UntiedSAEConfig.enc_init_scale`: ``1 / sqrt(3)`` (0.577), the norm of a row of
``nn.Linear``'s default initialisation at any width (what sparsify's encoder starts from). Chosen by
measurement (``experiments/sae_init_ablation.md``, TopK on cached SmolLM2 activations, 8 settings of
d_sae 9,216 / 36,864, k 32 / 64, batch 1,024 / 4,096 and 8 to 200 steps): against 1, the earlier default,
the held-out FVU at equal tokens is lower in all 8 (by 0.05 to 0.59) and matches sparsify's own trainer
(0.0001 to 0.0045 lower); 0.3 was lower still in one setting (d_sae 36,864, k 64, batch 1,024, 200 steps:
0.267 against 0.288) and higher in the other 7. BatchTopK, ReLU and JumpReLU are also better at 0.577
than at 1 after 50 steps (their figures are in the same write-up)."""


@dataclass(frozen=True, kw_only=True)
class UntiedSAEConfig(SAEConfig):
    """Fields of the architectures with an encoder of their own (``W_enc``, ``b_enc``), initialised by
    :meth:`SAE.reset_parameters`: TopK, BatchTopK, ReLU, JumpReLU (MP-SAE's encoder is its decoder)."""

    enc_init_scale: float = ENC_INIT_SCALE
    """Norm of each encoder column at initialisation: ``W_enc`` starts as ``enc_init_scale * W_dec.T``
    (decoder rows unit-norm)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        v = self.enc_init_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise SAEError(f"{type(self).__name__}.enc_init_scale must be a finite number > 0, got {v!r}")


class SAE(nn.Module):
    """Base class. Subclasses implement :meth:`encode_pre` and :meth:`activation` (or override
    :meth:`encode`), and may override :meth:`decode` and :meth:`loss`."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    architecture: ClassVar[str] = ""
    default_lr_factor: ClassVar[float] = 4.0
    """The trainer's default learning rate is ``2e-4 / sqrt(d_sae / 16384)`` times this
    (:meth:`saes.TrainConfig.lr_for`). 4 for every architecture here: chosen for TopK by held-out FVU at equal
    tokens over run lengths (``experiments/sae_lr_rule.md``), and measured against 1 for the others on layer 12 of
    the embedded model (``experiments/sae_sparsity_defaults.md``, 9,216 latents, 400 steps of 1,024 rows; held-out
    FVU at 1 -> 4): BatchTopK k 32 0.274 -> 0.191, ReLU (``l1_coeff`` 5e-3) 0.503 at L0 515 -> 0.348 at L0 160,
    JumpReLU 0.303 at L0 160 -> 0.196 at L0 133 (its thresholds kept at the same absolute rate), MP-SAE 0.211 ->
    0.123 (8 gave 0.102, but the edge of a grid of 400-step runs is not taken as a default); layer 20 checked each.
    An architecture overrides it where a study measures better."""

    sparsity_setting: ClassVar[str] = ""
    """What a user changes for sparser codes, as the trainer's :class:`~saes.trainer.DenseCodesWarning` advises
    (e.g. ``"raise l1_coeff"``); empty where none applies."""

    def lr_factors(self) -> dict[str, float]:
        """Learning-rate multipliers of named parameters, beside the SAE's learning rate (the trainer gives each
        its own Adam parameter group); parameters not named here take the SAE's learning rate."""
        return {}

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise SAEError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        d, m = cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows; the encoder starts as the decoder's transpose times
        ``cfg.enc_init_scale`` (:class:`UntiedSAEConfig`; 1 for a config without that field)."""
        scale = self.cfg.enc_init_scale if isinstance(self.cfg, UntiedSAEConfig) else 1.0
        with torch.no_grad():
            w = torch.randn(self.cfg.d_sae, self.cfg.d_model)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T * scale)
            self.b_enc.zero_()
            self.b_dec.zero_()

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.shape[-1] != self.cfg.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SAEError(f"{type(self).__name__} expects [..., d_model={self.cfg.d_model}] input, got {got}")

    def encode_pre(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Encoder pre-activations (without autograd and in float32 on CPU, through
        :func:`saes.kernels.encoder_matmul`'s faster kernel where it applies)."""
        self._check_input(x)
        x = x.to(self.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        rows = x.reshape(-1, x.shape[-1])
        if not (torch.is_grad_enabled() and (x.requires_grad or self.W_enc.requires_grad or self.b_enc.requires_grad)) \
                and kernels.onednn_ok(rows, self.W_enc):
            return kernels.encoder_matmul(rows, self.W_enc, self.b_enc).view(*x.shape[:-1], -1)
        pre = x @ self.W_enc
        if pre.dtype != torch.promote_types(pre.dtype, self.b_enc.dtype):  # e.g. bf16 under autocast: promoted
            return pre + self.b_enc
        return pre.add_(self.b_enc)  # the same sums, without a second [..., d_sae] buffer

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The sparsifying nonlinearity."""
        raise NotImplementedError  # abstractmethod: every registered architecture defines it

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        return self.activation(self.encode_pre(x))

    def encode_sparse(self, x: Float[Tensor, "batch d_model"]) -> Tensor:
        """``encode(x)`` as a coalesced sparse COO tensor ``[batch, d_sae]`` holding the nonzero codes
        only (the same values). Architectures that pick their active latents directly (TopK) never
        build the dense codes."""
        if x.dim() != 2:
            raise SAEError(f"encode_sparse expects [batch, d_model={self.cfg.d_model}] input, got {tuple(x.shape)}")
        return self.encode(x).to_sparse()

    def decode(self, codes: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_model"]:
        return codes @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_model"]) -> SaeOutput:
        pre = self.encode_pre(x)
        codes = self.activation(pre)
        return SaeOutput(self.decode(codes), codes, pre)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.cfg.to_dict().items())


REGISTRY: dict[str, type[SAE]] = {}


def register(name: str):
    """Class decorator: make an architecture loadable by name."""

    def deco(cls: type[SAE]) -> type[SAE]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise SAEError(f"architecture {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        cls.architecture = name
        cls.config_class.architecture = name
        REGISTRY[name] = cls
        return cls

    return deco


def get_architecture(name: str) -> type[SAE]:
    if name not in REGISTRY:
        raise SAEError(f"unknown SAE architecture {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def build(architecture: str, **cfg: Any) -> SAE:
    """``build("topk", d_model=576, d_sae=9216, k=32)``, ``build("mpsae", d_model=576, d_sae=9216, n_steps=32)``."""
    cls = get_architecture(architecture)
    config_class = cls.config_class
    cfg = translate(cfg, config_class._renamed, config_class.__name__, error=SAEError, stacklevel=2)  # warn the caller
    return cls(config_class.from_dict(cfg))
