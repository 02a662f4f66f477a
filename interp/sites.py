"""Sites: named places in a model's forward pass that can be read (capture) and written (intervene).

A site is named the TransformerLens way, because published SAE checkpoints record their
``hook_name`` so:

================================  ===========================================================
``blocks.{L}.hook_resid_pre``     residual stream entering block L (= HF ``hidden_states[L]``)
``blocks.{L}.hook_resid_mid``     after attention has been added, before the MLP
``blocks.{L}.hook_resid_post``    residual stream leaving block L (= HF ``hidden_states[L+1]``
                                  except for the last block, where HF applies the final norm)
``blocks.{L}.hook_attn_out``      what attention adds to the residual stream
``blocks.{L}.hook_mlp_out``       what the MLP adds to the residual stream
``blocks.{L}.mlp.hook_post``      MLP neurons: the input of the MLP's output projection
================================  ===========================================================

A raw module path of the HF model (``model.layers.6``, ``model.layers.6.mlp``) names that module's
output; append ``:input`` for its first input (``model.layers.6.mlp.down_proj:input``).

Where each site lives inside a block is data (:mod:`interp.layouts`, keyed by ``config.model_type``);
the list of blocks is discovered. An unlisted model type gets a layout discovered from child names,
and only the sites that :func:`interp.layout_check.check_layout` verifies on the model are accepted.
:func:`site_names` lists exactly the block sites that :func:`resolve` accepts.

Captured values are the caller's: a hook's tensor that the model may still modify in place is
copied before it is kept (see :mod:`interp.capture`).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from interp.errors import SiteError, closest
from interp.layouts import (
    KINDS,
    LAYOUTS,
    Layout,
    blocks_path,
    discover_layout,
    find_blocks,
    listed_layout,
    submodule,
    unwrap,
    warn_if_bridged,
)

__all__ = ["KINDS", "LAYOUTS", "Site", "add_read_hook", "add_write_hook", "blocks_path", "candidate_site",
           "find_blocks", "hooks_alive", "is_parallel", "layout_of", "refusal", "remove_hooks", "resolve", "site_names",
           "unwrap", "warn_if_bridged"]

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in KINDS) + r")$")


def hooks_alive(handles: list) -> bool:
    """Whether every hook handle is still registered on its module (another library may have
    cleared a module's hook dicts behind our back)."""
    for h in handles:
        ref = getattr(h, "hooks_dict_ref", None)
        hooks = ref() if ref is not None else None
        if hooks is None or h.id not in hooks:
            return False
    return True


def layout_of(model: nn.Module) -> Layout:
    """The :class:`~interp.layouts.Layout` for this model: listed for its ``model_type``, else
    discovered from its blocks' child names (then only what :func:`_check` verifies is accepted)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    return listed_layout(config) or discover_layout(find_blocks(model)[0], config)


def is_parallel(model: nn.Module) -> bool:
    """True when attention and MLP read the same residual (GPT-NeoX, GPT-J, Phi-2, Cohere, Falcon).

    For a family that is not listed, the layout check's verdict: it steers attention and reads the
    MLP's input (:attr:`interp.layout_check.LayoutCheck.parallel`); raises :class:`SiteError` where it
    could not tell."""
    hf = unwrap(model)
    lay = layout_of(hf)
    if not lay.discovered:
        return bool(lay.parallel)
    check = _check(hf)
    if check.parallel is None:
        raise SiteError(f"cannot tell whether attention and MLP read the same residual in {type(hf).__name__} "
                        f"(model type {getattr(getattr(hf, 'config', None), 'model_type', None)!r}): "
                        f"{check.why_not_parallel}; add a Layout for it to interp.layouts.LAYOUTS")
    return check.parallel


@dataclass(frozen=True)
class Site:
    """A resolved site: which module to hook and whether its input or output is the value.

    ``order`` sorts sites by when the forward pass reaches them (block, position in block);
    raw module paths outside the blocks sort first (embeddings) or last (everything else).
    """

    name: str
    module: nn.Module
    io: str  # "input" or "output"
    layer: int | None
    order: tuple[int, int]
    block: nn.Module | None = None
    scale: float | None = None
    """The hooked tensor times ``scale`` is the site's value (Granite's residual multiplier)."""
    flat: bool = False
    """The hooked tensor is ``[batch * seq, width]``; the site's value is ``[batch, seq, width]``."""
    via: Site | None = None
    """resid_mid of a pre-norm block is read at the pre-MLP norm's input but written as
    ``resid_pre + attn_out`` through this attn_out site (editing the norm's input would not reach
    the residual stream)."""
    pre_in: Site | None = None
    """With ``via``: where that write reads ``resid_pre``, the input of a module the block's code calls
    with it (its input norm), so that every edit of ``resid_pre`` is in it, whenever it was registered."""

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {type(self.module).__name__}:{self.io})"


