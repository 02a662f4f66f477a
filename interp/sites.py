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

Where each site lives inside a block is data (:data:`LAYOUTS`, keyed by ``config.model_type``);
the list of blocks is discovered. Unknown model types fall back to discovery by child names.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from interp.errors import SiteError, closest

KINDS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
"""Block sites in the order the forward pass reaches them."""

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in KINDS) + r")$")


@dataclass(frozen=True)
class Layout:
    """Where the sites live inside one block, as module paths relative to the block."""

    attn_out: str
    """Module whose output is what attention adds to the residual stream."""
    mlp_out: str
    """Module whose output is what the MLP adds to the residual stream."""
    mlp_post: str
    """Module whose *input* is the MLP's hidden activation (the output projection)."""
    resid_mid: str | None
    """Module whose *input* is the residual stream between attention and MLP (a pre-MLP norm);
    None when the block is parallel (attention and MLP both read resid_pre)."""
    post_ln: str | None = None
    """Post-LN encoders (BERT): module whose *output* is resid_mid; resid_mid is then written there."""


_LLAMA = Layout("self_attn", "mlp", "mlp.down_proj", "post_attention_layernorm")
_GEMMA2 = Layout("post_attention_layernorm", "post_feedforward_layernorm", "mlp.down_proj",
                 "pre_feedforward_layernorm")
_BERT = Layout("attention.output.dense", "output.dense", "output.dense", None, post_ln="attention")

