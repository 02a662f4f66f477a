"""Fixtures for the probes tests: planted-feature activations and a tiny random Llama with a word tokenizer."""

from __future__ import annotations

import pytest
import torch

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