def candidate_site(model: nn.Module, layer: int, kind: str, layout: Layout | None = None) -> Site:
    """Where `layout` (default: the model's) puts a block site, without asking whether a
    discovered layout has been verified. Raises :class:`SiteError` with the reason it cannot."""
    hf = unwrap(model)
    blocks = find_blocks(hf)
    lay = layout or layout_of(hf)
    block, name, order = blocks[layer], f"blocks.{layer}.{kind}", (layer, KINDS.index(kind))
    if kind == "hook_resid_pre":
        return Site(name, block, "input", layer, order, block)
    if kind == "hook_resid_post":
        return Site(name, block, "output", layer, order, block)
    loc = lay.where(kind)
    path, _, io = (loc or "").partition(":")
    mod = submodule(block, path) if loc else None
    if mod is None:
        raise refusal(hf, layer, kind, lay.refused.get(kind) or f"expected module {path!r} inside the block, but "
                      "it is not there", lay)
    scale = None
    if lay.scale and kind in ("hook_attn_out", "hook_mlp_out"):
        scale = float(getattr(hf.config, lay.scale))
        scale = None if scale == 1.0 else scale
    site = Site(name, mod, io or "output", layer, order, block, scale=scale, flat=kind in lay.flat)
    if kind == "hook_resid_mid" and io == "input":
        first = submodule(block, lay.resid_in) if lay.resid_in else None
        if first is None:
            raise refusal(hf, layer, kind, "it is written as resid_pre + attn_out, and no module of the block is "
                          f"known to read resid_pre (expected {lay.resid_in!r})", lay)
        site = replace(site, via=candidate_site(hf, layer, "hook_attn_out", lay),
                       pre_in=Site(f"{name}:resid_pre", first, "input", layer, (layer, 0), block))
    return site


def refusal(model: nn.Module, layer: int, kind: str, why: str, layout: Layout | None = None) -> SiteError:
    """The one-line error for a block site this model cannot give: which, why, and what to use instead."""
    hf = unwrap(model)
    lay = layout or layout_of(hf)
    path, blocks = blocks_path(hf)
    block = blocks[layer]
    mtype = getattr(getattr(hf, "config", None), "model_type", None)
    if kind == "hook_resid_mid" and lay.parallel:
        alt = f"use 'blocks.{layer}.hook_resid_pre' plus 'blocks.{layer}.hook_attn_out' instead"
    else:
        child = next((n for n, _ in block.named_children()), "")
        alt = (f"interp.site_names(model) lists the sites it has; a raw module path such as "
               f"'{path}.{layer}{'.' + child if child else ''}' reads any module")
        if lay.discovered:
            alt += f", and a Layout for {mtype!r} in interp.layouts.LAYOUTS gives the block sites"
    return SiteError(f"site 'blocks.{layer}.{kind}' is refused on {type(block).__name__} (model type {mtype!r}): "
                     f"{why}; {alt}")


_BOUNDARIES = ("hook_resid_pre", "hook_resid_post")
"""The block's own input and output: given even where the check cannot run a forward pass."""

