"""First-letter absorption on planted dictionaries whose absorption is known by construction."""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError
from probes.absorption import (
    AbsorptionConfig,
    LetterData,
    first_letter_absorption,
    first_letter_prompts,
    letter_probes,
    word_tokens,
)

N_CLASSES, PER_CLASS = 4, 40


def _planted(absorbed_share: float, main_left: float = 0.0, steal: float = 1.0):
    """Words x = e_letter + 0.3 g_word (orthonormal letter directions, Gaussian word parts). The
    planted dictionary reads each word's code from a table: one main latent per letter (decoder
    e_letter, code 1 on the letter's words) and, for each absorbed word of letter "a", a latent that
    fires on that word only (code ``steal``) with the letter's direction as decoder row, while the
    main "a" latent keeps ``main_left`` there. Returns (data, encode, W_dec, expected full absorption
    rate of "a")."""
    n, d = N_CLASSES * PER_CLASS, 32
    g = torch.Generator().manual_seed(0)
    letters = torch.linalg.qr(torch.randn(d, N_CLASSES, generator=g))[0].T
    labels = torch.arange(n) // PER_CLASS
    x = letters[labels] + 0.3 * torch.randn(n, d, generator=g) / d ** 0.5
    test = torch.arange(n) % 5 < 2  # 40% held out, every letter on both sides
    absorbed = torch.randperm(PER_CLASS, generator=g)[: round(absorbed_share * PER_CLASS)].sort().values
    table = torch.zeros(n, N_CLASSES + len(absorbed))
    table[torch.arange(n), labels] = 1.0
    table[absorbed, 0] = main_left
    table[absorbed, N_CLASSES + torch.arange(len(absorbed))] = steal
    W_dec = torch.cat([letters, letters[:1].expand(len(absorbed), d)])

    def encode(v: torch.Tensor) -> torch.Tensor:
        return table[torch.cdist(v, x).argmin(1)]

    data = LetterData(x, labels, test, [f" w{i}" for i in range(n)], classes="abcd")
    return data, encode, W_dec, int(test[absorbed].sum()) / int((test & (labels == 0)).sum())


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_full_absorption_rate_is_the_planted_share(share):
    data, encode, W_dec, rate = _planted(share)
    assert 0 < rate < 1
    out = first_letter_absorption(encode, W_dec, data)
    a = out["letters"]["a"]
    assert a["n_true_positives"] == int((data.test & (data.labels == 0)).sum())  # every held-out "a" word recognised
    assert a["main_latents"] == [0]  # the word latents each cover one word: no feature split
    assert a["full_absorption_rate"] == pytest.approx(rate, abs=1e-9)
    assert a["absorption_fraction"] == pytest.approx(rate, abs=1e-9)  # absorbed words: all of it, others none
    assert a["n_full_absorption"] == round(rate * a["n_true_positives"])
    for letter in "bcd":
        got = out["letters"][letter]
        assert got["full_absorption_rate"] == 0 and got["main_latents"] == ["abcd".index(letter)]
    assert out["n_letters"] == 4 and out["skipped"] == {}
    assert out["full_absorption_rate"] == pytest.approx(rate / 4, abs=1e-9)


def test_partial_absorption_counts_in_the_fraction_only():
    data, encode, W_dec, rate = _planted(0.5, main_left=0.3, steal=0.6)
    a = first_letter_absorption(encode, W_dec, data)["letters"]["a"]
    assert a["full_absorption_rate"] == 0  # the main latent still fires on the absorbed words
    # absorbed words: the word latent carries 0.6 of the probe projection, the main one 0.3
    assert a["absorption_fraction"] == pytest.approx(rate * 0.6 / 0.9, abs=1e-6) and 0 < rate < 1


def test_a_dictionary_without_absorption_scores_zero_and_reuses_probes():
    data, encode, W_dec, _ = _planted(0.0)
    probes = letter_probes(data)
    out = first_letter_absorption(encode, W_dec, data, probes=probes)
    assert out["full_absorption_rate"] == 0 and out["absorption_fraction"] == 0 and out["mean_main_latents"] == 1


def test_letters_without_enough_recognised_words_are_skipped_with_the_reason():
    data, encode, W_dec, _ = _planted(0.25)
    out = first_letter_absorption(encode, W_dec, data, AbsorptionConfig(min_true_positives=17))
    assert out["n_letters"] == 0 and out["full_absorption_rate"] is None
    assert out["skipped"]["a"] == "16 recognised test words < 17"


def test_bad_inputs_are_one_line_errors():
    data, encode, W_dec, _ = _planted(0.25)
    with pytest.raises(InputError, match=r"W_dec must be \[d_sae, d_model=32\], got \(5, 3\)"):
        first_letter_absorption(encode, torch.zeros(5, 3), data)
    with pytest.raises(InputError, match="encode returned"):
        first_letter_absorption(lambda v: v[:, :2], W_dec, data)
    with pytest.raises(InputError, match="test marks 0 of 160"):
        none_held = LetterData(data.acts, data.labels, torch.zeros(160, dtype=torch.bool), data.words)
        first_letter_absorption(encode, W_dec, none_held)
    with pytest.raises(InputError, match="words_per_letter must be a positive integer, got 0"):
        AbsorptionConfig(words_per_letter=0)
    with pytest.raises(InputError, match="not a selection method"):
        AbsorptionConfig(method="nope")


def test_prompts_end_with_the_word_and_split_by_lowercased_word():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = ["Ġapple", "ĠApple", "Ġbanana", "Ġcherry", "Ġcar", "Ġdog", "Ġdo", "Ġx"]
    vocab = {c: i for i, c in enumerate(alphabet + words)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    found = [w for w, _ in word_tokens(tok)]
    assert found == [" apple", " Apple", " banana", " cherry", " car", " dog", " do"]  # " x": one letter
    prompts, data = first_letter_prompts(tok, AbsorptionConfig(icl_examples=2, test_fraction=0.5))
    assert [tok.decode(p[-1:]) for p in prompts] == data.words and sorted(data.words) == sorted(found)
    text = tok.decode(prompts[0])
    assert text.count(" has the first letter:") == 2 and text.endswith("\n" + data.words[0])
    assert [data.labels[data.words.index(w)].item() for w in (" apple", " Apple", " banana")] == [0, 0, 1]
    same = {w.strip().lower(): bool(t) for w, t in zip(data.words, data.test)}
    assert all(bool(t) == same[w.strip().lower()] for w, t in zip(data.words, data.test))
