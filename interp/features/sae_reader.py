"""Read the matrices of an SAE checkpoint folder without importing ``saes``.

``interp`` must not import ``saes``, yet ``interp features clusters --sae DIR`` needs a decoder and
an encoder. A checkpoint in SAELens' layout (``cfg.json`` + ``sae_weights.safetensors``, what
``saes.checkpoint.save`` writes) holds everything: this module reads it strictly (safetensors, no
pickle) and rebuilds the inference-time encoder of the common architectures. In Python, pass an
SAE object (anything with ``W_dec`` and ``encode``) to the finders instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from torch import Tensor

from interp.errors import InputError

_ACTIVATIONS = ("relu", "standard", "topk", "jumprelu", "batchtopk")


@dataclass
class SaeMatrices:
    """Weights of one SAE and the nonlinearity its encoder uses at inference."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    architecture: str
    apply_b_dec_to_input: bool = True
    k: int | None = None
    threshold: Tensor | None = None
    metadata: dict | None = None

    @torch.no_grad()
    def encode(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_sae"]:
        x = x.to(self.W_enc)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        arch = self.architecture
        if arch == "topk":
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if arch in ("jumprelu", "batchtopk"):
            return pre * (pre > self.threshold.clamp_min(0) if arch == "batchtopk" else pre > self.threshold)
        return pre.relu()


def read_sae(folder: str | Path) -> SaeMatrices:
    """Load ``cfg.json`` + ``sae_weights.safetensors`` from `folder`."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        t = load_file(str(folder / "sae_weights.safetensors"))
    except (OSError, ValueError) as e:
        raise InputError(f"{folder} is not a readable SAE checkpoint (cfg.json + sae_weights.safetensors in "
                         f"SAELens' layout): {e}") from e
    ours = cfg.get("interp", {}) if isinstance(cfg.get("interp"), dict) else {}
    arch = ours.get("architecture") or cfg.get("architecture", "standard")
    if arch not in _ACTIVATIONS:
        raise InputError(f"{folder}: architecture {arch!r} cannot be encoded here (known: {list(_ACTIVATIONS)}); "
                         "load the SAE with its own package and pass it to find_multidim_features in Python")
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in t]
    if arch in ("jumprelu", "batchtopk") and "threshold" not in t:
        missing.append("threshold")
    if missing:
        raise InputError(f"{folder / 'sae_weights.safetensors'} lacks {missing}; found {sorted(t)}")
    k = (ours.get("config") or {}).get("k", cfg.get("k"))
    if arch == "topk" and not isinstance(k, int):
        raise InputError(f"{folder / 'cfg.json'}: a topk SAE needs an integer 'k'; got {k!r}")
    w_dec = t["W_dec"].float()
    if t["W_enc"].shape != (w_dec.shape[1], w_dec.shape[0]):
        raise InputError(f"{folder}: W_enc {tuple(t['W_enc'].shape)} does not match W_dec {tuple(w_dec.shape)} "
                         "(expected W_enc [d_model, d_sae], W_dec [d_sae, d_model])")
    return SaeMatrices(W_enc=t["W_enc"].float(), b_enc=t["b_enc"].float(), W_dec=w_dec, b_dec=t["b_dec"].float(),
                       architecture=arch, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), k=k,
                       threshold=t["threshold"].float() if "threshold" in t else None,
                       metadata=cfg.get("metadata") or {})
