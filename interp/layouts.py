"""Where each block site lives inside a transformer block, per model family: architecture support as data.

Every layout here satisfies the block algebra, exactly up to float rounding, on a tiny model of its
family (``tests/interp/test_families.py`` runs :func:`interp.layout_check.check_layout` on each):

=================  ====================================================================================
sequential         ``resid_mid = resid_pre + attn_out``; ``resid_post = resid_mid + mlp_out``
parallel           ``resid_post = resid_pre + attn_out + mlp_out`` (no ``resid_mid``)
post-norm          ``resid_mid = norm_1(resid_pre + attn_out)``; ``resid_post = norm_2(resid_mid + mlp_out)``
=================  ====================================================================================

``attn_out`` and ``mlp_out`` are what is added to the residual stream: after any output norm
(Gemma 2/3, OLMo 2/3) and residual multiplier (Granite). A family whose blocks cannot give a site
says why in ``refused``. A model type that is not listed gets a layout discovered from its blocks'
child names, and :mod:`interp.sites` only accepts the sites of a discovered layout that
:func:`interp.layout_check.check_layout` verifies on the model itself.

The blocks themselves are found here too (:func:`find_blocks`: the largest ModuleList of identical
modules), through a TransformerLens ``TransformerBridge`` when one wraps the model (:func:`unwrap`).
An encoder-decoder model has two such stacks; its block sites are refused, and raw module paths
name either stack.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from interp.errors import SiteError

KINDS = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
"""Block sites in the order the forward pass reaches them."""

RESIDUAL_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
"""Block sites whose width is ``d_model`` (everything but the MLP neurons)."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where the sites live inside one block, as module paths relative to the block.

    A location is ``"path"`` (that module's output) or ``"path:input"`` (its first input), the
    same grammar as raw module sites.
    """

    attn_out: str | None
    """What attention adds to the residual stream."""
    mlp_out: str | None
    """What the MLP adds to the residual stream."""
    mlp_post: str | None
    """The MLP neurons: the input of the MLP's output projection."""
    resid_mid: str | None
    """``"path:input"`` of a module that reads the stream between attention and MLP (a pre-MLP norm;
    written as ``resid_pre + attn_out`` through ``attn_out``), or ``"path"`` of a module whose output
    is that stream (read and written there). None for parallel blocks."""
    resid_in: str | None = None
    """A module whose first input is ``resid_pre`` as the block's own code receives it (after every
    pre-hook on the block has run): the input norm, or the attention where nothing comes before it. A
    ``"path:input"`` resid_mid is written as ``resid_pre + attn_out`` with ``resid_pre`` read there."""
    parallel: bool | None = False
    """Attention and MLP both read ``resid_pre``; the block adds both outputs to it. None: not known from
    the child names (a discovered layout with no pre-MLP norm); :func:`check_layout` tells by steering
    attention and reading the MLP's input, and checks ``resid_post = resid_pre + attn_out + mlp_out``,
    which holds either way."""
    scale: str | None = None
    """Config attribute that multiplies the attention and MLP outputs before they are added to the
    residual stream (Granite's ``residual_multiplier``); ``attn_out``/``mlp_out`` include it."""
    post_norms: tuple[str, str] | None = None
    """Post-norm blocks (BERT, OPT-350m): the norms applied after the attention and the MLP residual adds."""
    flat: tuple[str, ...] = ()
    """Kinds whose tensors arrive flattened to ``[batch * seq, width]`` (OPT runs its MLP that way);
    they are read and written as ``[batch, seq, width]``."""
    refused: Mapping[str, str] = field(default_factory=dict)
    """Kind -> why the family cannot give it: used where the kind has no location, or where a
    block lacks the module (a mixture-of-experts layer has no single output projection)."""
    discovered: bool = False
    """Found from child names rather than listed: trusted only where :func:`check_layout` verifies it."""

    def where(self, kind: str) -> str | None:
        """The location of a kind other than ``hook_resid_pre``/``hook_resid_post`` (None: refused)."""
        return {"hook_attn_out": self.attn_out, "hook_mlp_out": self.mlp_out, "mlp.hook_post": self.mlp_post,
                "hook_resid_mid": self.resid_mid}[kind]


_PARALLEL = ("attention and MLP both read resid_pre in this family's blocks (parallel residual), so there is "
             "no residual stream between them")
_MOE = ("this block's MLP is a mixture of experts: each expert has its own output projection, so its neurons "
        "are not one [batch, seq, width] tensor")


def _parallel(lay: Layout) -> Layout:
    return replace(lay, parallel=True, resid_mid=None, refused={**lay.refused, "hook_resid_mid": _PARALLEL})


_LLAMA = Layout(attn_out="self_attn", mlp_out="mlp", mlp_post="mlp.down_proj:input",
                resid_mid="post_attention_layernorm:input", resid_in="input_layernorm")
_MOE_LLAMA = replace(_LLAMA, refused={"mlp.hook_post": _MOE})
_NORMED_OUT = Layout(attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                     mlp_post="mlp.down_proj:input", resid_mid="pre_feedforward_layernorm:input",
                     resid_in="input_layernorm")  # Gemma 2/3
# OLMo 2 normalises the outputs: attention and MLP read the stream as is
_OLMO2 = replace(_NORMED_OUT, resid_mid="mlp:input", resid_in="self_attn")
_GPT2 = Layout(attn_out="attn", mlp_out="mlp", mlp_post="mlp.c_proj:input", resid_mid="ln_2:input", resid_in="ln_1")
_GPTJ = _parallel(Layout(attn_out="attn", mlp_out="mlp", mlp_post="mlp.fc_out:input", resid_mid=None))
_BERT = Layout(attn_out="attention.output.dense", mlp_out="output.dense", mlp_post="output.dense:input",
               resid_mid="attention", post_norms=("attention.output.LayerNorm", "output.LayerNorm"))


def _gpt_neox(cfg) -> Layout:
    lay = Layout(attn_out="post_attention_dropout", mlp_out="post_mlp_dropout", mlp_post="mlp.dense_4h_to_h:input",
                 resid_mid="post_attention_layernorm:input", resid_in="input_layernorm")
    return _parallel(lay) if getattr(cfg, "use_parallel_residual", True) else lay


def _stablelm(cfg) -> Layout:
    lay = Layout(attn_out="self_attn", mlp_out="dropout", mlp_post="mlp.down_proj:input",
                 resid_mid="post_attention_layernorm:input", resid_in="input_layernorm")
    return _parallel(lay) if getattr(cfg, "use_parallel_residual", False) else lay


def _falcon(cfg) -> Layout:
    lay = Layout(attn_out="self_attention", mlp_out="mlp", mlp_post="mlp.dense_4h_to_h:input",
                 resid_mid="post_attention_layernorm:input", resid_in="input_layernorm")
    parallel = getattr(cfg, "new_decoder_architecture", False) or getattr(cfg, "parallel_attn", True)
    return _parallel(lay) if parallel else lay


def _bloom(cfg) -> Layout:
    # The attention and MLP modules return their output with the residual already added, so the
    # additions are read at their output projections and resid_mid at the attention's output.
    lay = Layout(attn_out="self_attention.dense", mlp_out="mlp.dense_4h_to_h", mlp_post="mlp.gelu_impl",
                 resid_mid="self_attention")
    if getattr(cfg, "apply_residual_connection_post_layernorm", False):
        why = ("with apply_residual_connection_post_layernorm=True the stream carried past each sub-layer is "
               "its normalised input, so resid_pre + attn_out + mlp_out is not resid_post")
        return replace(lay, attn_out=None, resid_mid=None, mlp_out=None,
                       refused={k: why for k in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out")})
    if getattr(cfg, "pretraining_tp", 1) > 1 and getattr(cfg, "slow_but_exact", False):
        why = ("with slow_but_exact=True and pretraining_tp > 1 the output projections are computed slice by "
               "slice without calling their modules")
        return replace(lay, attn_out=None, mlp_out=None, refused={k: why for k in ("hook_attn_out", "hook_mlp_out")})
    return lay


def _opt(cfg) -> Layout:
    flat = ("mlp.hook_post", "hook_mlp_out")
    if getattr(cfg, "do_layer_norm_before", True):
        return Layout(attn_out="self_attn", mlp_out="fc2", mlp_post="fc2:input", resid_mid="final_layer_norm:input",
                      resid_in="self_attn_layer_norm", flat=(*flat, "hook_resid_mid"))
    return Layout(attn_out="self_attn", mlp_out="fc2", mlp_post="fc2:input", resid_mid="self_attn_layer_norm",
                  post_norms=("self_attn_layer_norm", "final_layer_norm"), flat=flat)


LAYOUTS: dict[str, Layout | Callable[[object], Layout]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "smollm3"), _LLAMA),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), _MOE_LLAMA),
    "granite": replace(_LLAMA, scale="residual_multiplier"),
    "starcoder2": replace(_LLAMA, mlp_post="mlp.c_proj:input"),
    "gemma2": _NORMED_OUT,
    "gemma3_text": _NORMED_OUT,
    "olmo2": _OLMO2,
    "olmo3": _OLMO2,
    "phi3": Layout(attn_out="resid_attn_dropout", mlp_out="resid_mlp_dropout", mlp_post="mlp.down_proj:input",
                   resid_mid="post_attention_layernorm:input", resid_in="input_layernorm"),
    "phi": _parallel(Layout(attn_out="self_attn", mlp_out="mlp", mlp_post="mlp.fc2:input", resid_mid=None)),
    "cohere": _parallel(replace(_LLAMA, resid_mid=None)),
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "gptj": _GPTJ,
    "codegen": _GPTJ,
    "gpt_neox": _gpt_neox,
    "stablelm": _stablelm,
    "falcon": _falcon,
    "bloom": _bloom,
    "opt": _opt,
    "bert": _BERT,
    "roberta": _BERT,
}
"""``config.model_type`` -> its :class:`Layout`, or a function of the config for families whose
block structure depends on it (parallel or sequential, pre- or post-norm)."""

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
    Raises :class:`SiteError` for a model with an encoder stack and a decoder stack, naming both.
    """
    return blocks_path(model)[1]


def blocks_path(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the transformer blocks inside the (unwrapped) model."""
    model = unwrap(model)
    path = _BLOCKS_PATH.get(model)
    if path is not None:
        mod = submodule(model, path) if path else model
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            return path, mod
    _refuse_two_stacks(model)
    n_expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best, best_name, best_size = None, "", -1
    for name, mod in _stacks(model):
        if n_expected is not None and len(mod) != n_expected:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best_size:
            best, best_name, best_size = mod, name, size
    if best is None:
        raise SiteError(
            f"could not find the transformer blocks of {type(model).__name__}: expected an "
            f"nn.ModuleList of {n_expected or 'N'} identical blocks; name raw module paths instead "
            "(e.g. 'model.layers.6')"
        )
    try:
        _BLOCKS_PATH[model] = best_name
    except TypeError:  # a model that cannot be weakly referenced: just do not remember
        pass
    return best_name, best


