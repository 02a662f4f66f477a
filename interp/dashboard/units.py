"""What a dashboard shows: a set of *units* that read a site's activations.

A unit is one SAE latent, one neuron, or one coordinate of a :class:`~interp.subspace.Subspace`.
:class:`Units` holds what the data pass needs and nothing about where the units came from: an
encoder ``[n, width] -> [n, n_units]`` (dense, or a sparse COO tensor), a name per unit, and
optionally the direction each unit writes into the residual stream (``[n_units, d_model]``: an SAE's
decoder rows), from which the logit effect and the nearest units are computed. ``interp`` never
imports ``saes``: the command layer hands an SAE checkpoint's ``encoder(sparse=True)`` and
``decoder()`` to :func:`sae_units`.

**Logit effect** (:func:`logit_effect`) of a direction ``v``: ``norm(v) @ W_U.T``, where ``W_U`` is
the model's output embedding (the input embedding when they are tied, as HF ties them) and
``norm`` is the final norm *as the model applies it to a single direction, up to a positive scale*:

* RMSNorm (Llama, Qwen, Mistral ...): ``v * weight``, or ``v * (1 + weight)`` for the norms that
  scale that way (Gemma, VaultGemma, Qwen3-Next ...);
* LayerNorm (GPT-2, GPT-NeoX ...): ``(v - mean(v)) * weight``.

The model's own norm module computes it: it is run on the direction scaled to unit RMS (so its
epsilon is negligible), minus its output on a zero vector (the norm's bias, if any). No norm class
is recognised by its name, so a new one is applied as the model applies it.

The division by the norm of the residual vector is a positive per-token scale, the same for every
vocabulary entry, so it does not change which tokens a direction promotes; it is left out, as are
the norm's bias and the unembedding's bias (each adds the same vector whatever the direction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp.errors import InputError
from interp.layouts import unwrap

__all__ = ["Units", "final_norm", "logit_effect", "nearest_units", "neuron_units", "sae_units", "subspace_units"]

Encoder = Callable[[Tensor], Tensor]

_NORM_PATHS = ("model.norm", "model.final_layernorm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.decoder.final_layer_norm", "transformer.norm_f", "norm", "ln_f")


@dataclass(frozen=True, kw_only=True)
class Units:
    """The units a dashboard is built for."""

    encode: Encoder
    """Activations ``[n, width]`` of the site to unit activations ``[n, n_units]`` (no autograd needed):
    a dense tensor, or a sparse COO one (e.g. an SAE's sparse codes; entries not stored are 0)."""
    names: tuple[str, ...]
    """One display name per unit (e.g. ``"latent 17"``, ``"neuron 403"``, ``"angle Monday"``)."""
    kind: str = "latent"
    """What a unit is called on the pages: latent, neuron or coordinate."""
    directions: Tensor | None = None
    """``[n_units, d_model]``: what each unit writes to the residual stream (logit effect, neighbours), or None."""
    signed: bool = False
    """Unit activations can be negative (neurons, coordinates): the histogram covers both signs."""
    ids: tuple[int, ...] | None = None
    """The unit's index in its source (latent or neuron number); default 0..n_units-1."""

    def __post_init__(self):
        if not self.names:
            raise InputError("a dashboard needs at least one unit; got an empty list of names")
        if self.directions is not None and (self.directions.dim() != 2 or self.directions.shape[0] != len(self.names)):
            raise InputError(f"directions must be [n_units={len(self.names)}, d_model]; got shape "
                             f"{tuple(self.directions.shape)}")
        if self.ids is not None and len(self.ids) != len(self.names):
            raise InputError(f"ids holds {len(self.ids)} entries for {len(self.names)} units")

    @property
    def n_units(self) -> int:
        return len(self.names)

    def unit_ids(self) -> list[int]:
        return list(self.ids) if self.ids is not None else list(range(self.n_units))


def sae_units(encode: Encoder, decoder: Float[Tensor, "d_sae d_model"], latents: Sequence[int] | None = None) -> Units:
    """Units for an SAE: its encoder and decoder rows (``ckpt.encoder()``, ``ckpt.decoder()`` of
    ``saes.read``; ``ckpt.encoder(sparse=True)`` gives sparse codes, which the pass reads fastest). With
    `latents`, only those latents (the encoder still runs in full)."""
    d_sae = int(decoder.shape[0])
    if latents is None:
        return Units(encode=encode, names=tuple(f"latent {i}" for i in range(d_sae)), directions=decoder.float())
    idx = [int(i) for i in latents]
    bad = [i for i in idx if not 0 <= i < d_sae]
    if bad or not idx:
        raise InputError(f"latents {bad or idx} are not in 0..{d_sae - 1} (this SAE has d_sae={d_sae}); "
                         "give latent numbers in that range")
    sel = torch.tensor(idx)

    def encode_some(x: Tensor) -> Tensor:
        codes = encode(x)
        return codes.index_select(1, sel.to(codes.device))  # dense or sparse codes

    return Units(encode=encode_some, names=tuple(f"latent {i}" for i in idx), directions=decoder[sel].float(),
                 ids=tuple(idx))


def neuron_units(neurons: Sequence[int], width: int, directions: Tensor | None = None) -> Units:
    """Units for chosen neurons of a site of `width` (e.g. a probe's support): their raw values.
    At a residual-stream site, pass ``directions=None`` and each neuron's direction is its basis vector."""
    idx = [int(i) for i in neurons]
    bad = [i for i in idx if not 0 <= i < width]
    if bad or not idx:
        raise InputError(f"neurons {bad or idx} are not in 0..{width - 1} (the site's width is {width})")
    sel = torch.tensor(idx)

    def encode(x: Tensor) -> Tensor:
        return x[:, sel].float()

    return Units(encode=encode, names=tuple(f"neuron {i}" for i in idx), kind="neuron", directions=directions,
                 signed=True, ids=tuple(idx))


def subspace_units(subspace) -> Units:
    """Units for a :class:`~interp.subspace.Subspace`: each coordinate, and for a circle also one unit
    per named point (``"angle Monday"``): the centred coordinates on the circle's own axes projected on
    that point's angle, so its top contexts are the tokens the circle places furthest towards that point.
    On an ellipse (a circle probe's ``axes``) the coordinates are read through the axes, as the probe
    reads angles, and the unit's write direction is the point's direction from the centre."""
    from interp.subspace import CircleMap

    basis = subspace.basis.float()
    names = [f"coordinate {i}" for i in range(subspace.rank)]
    dirs = [basis[i] for i in range(subspace.rank)]
    cm = subspace.coord_map
    angles: list[float] = []
    center = torch.zeros(2)
    if isinstance(cm, CircleMap) and subspace.rank >= 2:
        center = cm.center.float()
        for label, a in cm.angles.items():
            names.append(f"angle {label}")
            angles.append(float(a))
    unit_dirs = torch.tensor([[math.cos(a), math.sin(a)] for a in angles]).reshape(-1, 2)
    axes = getattr(cm, "axes", None) if angles else None
    # read: plane coordinates -> the circle's own coordinates (identity on a round circle)
    read = torch.eye(2) if axes is None else torch.linalg.inv(axes.double()).float()
    # write: each point's direction from the centre in the plane (axes @ (cos, sin) on an ellipse), unit length
    write = unit_dirs if axes is None else unit_dirs @ axes.float().T
    write = write / write.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dirs += [u[0] * basis[0] + u[1] * basis[1] for u in write]
    unit_read = (unit_dirs @ read).T  # [2, n_angles]: (coords - center) @ unit_read = circle coords . (cos, sin)

    def encode(x: Tensor) -> Tensor:
        coords = subspace.project(x.float())
        if not angles:
            return coords
        return torch.cat([coords, (coords[:, :2] - center.to(coords)) @ unit_read.to(coords)], dim=1)

    return Units(encode=encode, names=tuple(names), kind="coordinate", directions=torch.stack(dirs), signed=True)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the model applies before its unembedding (``model.norm``, ``transformer.ln_f`` ...)."""
    hf = unwrap(model)
    for path in _NORM_PATHS:
        mod = hf
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.Module) and (hasattr(mod, "weight") or "norm" in type(mod).__name__.lower()):
            return mod  # a norm without a weight (OLMo's non-affine LayerNorm) is still the final norm
    raise InputError(f"cannot find the final norm of {type(hf).__name__} (looked at {', '.join(_NORM_PATHS)}); "
                     "the logit effect needs it: build the dashboard without directions")


def _apply_norm(norm: nn.Module, v: Tensor) -> Tensor:
    """The final norm applied to directions (see the module docstring): the model's own norm module on each
    direction at unit scale, minus its output on zero (its bias), times the direction's own scale, so that the
    result is ``v * weight`` for an RMSNorm (``v * (1 + weight)`` where the model scales so) and
    ``(v - mean(v)) * weight`` for a LayerNorm, whatever the norm's class is called."""
    p = next(norm.parameters(), v)
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        zero = norm(torch.zeros(1, v.shape[-1], device=p.device, dtype=p.dtype)).float()
        # a norm that subtracts the mean sends a constant vector to its bias: then its scale is the centred one
        ones = norm(torch.ones(1, v.shape[-1], device=p.device, dtype=p.dtype)).float() - zero
        centred = bool(ones.abs().max() <= 1e-3 * max(1.0, float(zero.abs().max())))
        u = v.float() - v.float().mean(dim=-1, keepdim=True) if centred else v.float()
        scale = u.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(tiny)
        out = norm((v.float() / scale).to(device=p.device, dtype=p.dtype)).float() - zero
    return (out.to(v.device) * scale).float()


@torch.no_grad()
def logit_effect(model: nn.Module, directions: Float[Tensor, "n d_model"], n_tokens: int = 10,
                 chunk: int = 256) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top promoted and suppressed tokens of each direction through the final norm and the unembedding.

    Returns ``(up_ids, up_values, down_ids, down_values)``, each ``[n, n_tokens]``: the largest and the
    smallest entries of ``norm(direction) @ W_U.T`` (see the module docstring for what ``norm`` applies).
    """
    hf = unwrap(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise InputError(f"{type(hf).__name__} has no output embedding (a language-model head): the logit effect "
                         "needs one; build the dashboard without directions")
    w_u = head.weight.detach().float()
    if directions.shape[1] != w_u.shape[1]:
        raise InputError(f"directions have width {directions.shape[1]} but the unembedding reads "
                         f"d_model={w_u.shape[1]}: logit effects exist only for directions in the residual stream")
    norm = final_norm(model)
    k = min(n_tokens, w_u.shape[0])
    outs: list[list[Tensor]] = [[], [], [], []]
    buf = torch.empty(min(chunk, directions.shape[0]), w_u.shape[0], device=w_u.device)  # reused by every chunk
    for lo in range(0, directions.shape[0], chunk):
        d = _apply_norm(norm, directions[lo:lo + chunk].float().to(w_u.device))
        eff = torch.matmul(d, w_u.T, out=buf[:d.shape[0]])
        up, down = eff.topk(k, dim=1), eff.topk(k, dim=1, largest=False)
        for out, t in zip(outs, (up.indices, up.values, down.indices, down.values)):
            out.append(t.cpu())
    return tuple(torch.cat(o) for o in outs)  # type: ignore[return-value]


@torch.no_grad()
def nearest_units(directions: Float[Tensor, "n d_model"], n_neighbors: int = 8,
                  chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Each direction's `n_neighbors` nearest others by cosine: ``(indices, cosines)``, ``[n, n_neighbors]``."""
    n = directions.shape[0]
    k = min(n_neighbors, n - 1)
    unit = directions.float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx, val = [], []
    buf = torch.empty(min(chunk, n), n, device=unit.device)  # reused by every chunk
    for lo in range(0, n, chunk):
        cos = torch.matmul(unit[lo:lo + chunk], unit.T, out=buf[:min(chunk, n - lo)])
        rows = torch.arange(lo, min(lo + chunk, n))
        cos[rows - lo, rows] = -math.inf  # not its own neighbour
        top = cos.topk(k, dim=1) if k > 0 else cos[:, :0].topk(0, dim=1)
        idx.append(top.indices)
        val.append(top.values)
    return torch.cat(idx), torch.cat(val)
