"""Translate between this project's SAEs and the peers' checkpoint layouts.

Three layouts of a weights file, all read through :func:`file_tensors` (what the file must hold
for a given SAE) and :func:`module_state` (the SAE's ``state_dict`` rebuilt from the file):

* ``"interp"``: this project's own checkpoints. SAELens' tensor names and shapes
  (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, ``threshold [d_sae]``),
  so that SAELens loads them; BatchTopK's scalar threshold is written as SAELens' per-latent
  JumpReLU threshold, the form SAELens itself saves BatchTopK in.
* ``"saelens"``: files SAELens wrote; ``standard`` is ``relu`` here, ``topk`` and ``jumprelu`` keep
  their names. SAELens' TopK with ``rescale_acts_by_decoder_norm=True`` (what its training runner
  saves) multiplies the pre-activations by the decoder row norms and divides the codes by them
  again before decoding: with unit-norm rows (the runner folds the norms in before saving) that is
  the identity, so such a file loads as a plain TopK SAE; with other norms it is refused.
  SAELens' JumpReLU is ``relu(pre) * (pre > t)``, which equals this project's
  ``pre * (pre > max(t, 0))``: thresholds are clamped at 0 on import, so outputs are identical.
  SAELens' ``matching_pursuit`` is the MP-SAE here with non-negative coefficients, repeats allowed
  and unit-norm atoms; ``max_iterations``, ``residual_threshold`` and ``stop_on_duplicate_support``
  map to ``max_iterations`` (``n_steps``), ``residual_threshold`` and ``stop_on_repeated_support``. SAELens
  uses ``W_dec`` rows as they are and ours divides them by their norm, so a file whose rows are not
  unit norm is refused; SAELens has no relative stopping rule, so an SAE with ``residual_fraction``
  is written under this project's name. One edge differs: SAELens always takes a first step, ours takes none when
  the centred input's norm is already below ``residual_threshold`` (never with the threshold at 0).
* ``"sparsify"``: EleutherAI sparsify's ``<hookpoint>/cfg.json`` + ``sae.safetensors`` with
  ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec``, ``b_dec``. Its encoder is
  ``topk(relu((x - b_dec) @ W_enc + b_enc))``: a TopK SAE here. Its trainer writes one such
  folder per hookpoint under the run folder (``<hookpoint>/seed<n>`` when it trains several seeds).

A peer feature with no equivalent here (SAELens' layer-norm input normalisation, gated SAEs,
sparsify's skip connections or transcoders ...) is refused with the reason, never approximated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saes.base import REGISTRY, SAE, SAEConfig, SAEError
from saes.safetensors_check import CheckpointError

# our architecture -> SAELens' inference architecture computing the same function
SAELENS_NAMES: dict[str, str] = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                                 "mpsae": "matching_pursuit"}
# SAELens' name -> ours, for checkpoints SAELens wrote (it saves BatchTopK as JumpReLU)
FROM_SAELENS: dict[str, str] = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu",
                                "matching_pursuit": "mpsae"}
NOT_SAELENS_PREFIX = "interp."
"""Written before our name in ``cfg.json``'s ``architecture`` where SAELens would compute
something else, so SAELens refuses the file instead of loading it wrong."""
UNIT_NORM_TOL = 1e-6
"""Largest ``|row norm - 1|`` of ``W_dec`` (measured in float32) counted as unit norm: where a peer's
encoder reads the row norms and ours does not (SAELens' matching pursuit, its TopK with
``rescale_acts_by_decoder_norm``), the two agree only on unit-norm rows. Float32 renormalisation leaves
rows within about 1e-7 of 1; at 5e-5 off (the earlier bound was 1e-4), a 40-step pursuit over 500 rows
already selected different atoms in 14 rows."""
SAELENS_REQUIRED: dict[str, Any] = {"reshape_activations": "none"}
RESCALE_KEY = "rescale_acts_by_decoder_norm"
SAELENS_NORMALIZE_OK = ("none", "expected_average_only_in")
"""Values of ``normalize_activations`` that SAELens does not apply at inference."""
SAELENS_METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos",
                         "dataset_path", "neuronpedia_id")
SPARSIFY_SEED_FOLDER = re.compile(r"^seed\d+$")
"""sparsify's trainer saves ``<hookpoint>/seed<n>`` when it trains several seeds per hookpoint."""
SPARSIFY_NAMES = {"encoder.weight": "W_enc", "encoder.bias": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
"""sparsify's tensor name -> ours (``encoder.weight`` is stored transposed)."""
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}


