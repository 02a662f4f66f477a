"""`interp sae eval --absorption`: first-letter absorption recorded in the checkpoint and shown on the card,
on a tiny random Llama whose tokenizer has whole-word tokens that carry their first letter."""

from __future__ import annotations

import json
import string

import pytest
import torch
from cli_util import one_error_line

import saes
from interp.cli import main
from saes.card import render_card
from saes.checkpoint import read

SITE = "blocks.1.hook_resid_post"
_rng = __import__("random").Random(0)
WORDS = sorted({c + "".join(_rng.choice(string.ascii_lowercase) for _ in range(3))
                for c in "abcdef" for _ in range(30)})


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A folder with a random 3-layer Llama and a byte-level tokenizer that also has whole-word tokens
    (' aqxe', ' Aqxe' ...: 30 made-up words for each of six letters); each word's embedding holds a
    direction of its first letter, so probes can read it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = ["Ġ" + w for w in WORDS]
    vocab = {t: i for i, t in enumerate(alphabet + words + ["<pad>", "<eos>"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], bos_token_id=vocab["<eos>"])
    model = LlamaForCausalLM(cfg).eval()
    letters = torch.nn.functional.normalize(torch.randn(26, 32), dim=1)
    with torch.no_grad():
        for w in words:
            model.model.embed_tokens.weight[vocab[w]] += 3 * letters[string.ascii_lowercase.index(w[1].lower())]
    path = tmp_path_factory.mktemp("word-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_records_absorption_and_the_card_shows_it(word_model, text_file, tmp_path, capsys):
    folder = saes.save(saes.build("topk", d_model=32, d_sae=64, k=4), tmp_path / "sae",
                       metadata={"model_name": str(word_model), "hook_name": SITE, "context_size": 32})
    assert main(["sae", "eval", str(folder), "--dataset", str(text_file), "--tokens", "512", "--windows", "0",
                 "--absorption", "--absorption-words", "25", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    shown = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
    got = read(folder).training["metrics"]["absorption"]
    assert shown["absorption"]["n_words"] == got["n_words"] == 6 * 25
    assert got["config"]["words_per_letter"] == 25 and got["config"]["seed"] == 1234
    assert got["n_letters"] + len(got["skipped"]) == 26 and got["n_letters"] >= 1
    assert sum("test words start with it" in why for why in got["skipped"].values()) == 20  # letters g..z
    assert 0 <= got["full_absorption_rate"] <= 1 and 0 <= got["absorption_fraction"] <= 1
    card = render_card({SITE: read(folder)}, "me/x", plot=None)
    header = next(line for line in card.splitlines() if line.startswith("| Site"))
    assert "Absorption (full)" in header and "Absorption fraction" in header
    assert "first-letter feature absorption" in card


def test_absorption_without_word_tokens_is_one_error_line(tiny_dir, text_file, tmp_path, capsys):
    folder = saes.save(saes.build("topk", d_model=32, d_sae=64, k=4), tmp_path / "sae",
                       metadata={"model_name": str(tiny_dir), "hook_name": SITE, "context_size": 32})
    assert main(["sae", "eval", str(folder), "--dataset", str(text_file), "--tokens", "512", "--windows", "0",
                 "--absorption", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert one_error_line(err) and "no single-token words" in err
    assert "absorption" not in read(folder).training.get("metrics", {})  # nothing recorded