_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> its LayoutCheck, for models whose layout was discovered rather than listed."""


def _check(hf: nn.Module):
    """The verified sites of a discovered layout (the check runs once per model)."""
    got = _CHECKED.get(hf)
    if got is None:
        from interp.layout_check import LayoutCheck, check_layout

        try:
            got = check_layout(hf)
        except SiteError as exc:  # no forward pass to check with: only the block boundaries are given
            n = len(find_blocks(hf))
            inside = [k for k in KINDS if k not in _BOUNDARIES]
            got = LayoutCheck(accepted=tuple(f"blocks.{i}.{k}" for i in range(n) for k in _BOUNDARIES),
                              errors={}, parallel=None, why_not_parallel=str(exc),
                              refused={f"blocks.{i}.{k}": str(refusal(hf, i, k, str(exc))) for i in range(n)
                                       for k in inside})
        try:
            _CHECKED[hf] = got
        except TypeError:  # not weakly referenceable: check again next time
            pass
    return got


def site_names(model: nn.Module) -> list[str]:
    """Every block-site name this model accepts, in forward order: exactly what :func:`resolve`,
    ``capture`` and ``intervene`` accept (sites of an unlisted family only once verified)."""
    hf = unwrap(model)
    n = len(find_blocks(hf))
    lay = layout_of(hf)
    verified = set(_check(hf).accepted) if lay.discovered else None
    names = []
    for layer in range(n):
        for kind in KINDS:
            name = f"blocks.{layer}.{kind}"
            if verified is not None and name not in verified:
                continue
            try:
                candidate_site(hf, layer, kind, lay)
            except SiteError:
                continue
            names.append(name)
    return names


def resolve(model: nn.Module, name: str | Site) -> Site:
    """Resolve a site name on `model`; raises :class:`SiteError` naming the closest valid names,
    or why a block site this model's family cannot give is refused."""
    if isinstance(name, Site):
        return name
    if not isinstance(name, str):
        raise SiteError(f"a site is a string such as 'blocks.6.hook_resid_post'; got {type(name).__name__}: {name!r}")
    hf = unwrap(model)
    m = _SITE_RE.match(name)
    if m is None:
        return _resolve_module_path(hf, name)
    blocks = find_blocks(hf)
    layer, kind = int(m.group(1)), m.group(2)
    if layer >= len(blocks):
        raise SiteError(
            f"site {name!r}: layer {layer} does not exist; this model has {len(blocks)} blocks "
            f"(layers 0..{len(blocks) - 1}). Closest: {closest(name, site_names(hf))}"
        )
    lay = layout_of(hf)
    if lay.discovered:
        refused = _check(hf).refused.get(name)
        if refused is not None:
            raise SiteError(refused)
    return candidate_site(hf, layer, kind, lay)


def _resolve_module_path(hf: nn.Module, name: str) -> Site:
    try:
        blocks = find_blocks(hf)
    except SiteError:  # no single stack (encoder-decoder): the path is read wherever it is, with no early stop
        blocks = nn.ModuleList()
    path, _, io = name.partition(":")
    io = io or "output"
    if io not in ("input", "output"):
        raise SiteError(f"site {name!r}: the part after ':' must be 'input' or 'output', got {io!r}")
    mod = submodule(hf, path) if path else None
    if mod is None:
        mod_names = [n for n, _ in hf.named_modules() if n]
        blocks_names = site_names(hf) if len(blocks) else []
        raise SiteError(
            f"unknown site {name!r}: neither a block site like 'blocks.6.hook_resid_post' nor a module "
            f"of {type(hf).__name__}. Closest valid names: {closest(path, blocks_names + mod_names)}"
        )
    layer = None
    for i, block in enumerate(blocks):
        if mod is block or any(mod is m for m in block.modules()):
            layer = i
            break
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    if layer is not None:
        order = (layer, len(KINDS))  # somewhere inside the block: stop only after the block
    elif mod is emb:
        order = (-1, 0)
    else:
        order = (1 << 30, 0)
    return Site(name, mod, io, layer, order, blocks[layer] if layer is not None else None)


# ---------------------------------------------------------------------------------------------
# Hooks. Every hook this project registers goes through these two functions and is removed by
# its handle alone: transformers registers hooks of its own (output_hidden_states) that must live.
# ---------------------------------------------------------------------------------------------

def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise SiteError("expected the hooked module to produce a tensor or a tuple starting with one, got "
                    f"{type(value).__name__}")


def _input_tensor(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise SiteError("the hooked module was called without a tensor input")


def _replace_output(output, new):
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:]) if isinstance(output, tuple) else [new, *output[1:]]


def _replace_input(args, kwargs, new):
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    key = "hidden_states" if isinstance(kwargs.get("hidden_states"), torch.Tensor) else next(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: new}