def dtype_from_name(name: object, where: str) -> torch.dtype:
    """``"float32"`` / ``"torch.bfloat16"`` -> torch dtype, or a CheckpointError."""
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in DTYPE_NAMES:
        raise CheckpointError(f"{where}: 'dtype' is {name!r}; expected one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPE_NAMES.items():
        if dt == dtype:
            return name
    raise SAEError(f"cannot save an SAE in dtype {dtype}; use one of {sorted(DTYPE_NAMES)}")


# ------------------------------------------------------------------------- tensors in a file
def file_tensors(sae: SAE, layout: str) -> dict[str, Tensor]:
    """The tensors a weights file in ``layout`` holds for ``sae`` (names, shapes, dtypes, values)."""
    state = {k: v.detach() for k, v in sae.state_dict().items()}
    if layout == "sparsify":
        return {"encoder.weight": state["W_enc"].T, "encoder.bias": state["b_enc"],
                "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if sae.architecture == "batchtopk" and layout == "interp":
        state["threshold"] = state["threshold"].expand(sae.cfg.d_sae)
    return state


def module_state(sae: SAE, layout: str, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Inverse of :func:`file_tensors`: the ``state_dict`` to load into ``sae``."""
    if layout == "sparsify":
        return {ours: (tensors[theirs].T.contiguous() if theirs == "encoder.weight" else tensors[theirs])
                for theirs, ours in SPARSIFY_NAMES.items()}
    state = dict(tensors)
    if sae.architecture == "batchtopk" and layout == "interp":
        t = state["threshold"]
        if t.numel() and not bool((t == t[0]).all()):
            raise CheckpointError(f"{where}: tensor 'threshold' of a batchtopk SAE must repeat one value "
                                  f"(its global threshold); found values in [{t.min().item()}, {t.max().item()}]")
        state["threshold"] = t[0].clone() if t.numel() else t.new_full((), -1.0)
    if sae.architecture == "jumprelu" and layout == "saelens":
        state["threshold"] = state["threshold"].clamp_min(0)
    return state


# ------------------------------------------------------------------------- configs
def saelens_architecture(sae: SAE) -> str:
    """``architecture`` for ``cfg.json``: SAELens' name where SAELens computes exactly what ``sae``
    computes from the file's tensors, else ``"interp.<name>"`` (SAELens then refuses the file)."""
    theirs = SAELENS_NAMES.get(sae.architecture)
    if theirs is None:
        return NOT_SAELENS_PREFIX + sae.architecture
    state = sae.state_dict()
    if sae.architecture == "jumprelu" and bool((state["threshold"] < 0).any()):
        return NOT_SAELENS_PREFIX + sae.architecture  # SAELens' relu would clamp negative thresholds
    if sae.architecture == "mpsae":
        cfg = sae.cfg
        # SAELens pursues in float32 with b_dec as it is in the file: a bf16 selection, or a b_dec the SAE does not
        # use (decoder_bias=False) but the file holds, would give other codes there
        if (getattr(cfg, "coefficients", None) != "nonneg" or not getattr(cfg, "allow_repeat", False)
                or getattr(cfg, "residual_fraction", 0) > 0 or not unit_norm_rows(state["W_dec"])[0]
                or getattr(cfg, "pursuit_dtype", "float32") != "float32"
                or (not getattr(cfg, "decoder_bias", True) and bool(state["b_dec"].ne(0).any()))):
            return NOT_SAELENS_PREFIX + sae.architecture
    return theirs


def unit_norm_rows(W_dec: Tensor) -> tuple[bool, float, float]:
    """Whether every row of ``W_dec`` has norm within :data:`UNIT_NORM_TOL` of 1 (measured in
    float32), with the smallest and largest row norm."""
    norms = W_dec.detach().float().norm(dim=1)
    if norms.numel() == 0:
        return True, 1.0, 1.0
    lo, hi = norms.min().item(), norms.max().item()
    return abs(lo - 1) <= UNIT_NORM_TOL and abs(hi - 1) <= UNIT_NORM_TOL, lo, hi


def saelens_fields(cfg: SAEConfig, theirs: str) -> dict[str, Any]:
    """Per-architecture SAELens config keys (``k`` for TopK, the stopping rules of matching pursuit)
    that ``cfg.json`` holds for an SAE with config ``cfg`` saved as SAELens' ``theirs``."""
    if theirs == "topk":
        return {"k": cfg.k, RESCALE_KEY: False}
    if theirs == "matching_pursuit":
        return {"max_iterations": cfg.max_iterations or cfg.n_steps, "residual_threshold": cfg.residual_threshold,
                "stop_on_duplicate_support": cfg.stop_on_repeated_support}
    return {}


def _fields_from_saelens(cfg: dict[str, Any], theirs: str, where: str) -> dict[str, Any]:
    if theirs == "topk":
        if "k" not in cfg:
            raise CheckpointError(f"{where}: missing config key 'k' (a SAELens topk cfg.json has it)")
        return {"k": cfg["k"]}
    if theirs == "matching_pursuit":  # SAELens' defaults where a key is absent
        steps = cfg.get("max_iterations")
        return {"n_steps": cfg["d_in"] if steps is None else steps, "coefficients": "nonneg", "allow_repeat": True,
                "residual_threshold": cfg.get("residual_threshold", 1e-2),
                "stop_on_repeated_support": cfg.get("stop_on_duplicate_support", True)}
    return {}


@dataclass(frozen=True)
class Imported:
    """A peer's config translated into ours."""

    cfg: SAEConfig
    dtype: torch.dtype
    metadata: dict[str, Any]
    layout: str
    unit_decoder: str = ""
    """Why the file's ``W_dec`` rows must have unit norm to compute what ours computes (empty when
    they need not): checked by :func:`check_weights` once the tensors are read."""


def check_finite(sae: SAE, where: str) -> None:
    """Refuse an SAE holding NaN or infinite weights (one that diverged in training)."""
    for name, t in sae.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds {n} NaN or infinite values (of {t.numel()}); "
                                  "the SAE had diverged: retrain it, or use an earlier checkpoint")


def check_weights(imported: Imported, sae: SAE, where: str) -> None:
    """Refuse NaN or infinite weights, and weights that the translated config does not compute the
    same way (see ``unit_decoder``)."""
    check_finite(sae, where)
    if not imported.unit_decoder:
        return
    ok, lo, hi = unit_norm_rows(sae.W_dec)
    if not ok:
        raise CheckpointError(f"{where}: W_dec row norms are in [{lo:.7g}, {hi:.7g}], not within {UNIT_NORM_TOL:g} "
                              f"of 1; {imported.unit_decoder}")


def from_saelens(cfg: dict[str, Any], where: str) -> Imported:
    """Translate a ``cfg.json`` written by SAELens (v6 layout; pre-v6 metadata accepted) into ours."""
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing config key {key!r}; a SAELens cfg.json has "
                                  "architecture, d_in, d_sae, dtype, apply_b_dec_to_input, metadata")
    theirs = cfg["architecture"]
    if not isinstance(theirs, str) or theirs not in FROM_SAELENS or FROM_SAELENS[theirs] not in REGISTRY:
        ok = sorted(k for k, v in FROM_SAELENS.items() if v in REGISTRY)
        raise CheckpointError(f"{where}: unknown architecture {theirs!r} (no equivalent here); "
                              f"SAELens architectures this project loads: {ok}")
    for key, want in SAELENS_REQUIRED.items():
        if key in cfg and cfg[key] != want:
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} is not supported here (only {want!r}); "
                                  "it changes what the SAE computes")
    rescale = cfg.get(RESCALE_KEY, False)
    if not isinstance(rescale, bool) or (rescale and theirs != "topk"):
        raise CheckpointError(f"{where}: {RESCALE_KEY}={rescale!r} is not supported here (only false, or true "
                              f"on a topk SAE with unit-norm decoder rows); it changes what the SAE computes")
    norm = cfg.get("normalize_activations", "none")
    if norm not in SAELENS_NORMALIZE_OK:
        raise CheckpointError(f"{where}: normalize_activations={norm!r} is applied at inference by SAELens "
                              f"and has no equivalent here; supported: {list(SAELENS_NORMALIZE_OK)}")
    cls = REGISTRY[FROM_SAELENS[theirs]].config_class
    fields = {"d_model": cfg["d_in"], "d_sae": cfg["d_sae"],
              "apply_b_dec_to_input": cfg.get("apply_b_dec_to_input", True), **_fields_from_saelens(cfg, theirs, where)}
    meta = cfg.get("metadata")
    if not isinstance(meta, dict):  # pre-v6 files kept these at the top level
        meta = {k: cfg[k] for k in (*SAELENS_METADATA_KEYS, "hook_point") if k in cfg}
        if "hook_point" in meta:
            meta["hook_name"] = meta.pop("hook_point")
    return Imported(_build_cfg(cls, fields, where), dtype_from_name(cfg.get("dtype", "float32"), where),
                    dict(meta), "saelens", _unit_decoder_reason(theirs, rescale))


