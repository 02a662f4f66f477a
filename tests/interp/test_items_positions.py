"""item_activations reads each prompt's own item token: negative columns count back from each prompt's end
(not from the padded batch's end), and 'last' skips the [SEP] that BERT-style tokenizers append."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from interp import capture
from interp.errors import InputError
from interp.features.items import ITEM_SETS, TEMPLATES, build_prompts, item_activations

SITE = "blocks.0.hook_resid_post"


def _expected(model, tok, prompts, cols):
    return capture(model, prompts, [SITE], positions=[[c] for c in cols], tokenizer=tok)[SITE][:, 0]


@pytest.mark.parametrize("back", [-1, -2])
def test_negative_column_counts_from_each_prompts_end(back):
    model, tok = tiny_model("llama"), byte_tokenizer()
    days, templates = ITEM_SETS["days"], TEMPLATES["days"][:3]
    prompts, _, _ = build_prompts(days, templates)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) > 1  # right padding in the batch
    acts, _, _ = item_activations(model, tok, days, templates, [SITE], positions=back)
    torch.testing.assert_close(acts[SITE], _expected(model, tok, prompts, [n + back for n in lengths]))
    if back == -1:
        last, _, _ = item_activations(model, tok, days, templates, [SITE])
        torch.testing.assert_close(acts[SITE], last[SITE])


def test_column_past_a_prompts_start_is_refused():
    with pytest.raises(InputError, match="counts back past the start of prompt"):
        item_activations(tiny_model("llama"), byte_tokenizer(), ["Mon", "Tue", "Wed"], ["{}"], [SITE],
                         positions=-10)


def _bert_tokenizer():
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w.lower() for t in TEMPLATES["days"][:2] for w in t.replace("{}", "").split()}
        | {d.lower() for d in ITEM_SETS["days"]})
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


@pytest.mark.parametrize("positions", ["last", -1])
def test_bert_last_reads_the_item_not_sep(positions):
    model, tok = tiny_model("bert"), _bert_tokenizer()
    days, templates = ITEM_SETS["days"], TEMPLATES["days"][:2]
    prompts, _, _ = build_prompts(days, templates)
    enc = [tok(p)["input_ids"] for p in prompts]
    assert all(ids[-1] == tok.sep_token_id for ids in enc)
    cols = [len(ids) - 2 for ids in enc]  # the item, just before [SEP]
    assert all(tok.convert_ids_to_tokens(ids[c]) == d.lower() for ids, c, d in zip(enc, cols, days * 2))
    acts, _, _ = item_activations(model, tok, days, templates, [SITE], positions=positions)
    torch.testing.assert_close(acts[SITE], _expected(model, tok, prompts, cols))
    sep = _expected(model, tok, prompts, [len(ids) - 1 for ids in enc])
    assert not torch.allclose(acts[SITE], sep)