def _shape_keeper(site: Site) -> tuple[list, dict]:
    """For a flat site: a pre-hook on its block that keeps the block's ``(batch, seq)``."""
    shape: dict[str, tuple[int, int]] = {}
    if not site.flat:
        return [], shape

    def keep(_m, args, kwargs):
        shape["bs"] = tuple(_input_tensor(args, kwargs).shape[:2])

    return [site.block.register_forward_pre_hook(keep, with_kwargs=True)], shape


def _value(site: Site, raw: torch.Tensor, shape: dict) -> torch.Tensor:
    """The site's value from the hooked tensor: unflattened, times the residual multiplier."""
    if site.flat and raw.dim() == 2 and "bs" in shape:
        raw = raw.view(*shape["bs"], raw.shape[-1])
    return raw * site.scale if site.scale is not None else raw


def add_read_hook(site: Site, fn: Callable[[torch.Tensor], None]) -> list:
    """Call ``fn(value)`` each time the site is reached. Returns the hook handles.

    ``value`` may be the model's own tensor: copy it before keeping it (the model may modify it in
    place later in the same forward pass, as Falcon does with its MLP output)."""
    handles, shape = _shape_keeper(site)
    if site.io == "output":
        handles.append(site.module.register_forward_hook(
            lambda _m, _a, out: fn(_value(site, _first_tensor(out), shape))))
    else:
        handles.append(site.module.register_forward_pre_hook(
            lambda _m, args, kwargs: fn(_value(site, _input_tensor(args, kwargs), shape)), with_kwargs=True))
    return handles


def add_write_hook(site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Replace the site's value by ``fn(value)``; ``fn`` must return a new tensor (or the same
    object to leave the forward pass untouched, bitwise). Returns the hook handles.

    A resid_mid write sees every edit of its block's resid_pre (any pre-hook of the block) and every
    attn_out edit made here, whichever was registered first: they come before it in the forward pass."""
    if site.via is not None:  # resid_mid of a pre-norm block: written as resid_pre + attn_out
        state: dict[str, torch.Tensor] = {}

        def keep_pre(_m, args, kwargs):
            state["pre"] = _input_tensor(args, kwargs)

        def through_attn(attn: torch.Tensor) -> torch.Tensor:
            mid = state["pre"] + attn
            new = fn(mid)
            return attn if new is mid else attn + (new - mid)

        # First among the hooks of a module the block's code calls with resid_pre: after the block's own
        # pre-hooks (resid_pre edits, registered before or after this one), before any edit of that module's input.
        keep = site.pre_in.module.register_forward_pre_hook(keep_pre, with_kwargs=True, prepend=True)
        handles = _register_write(site.via, through_attn)
        _VIA[site.via.module] = [*_live(_VIA.get(site.via.module, [])), handles[-1]]
        return [keep, *handles]
    handles = _register_write(site, fn)
    if site.io == "output":
        _keep_via_last(site.module)
    return handles


_VIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""attn_out module -> handles of the resid_mid writes made through its output, which run after every
other write there (an attn_out edit comes before resid_mid in the forward pass)."""


def _live(handles: list) -> list:
    return [h for h in handles if hooks_alive([h])]


def _keep_via_last(module: nn.Module) -> None:
    """Move the resid_mid writes through this module's output behind the others, in their own order."""
    for h in _live(_VIA.get(module, [])):
        h.hooks_dict_ref().move_to_end(h.id)


def _register_write(site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> list:
    handles, shape = _shape_keeper(site)

    def edited(raw: torch.Tensor) -> torch.Tensor | None:
        old = _value(site, raw, shape)
        new = fn(old)
        if new is old:
            return None
        if site.scale is not None:  # add the change, so that the model's own product is kept exactly
            new = raw + ((new - old) / site.scale).reshape(raw.shape)
        return new.reshape(raw.shape) if site.flat else new

    if site.io == "output":
        def out_hook(_m, _a, out):
            new = edited(_first_tensor(out))
            return None if new is None else _replace_output(out, new)
        handles.append(site.module.register_forward_hook(out_hook))
        return handles

    def in_hook(_m, args, kwargs):
        new = edited(_input_tensor(args, kwargs))
        return None if new is None else _replace_input(args, kwargs, new)
    handles.append(site.module.register_forward_pre_hook(in_hook, with_kwargs=True))
    return handles


def remove_hooks(handles: list) -> None:
    """Remove exactly these handles (never ``_forward_hooks.clear()``)."""
    for h in handles:
        h.remove()
    handles.clear()