LAYOUTS: dict[str, Layout] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "granite")},
    "phi3": Layout("resid_attn_dropout", "resid_mlp_dropout", "mlp.down_proj", "post_attention_layernorm"),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gpt2": Layout("attn", "mlp", "mlp.c_proj", "ln_2"),
    "gpt_neox": Layout("post_attention_dropout", "post_mlp_dropout", "mlp.dense_4h_to_h",
                       "post_attention_layernorm"),
    "bert": _BERT,
    "roberta": _BERT,
}

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")
_MID_NORM_NAMES = ("post_attention_layernorm", "ln_2", "ffn_norm", "norm2")


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a wrapper (TransformerLens' TransformerBridge), else the model."""
    inner = getattr(model, "__dict__", {}).get("original_model")
    return inner if isinstance(inner, nn.Module) else model


_BLOCKS_PATH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> dotted path of its blocks, so that repeated lookups (every ``intervene`` / ``capture``
call) do not walk and size every module again."""


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the largest ModuleList of identical modules.

    Matches ``config.num_hidden_layers`` where the config has it. The path found is remembered per
    model and re-checked (still a non-empty ModuleList of one module type) on every later call.
    """
    return blocks_path(model)[1]


def blocks_path(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the transformer blocks inside the (unwrapped) model."""
    model = unwrap(model)
    path = _BLOCKS_PATH.get(model)
    if path is not None:
        mod = _child(model, path) if path else model
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            return path, mod
    n_expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best, best_name, best_size = None, "", -1
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if n_expected is not None and len(mod) != n_expected:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_name, best_size = mod, name, size
    if best is None:
        raise SiteError(
            f"could not find the transformer blocks of {type(model).__name__}: expected an "
            f"nn.ModuleList of {n_expected or 'N'} identical blocks. Name raw module paths instead "
            "(e.g. 'model.layers.6'), or open an issue with the model's class name."
        )
    try:
        _BLOCKS_PATH[model] = best_name
    except TypeError:  # a model that cannot be weakly referenced: just do not remember
        pass
    return best_name, best


def hooks_alive(handles: list) -> bool:
    """Whether every hook handle is still registered on its module (another library may have
    cleared a module's hook dicts behind our back)."""
    for h in handles:
        ref = getattr(h, "hooks_dict_ref", None)
        hooks = ref() if ref is not None else None
        if hooks is None or h.id not in hooks:
            return False
    return True


def _child(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def layout_of(model: nn.Module) -> Layout:
    """The :class:`Layout` for this model: from the table, else discovered from child names."""
    model = unwrap(model)
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype in LAYOUTS:
        return LAYOUTS[mtype]
    block = find_blocks(model)[0]
    names = dict(block.named_modules())
    attn = next((n for n in _ATTN_NAMES if n in names), None)
    mlp = next((n for n in _MLP_NAMES if n in names), None)
    down = next((f"{mlp}.{d}" for d in _DOWN_NAMES if mlp and f"{mlp}.{d}" in names), None)
    mid = next((n for n in _MID_NORM_NAMES if n in names), None)
    if attn is None or mlp is None or down is None:
        raise SiteError(
            f"model type {mtype!r} is not in interp.sites.LAYOUTS and its blocks' children "
            f"({sorted(n for n in names if n and '.' not in n)}) do not match the usual names. "
            "Residual sites blocks.L.hook_resid_pre/post still work; for the others add a Layout "
            "to interp.sites.LAYOUTS or use raw module paths."
        )
    return Layout(attn, mlp, down, mid)


def is_parallel(model: nn.Module) -> bool:
    """True when attention and MLP read the same residual (GPT-NeoX, GPT-J, Phi-2)."""
    cfg = getattr(unwrap(model), "config", None)
    return bool(getattr(cfg, "use_parallel_residual", False) or getattr(cfg, "parallel_attn", False))


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
    # resid_mid of a pre-LN sequential block is read at the pre-MLP norm's input, but written as
    # resid_pre + attn_out, so writing needs the attention-output module too.
    write_module: nn.Module | None = None

    def __repr__(self) -> str:
        return f"Site({self.name!r}, {type(self.module).__name__}:{self.io})"


def site_names(model: nn.Module) -> list[str]:
    """Every canonical block-site name this model has, in forward order."""
    n = len(find_blocks(model))
    kinds = [k for k in KINDS if not (k == "hook_resid_mid" and is_parallel(model))]
    return [f"blocks.{layer}.{k}" for layer in range(n) for k in kinds]


def resolve(model: nn.Module, name: str | Site) -> Site:
    """Resolve a site name on `model`; raises :class:`SiteError` naming the closest valid names."""
    if isinstance(name, Site):
        return name
    if not isinstance(name, str):
        raise SiteError(f"a site is a string such as 'blocks.6.hook_resid_post'; got {type(name).__name__}: {name!r}")
    hf = unwrap(model)
    blocks = find_blocks(hf)
    m = _SITE_RE.match(name)
    if m is None:
        return _resolve_module_path(hf, blocks, name)
    layer, kind = int(m.group(1)), m.group(2)
    if layer >= len(blocks):
        raise SiteError(
            f"site {name!r}: layer {layer} does not exist; this model has {len(blocks)} blocks "
            f"(layers 0..{len(blocks) - 1}). Closest: {closest(name, site_names(hf))}"
        )
    block = blocks[layer]
    order = (layer, KINDS.index(kind))
    if kind == "hook_resid_pre":
        return Site(name, block, "input", layer, order, block)
    if kind == "hook_resid_post":
        return Site(name, block, "output", layer, order, block)
    lay = layout_of(hf)

    def sub(path: str) -> nn.Module:
        mod = _child(block, path)
        if mod is None:
            raise SiteError(
                f"site {name!r}: expected module {path!r} inside {type(block).__name__} (layout for "
                f"{hf.config.model_type!r}), but it is not there. Use a raw module path instead."
            )
        return mod

    if kind == "hook_attn_out":
        return Site(name, sub(lay.attn_out), "output", layer, order, block)
    if kind == "hook_mlp_out":
        return Site(name, sub(lay.mlp_out), "output", layer, order, block)
    if kind == "mlp.hook_post":
        return Site(name, sub(lay.mlp_post), "input", layer, order, block)
    # resid_mid
    if lay.post_ln is not None:
        return Site(name, sub(lay.post_ln), "output", layer, order, block)
    if is_parallel(hf) or lay.resid_mid is None:
        raise SiteError(
            f"site {name!r}: {type(block).__name__} is a parallel-residual block (attention and MLP "
            "both read resid_pre), so there is no residual stream between them. Use "
            f"'blocks.{layer}.hook_resid_pre' plus 'blocks.{layer}.hook_attn_out' instead."
        )
    return Site(name, sub(lay.resid_mid), "input", layer, order, block, write_module=sub(lay.attn_out))


def _resolve_module_path(hf: nn.Module, blocks: nn.ModuleList, name: str) -> Site:
    path, _, io = name.partition(":")
    io = io or "output"
    if io not in ("input", "output"):
        raise SiteError(f"site {name!r}: the part after ':' must be 'input' or 'output', got {io!r}")
    mod = _child(hf, path) if path else None
    if mod is None:
        mod_names = [n for n, _ in hf.named_modules() if n]
        raise SiteError(
            f"unknown site {name!r}: neither a block site like 'blocks.6.hook_resid_post' nor a module "
            f"of {type(hf).__name__}. Closest valid names: {closest(path, site_names(hf) + mod_names)}"
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
    raise SiteError(f"expected the hooked module to produce a tensor or a tuple starting with one, got {type(value).__name__}")


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


def add_read_hook(site: Site, fn: Callable[[torch.Tensor], None]) -> list:
    """Call ``fn(value)`` each time the site is reached. Returns the hook handles."""
    if site.io == "output":
        return [site.module.register_forward_hook(lambda _m, _a, out: fn(_first_tensor(out)))]
    return [site.module.register_forward_pre_hook(
        lambda _m, args, kwargs: fn(_input_tensor(args, kwargs)), with_kwargs=True)]


def add_write_hook(site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """Replace the site's value by ``fn(value)``; ``fn`` must return a new tensor (or the same
    object to leave the forward pass untouched). Returns the hook handles."""
    if site.write_module is not None:  # resid_mid of a pre-LN block: resid_pre + attn_out
        state: dict[str, torch.Tensor] = {}

        def keep_pre(_m, args, kwargs):
            state["pre"] = _input_tensor(args, kwargs)

        def edit_attn(_m, _a, out):
            attn = _first_tensor(out)
            mid = state["pre"] + attn
            new = fn(mid)
            return None if new is mid else _replace_output(out, new - state["pre"])

        return [site.block.register_forward_pre_hook(keep_pre, with_kwargs=True),
                site.write_module.register_forward_hook(edit_attn)]
    if site.io == "output":
        def out_hook(_m, _a, out):
            old = _first_tensor(out)
            new = fn(old)
            return None if new is old else _replace_output(out, new)
        return [site.module.register_forward_hook(out_hook)]

    def in_hook(_m, args, kwargs):
        old = _input_tensor(args, kwargs)
        new = fn(old)
        return None if new is old else _replace_input(args, kwargs, new)
    return [site.module.register_forward_pre_hook(in_hook, with_kwargs=True)]


def remove_hooks(handles: list) -> None:
    """Remove exactly these handles (never ``_forward_hooks.clear()``)."""
    for h in handles:
        h.remove()
    handles.clear()
