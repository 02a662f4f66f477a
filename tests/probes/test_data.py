"""Probing datasets from a tiny random Llama: token labels, sequence pooling, position 0 left out."""

import pytest
import torch

import interp
from interp.errors import DataError, InputError
from probes import (
    ProbeDataset,
    aggregate_tokens,
    sequence_dataset,
    sweep,
    token_dataset,
)

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

TEXTS = ["we meet on Monday at noon", "the cat sat on the mat", "see you Friday and then Sunday",
         "a dog ran on the park", "def x ( ) : return x", "we meet at noon ."]
SITES = ["blocks.0.mlp.hook_post", "blocks.2.hook_resid_post"]


def is_day(tokens, i):
    return tokens[i].strip() in DAYS


def test_token_dataset_rows_match_capture(tiny_lm):
    model, tok, _ = tiny_lm
    ds = token_dataset(model, tok, TEXTS, SITES, label_fn=is_day, progress=False)
    n_tokens = sum(len(t.split()) - 1 for t in TEXTS)  # position 0 of each text is left out
    assert len(ds) == n_tokens == ds.acts[SITES[0]].shape[0] == len(ds.tokens)
    assert ds.acts[SITES[0]].shape[1] == 48 and ds.acts[SITES[1]].shape[1] == 32
    assert sum(ds.labels) == 3 and {t for t, lab in zip(ds.tokens, ds.labels) if lab} == {"Monday", "Friday", "Sunday"}
    full = interp.capture(model, TEXTS, SITES[1], tokenizer=tok)
    row = ds.tokens.index("Friday")
    doc, pos = int(ds.groups[row]), int(ds.positions[row])
    col = torch.nonzero(full.attention_mask[doc])[pos, 0]
    torch.testing.assert_close(ds.acts[SITES[1]][row], full[SITES[1]][doc, col], atol=1e-5, rtol=1e-5)


def test_doc_labels_and_max_per_doc(tiny_lm):
    model, tok, _ = tiny_lm
    ds = token_dataset(model, tok, TEXTS, SITES[0], doc_labels=[0, 0, 0, 0, 1, 0], max_per_doc=2, progress=False)
    assert len(ds) == 12 and sum(ds.labels) == 2
    assert ds.groups.tolist() == [g for g in range(6) for _ in range(2)]
    with pytest.raises(InputError, match="exactly one"):
        token_dataset(model, tok, TEXTS, SITES[0], progress=False)
    with pytest.raises(DataError, match="no token was labelled"):
        token_dataset(model, tok, TEXTS, SITES[0], label_fn=lambda t, i: None, progress=False)


def test_sequence_dataset_pools_real_tokens(tiny_lm):
    model, tok, _ = tiny_lm
    labels = [int(any(d in t for d in DAYS)) for t in TEXTS]
    mean = sequence_dataset(model, tok, TEXTS, labels, SITES, aggregate="mean", batch_size=4, progress=False)
    last = sequence_dataset(model, tok, TEXTS, labels, SITES, aggregate="last", progress=False)
    full = interp.capture(model, TEXTS, SITES[0], tokenizer=tok)
    expect = aggregate_tokens(full[SITES[0]], full.attention_mask, "mean", skip_first=True)
    torch.testing.assert_close(mean.acts[SITES[0]], expect, atol=1e-5, rtol=1e-5)
    first = full.attention_mask.float().argmax(1)
    row0 = full[SITES[0]][0, first[0] + 1: int(full.attention_mask[0].sum()) + first[0]].mean(0)
    torch.testing.assert_close(mean.acts[SITES[0]][0], row0, atol=1e-5, rtol=1e-5)
    assert last.tokens[0] == "noon" and last.acts[SITES[1]].shape == (6, 32)
    res = sweep(mean.acts, mean.labels, n_neurons=(1, 2), test_size=0.34, progress=False)
    assert len(res.records) == 4
    with pytest.raises(InputError, match="aggregate="):
        sequence_dataset(model, tok, TEXTS, labels, SITES, aggregate="max")


def test_features_is_a_deprecated_alias_of_acts(tiny_lm):
    model, tok, _ = tiny_lm
    ds = token_dataset(model, tok, TEXTS, SITES, label_fn=is_day, progress=False)
    with pytest.warns(DeprecationWarning, match="'features' is deprecated, use 'acts'"):
        assert ds.features is ds.acts
    with pytest.warns(DeprecationWarning, match="'features' is deprecated, use 'acts'"):
        old = ProbeDataset(features=ds.acts, labels=ds.labels, groups=ds.groups)
    assert old.acts is ds.acts and old.labels is ds.labels and old.groups is ds.groups
    with pytest.raises(InputError, match="both features= and acts="):
        ProbeDataset(features=ds.acts, acts=ds.acts, labels=ds.labels, groups=ds.groups)
    with pytest.raises(InputError, match="both features= and acts="):
        ProbeDataset(ds.acts, ds.labels, ds.groups, features=ds.acts)
    with pytest.warns(DeprecationWarning, match="'map_features' is deprecated, use 'map_acts'"):
        doubled = ds.map_features(lambda x: 2 * x)
    expected = ds.map_acts(lambda x: 2 * x)
    assert doubled.acts.keys() == expected.acts.keys()
    for site in SITES:
        torch.testing.assert_close(doubled.acts[site], expected.acts[site], atol=0, rtol=0)
