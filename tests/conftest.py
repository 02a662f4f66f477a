"""Shared test fixtures: tiny random models of several architectures, a byte-level tokenizer, and
the embedded model (for tests marked slow). Also switches on the shape checks for the whole suite."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from jaxtyping import config, install_import_hook

CHECKED_PACKAGES = ("interp", "saes", "probes")
# Every function and dataclass of these packages is checked against its annotations (jaxtyping shapes
# and dtypes, through beartype) while the tests run, so a wrongly shaped tensor fails a test instead of
# broadcasting silently; tests/test_shape_checking.py fails if this is off. beartype is told to follow
# PEP 484's numeric tower (an int passes where the hint says float, as in `Rotate(..., scale=2)`), as
# static checkers and ruff do. pytest's --jaxtyping-packages option cannot pass a configured checker
# together with several packages, so the hook is installed here, before any test imports them.
_too_early = [p for p in CHECKED_PACKAGES if p in sys.modules]
if _too_early:
    raise RuntimeError(f"{_too_early} were imported before tests/conftest.py, so their annotations would "
                       "not be checked; import them inside tests or fixtures instead")
install_import_hook(CHECKED_PACKAGES, "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

VOCAB = 300  # 256 byte tokens + specials, see byte_tokenizer()
SPECIAL = dict(bos_token_id=256, eos_token_id=257, pad_token_id=258)

ARCHS = ("llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox", "gpt_neox_seq", "bert")
DECODERS = tuple(a for a in ARCHS if a != "bert")


def _config(arch: str):
    import transformers as tr

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, **SPECIAL)
    if arch in ("llama", "mistral", "qwen2", "phi3"):
        cls = {"llama": tr.LlamaConfig, "mistral": tr.MistralConfig, "qwen2": tr.Qwen2Config,
               "phi3": tr.Phi3Config}[arch]
        kw = dict(common, num_key_value_heads=2)
        return cls(**kw)
    if arch == "gemma2":
        return tr.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                               sliding_window=16)
    if arch == "gpt2":
        return tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=128, **SPECIAL)
    if arch.startswith("gpt_neox"):
        return tr.GPTNeoXConfig(**common, use_parallel_residual=(arch == "gpt_neox"))
    if arch == "bert":
        return tr.BertConfig(**common)
    raise ValueError(arch)


@functools.cache
def _tiny(arch: str):
    import transformers as tr

    torch.manual_seed(0)
    cfg = _config(arch)
    model = tr.BertModel(cfg) if arch == "bert" else tr.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def tiny_model(arch: str):
    """A tiny random model (cached per session; do not modify it in place)."""
    return _tiny(arch)


@functools.cache
def byte_tokenizer():
    """The library's offline byte-level tokenizer (:func:`interp.models.byte_tokenizer`), built once."""
    from interp.models import byte_tokenizer as build

    return build()


ROOT = Path(__file__).resolve().parents[1]
DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog on day {i}. " * 3 for i in range(120)]
"""Short repeated documents for the tiny model's caches (any text works; this keeps the shards small)."""


def tiny_cache(out: Path, sites, tokens: int, *, shard_tokens: int, docs=DOCS) -> Path:
    """An activation cache of the tiny llama's ``sites`` (``tokens`` tokens, 32-token contexts) at ``out``."""
    from interp.cache import cache_activations

    cache_activations(tiny_model("llama"), byte_tokenizer(), list(sites), out, tokens, dataset=docs,
                      context_size=32, shard_tokens=shard_tokens, progress=False)
    return out


def load_script(monkeypatch, path: str):
    """A script of the repository (``experiments/x.py``, ``benchmarks/x.py``) imported as a module named after its
    file, with the repository root and the script's folder on ``sys.path`` (as running it puts the folder there,
    so that it imports its siblings); all three are undone at teardown, and so are the siblings it imported that
    were not imported before."""
    folder = (ROOT / path).parent
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(folder))
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)  # removed again at teardown
    before = set(sys.modules)
    spec.loader.exec_module(mod)
    for new in set(sys.modules) - before:
        if Path(getattr(sys.modules[new], "__file__", None) or "/").parent == folder:
            monkeypatch.setitem(sys.modules, new, sys.modules.pop(new))  # removed again at teardown
    return mod


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A folder holding the tiny random Llama and the byte tokenizer (for commands that load by path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small local corpus (JSON lines): about 40k tokens of the byte tokenizer."""
    import json
    import random

    rng = random.Random(0)
    words = ("the cat sat on the mat while we met on Monday and Friday to see a dog run in the park; "
             "models read text and write numbers, then people read the numbers again").split()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))})
                              for _ in range(300)))
    return path


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M model and tokenizer (slow tests only)."""
    from interp import load_model

    return load_model("smollm2-135m", device="cpu")


# Fixtures of the probes tests: planted-feature activations and a tiny random Llama with a word tokenizer.
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = DAYS + ["the", "cat", "sat", "on", "mat", "we", "meet", "at", "noon", "see", "you", "and", "then",
                "a", "dog", "ran", "park", "def", "return", "x", "=", "(", ")", ":", "."]


def _planted(n: int = 2000, d: int = 2000, neurons=(17, 503, 1999), noise: float = 0.3, seed: int = 0,
            n_layers: int = 1, signal_layer: int = 0):
    """Activations [layer, n, d] where the label is driven by `neurons` of `signal_layer` only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_layers, n, d, generator=g) * (0.5 + torch.rand(n_layers, 1, d, generator=g)) \
        + 3 * torch.randn(n_layers, 1, d, generator=g)
    z = x[signal_layer, :, list(neurons)]
    z = (z - z.mean(0)) / z.std(0)
    y = (z.sum(1) + noise * torch.randn(n, generator=g) > 0.5).long()
    return x, y


@pytest.fixture(scope="session")
def planted():
    """make(n, d, neurons, noise, seed, n_layers, signal_layer) -> (x [layer, n, d], y [n]) with planted neurons."""
    return _planted


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(model, tokenizer, folder): a 3-layer random Llama and a whitespace word-level tokenizer, saved to disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=2, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


@contextlib.contextmanager
def _shape_checks_off():
    before = config.jaxtyping_disable
    config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        config.update("jaxtyping_disable", before)


@pytest.fixture
def unchecked():
    """``with unchecked(): ...`` runs the block without the annotation checks (see the top of this file).

    For tests of the library's own error message on a call that the annotations already reject:
    that message is what a user sees, since outside the tests nothing checks the annotations."""
    return _shape_checks_off