def _unit_decoder_reason(theirs: str, rescale: bool) -> str:
    if theirs == "topk" and rescale:
        return (f"with {RESCALE_KEY}=true SAELens rescales the pre-activations by those norms, which is the identity "
                "only at unit norm. Fold them in SAELens (sae.fold_W_dec_norm(), then "
                f"sae.cfg.{RESCALE_KEY} = False) and save_model() it again")
    if theirs == "matching_pursuit":
        return ("SAELens' matching pursuit uses the rows as they are and this project's MP-SAE divides them by their "
                "norm, so the codes would differ. Use this SAE with SAELens, or train it with unit-norm atoms")
    return ""


def sparsify_hookpoint(folder: Path) -> str:
    """The hookpoint a sparsify SAE folder belongs to: its name, or its parent's for ``<hookpoint>/seed<n>``."""
    return folder.parent.name if SPARSIFY_SEED_FOLDER.match(folder.name) else folder.name


def from_sparsify(cfg: dict[str, Any], hookpoint: str, dtype: torch.dtype, where: str) -> Imported:
    """Translate sparsify's ``cfg.json`` (a ``SparseCoderConfig`` plus ``d_in``) into a TopK config."""
    if "topk" not in REGISTRY:
        raise CheckpointError(f"{where}: sparsify SAEs load as 'topk', which is not registered here")
    for key in ("d_in", "k"):
        if key not in cfg:
            raise CheckpointError(f"{where}: missing config key {key!r}; a sparsify cfg.json has d_in, k, "
                                  "num_latents or expansion_factor")
    for key, want in {"activation": "topk", "skip_connection": False, "transcode": False}.items():
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{where}: sparsify {key}={cfg[key]!r} has no equivalent here "
                                  f"(only {key}={want!r} loads)")
    d_in, d_sae = cfg["d_in"], cfg.get("num_latents") or 0
    if not d_sae:
        factor = cfg.get("expansion_factor")
        if not isinstance(factor, int) or isinstance(factor, bool) or not isinstance(d_in, int):
            raise CheckpointError(f"{where}: num_latents is 0 and expansion_factor={factor!r}; cannot tell d_sae")
        d_sae = d_in * factor
    fields = {"d_model": d_in, "d_sae": d_sae, "k": cfg["k"], "apply_b_dec_to_input": True}
    return Imported(_build_cfg(REGISTRY["topk"].config_class, fields, where), dtype,
                    {"hook_name": hookpoint}, "sparsify")


def _build_cfg(cls: type[SAEConfig], fields: dict[str, Any], where: str) -> SAEConfig:
    try:
        return cls.from_dict(fields)
    except (SAEError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the config does not build a {cls.__name__}: {e}") from e