def _stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ModuleList of modules of one type, with its dotted path."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1]


def _refuse_two_stacks(model: nn.Module) -> None:
    """An encoder-decoder model has two stacks of blocks, so ``blocks.L`` would name either: refuse it."""
    found = {}
    for name, mod in _stacks(model):
        parts = name.split(".")
        for side in ("encoder", "decoder"):
            if side in parts and side not in found:
                found[side] = (name, mod)
    if len(found) < 2:
        return
    (enc, enc_list), (dec, dec_list) = found["encoder"], found["decoder"]
    raise SiteError(
        f"{type(model).__name__} has two stacks of blocks, encoder {enc!r} ({len(enc_list)} blocks) and decoder "
        f"{dec!r} ({len(dec_list)} blocks), so 'blocks.L' would not say which; name an HF module path of one "
        f"instead, such as '{enc}.0' (its output) or '{dec}.0:input'")


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path` inside `root`, or None."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


_WARNED: weakref.WeakSet = weakref.WeakSet()


def warn_if_bridged(model: nn.Module) -> None:
    """Warn once per model when TransformerLens' TransformerBridge has wrapped its blocks: the bridge
    runs attention eagerly (while the config keeps saying e.g. ``sdpa``), so activations differ
    slightly from an unwrapped copy of the same model. Nothing here changes the attention implementation."""
    hf = unwrap(model)
    try:
        blocks = find_blocks(hf)
    except SiteError:  # no single stack of blocks (raw module paths only): nothing of TransformerLens' to find
        return
    if hf in _WARNED or (hf is model and not type(blocks[0]).__module__.startswith("transformer_lens")):
        return
    impl = getattr(getattr(hf, "config", None), "_attn_implementation", None)
    warnings.warn(
        f"this {type(hf).__name__}'s blocks are wrapped by TransformerLens' TransformerBridge, which computes "
        f"attention eagerly although the config says {impl!r}: activations differ from an unwrapped copy of the "
        "model (up to ~3e-4 at the last block of a 30-layer model in fp32); give the bridge its own copy of the "
        "model to keep the original attention", RuntimeWarning, stacklevel=3)
    try:
        _WARNED.add(hf)
    except TypeError:
        pass


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_DOWN_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")
_MID_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "feedforward_layernorm", "ln_2",
                   "ffn_norm", "norm2", "norm_2")
"""Names of a norm that reads the stream between attention and MLP (a block that has both
``pre_feedforward_layernorm`` and ``post_attention_layernorm`` normalises attention's output with the latter)."""
_IN_NORM_NAMES = ("input_layernorm", "attention_layernorm", "ln_1", "norm1", "norm_1", "attention_norm",
                  "self_attn_layer_norm")
"""Names of a norm that reads ``resid_pre`` at the start of a block."""


def listed_layout(config) -> Layout | None:
    """The listed :class:`Layout` for this config's ``model_type``, or None."""
    entry = LAYOUTS.get(getattr(config, "model_type", None))
    return entry(config) if callable(entry) else entry


def discover_layout(block: nn.Module, config) -> Layout:
    """A candidate layout from a block's child names (to be verified before any site of it is trusted)."""
    names = dict(block.named_modules())
    attn = next((n for n in _ATTN_NAMES if n in names), None)
    mlp = next((n for n in _MLP_NAMES if n in names), None)
    down = next((f"{mlp}.{d}" for d in _DOWN_NAMES if mlp and f"{mlp}.{d}" in names), None)
    mid = next((n for n in _MID_NORM_NAMES if n in names), None)
    # resid_pre as the block's code reads it: its input norm, else the attention (the check verifies either)
    first = next((n for n in _IN_NORM_NAMES if n in names), attn)
    children = sorted(n for n in names if n and "." not in n)
    missing = f"its blocks' children ({children}) do not include the usual names for it"
    lay = Layout(attn_out=attn, mlp_out=mlp, mlp_post=f"{down}:input" if down else None,
                 resid_mid=f"{mid}:input" if mid else None, resid_in=first, discovered=True,
                 refused={k: missing for k, loc in (("hook_attn_out", attn), ("hook_mlp_out", mlp),
                                                    ("mlp.hook_post", down), ("hook_resid_mid", mid)) if loc is None})
    if getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False):
        return _parallel(lay)
    # No norm between attention and MLP found: parallel or sequential, the check tells.
    return lay if mid else replace(lay, parallel=None)
