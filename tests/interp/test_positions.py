"""One positions grammar: every form picks the same columns through capture, intervene and the YAML
runner, checked against columns computed from the prompt strings (the byte tokenizer has one token
per character and no BOS, so character i of a prompt sits at column pad + i)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import byte_tokenizer, tiny_model

from interp import InputError, Positions, capture, intervene
from interp.capture import tokenize
from interp.edits import Steer
from interp.features.items import build_prompts, item_activations
from interp.positions import as_positions, chars, token
from interp.runner import resolve_positions

SITE = "blocks.0.hook_resid_post"
TEXTS = ["Today is Monday.", "On Monday we met again"]


def _find(sub, end=False):
    return lambda t: [t.index(sub) + (len(sub) - 1 if end else 0)]


# id: (python form, YAML text or None, columns per row as character indices or a function of (seq, pads),
#      capture output kind)
CASES = {
    "all": (None, "all", lambda t: list(range(len(t))), "all"),
    "last": ("last", "last", lambda t: [len(t) - 1], "one"),
    "int": (3, "3", "abs:[3]", "cols"),
    "list": ([0, -1], "[0, -1]", "abs:[0, -1]", "cols"),
    "per_row": ([[1, 2], [3, 4]], "[[1, 2], [3, 4]]", "abs:[[1, 2], [3, 4]]", "cols"),
    "ragged": ([[1, 2], [3]], "[[1, 2], [3]]", "abs:[[1, 2], [3]]", "flat"),
    "int_tensor": (torch.tensor([[1], [4]]), None, "abs:[[1], [4]]", "cols"),
    "slice": (slice(2, 5), "{slice: [2, 5]}", "abs:[2, 3, 4]", "cols"),
    "slice_open": ({"slice": [-3, None]}, "{slice: [-3, null]}", "abs:[-3, -2, -1]", "cols"),
    "mask": ("mask", None, "abs:[[2, 5], [1]]", "flat"),
    "token": ({"token": "M"}, "{token: M}", _find("M"), "one"),
    "token_run": (token(" Monday"), "{token: ' Monday'}", _find(" Monday", end=True), "one"),
    "token_per_row": ({"token": ["T", "w"]}, "{token: [T, w]}", lambda t: [t.index("T" if t[0] == "T" else "w")],
                      "one"),
    "chars": (chars(3, 6), "{chars: [3, 6]}", lambda t: [3, 4, 5], "flat"),
    "chars_to_end": ({"chars": [12, None]}, "{chars: [12, null]}", lambda t: list(range(12, len(t))), "flat"),
}


@pytest.fixture(params=["left", "right"])
def side(request):
    tok = byte_tokenizer()
    old = tok.padding_side
    tok.padding_side = request.param
    yield request.param
    tok.padding_side = old


def _layout():
    batch = tokenize(byte_tokenizer(), TEXTS)
    seq = batch["input_ids"].shape[1]
    pads = [int((batch["attention_mask"][i] == 0).sum()) if byte_tokenizer().padding_side == "left" else 0
            for i in range(len(TEXTS))]
    return batch, seq, pads


def _expected(where, seq, pads) -> list[list[int]]:
    """Absolute columns per row, from the prompt strings (or given as absolute columns)."""
    if isinstance(where, str):
        cols = yaml.safe_load(where[4:])
        cols = cols if isinstance(cols[0], list) else [cols] * len(TEXTS)
        return [[c % seq for c in row] for row in cols]
    return [[pads[i] + c for c in where(t)] for i, t in enumerate(TEXTS)]


def _form(form, seq):
    if isinstance(form, str) and form == "mask":
        m = torch.zeros(len(TEXTS), seq, dtype=torch.bool)
        m[0, [2, 5]] = m[1, 1] = True
        return m
    return form


def _changed(form, tokenizer=None) -> set[tuple[int, int]]:
    model, tok = tiny_model("llama"), byte_tokenizer()
    base = capture(model, TEXTS, SITE, tokenizer=tok)[SITE]
    with intervene(model, {SITE: Steer(torch.ones(base.shape[-1]), 1.0)}, positions=form, tokenizer=tokenizer):
        got = capture(model, TEXTS, SITE, tokenizer=tok)[SITE]
    return {tuple(x) for x in (got != base).any(-1).nonzero().tolist()}


@pytest.mark.parametrize("case", list(CASES))
def test_each_form_picks_the_same_columns_in_capture_intervene_and_runner(case, side):
    py, yml, where, kind = CASES[case]
    model, tok = tiny_model("llama"), byte_tokenizer()
    batch, seq, pads = _layout()
    form = _form(py, seq)
    cols = _expected(where, seq, pads)
    real = batch["attention_mask"].bool()
    want = {(i, c) for i, row in enumerate(cols) for c in row if real[i, c]}

    full = capture(model, TEXTS, SITE, tokenizer=tok)[SITE]
    got = capture(model, TEXTS, SITE, positions=form, tokenizer=tok)[SITE]
    if kind == "all":
        assert torch.equal(got, full)
    elif kind == "one":
        assert all(len(r) == 1 for r in cols)
        assert torch.equal(got, full[torch.arange(len(TEXTS)), [r[0] for r in cols]])
    elif kind == "cols":
        assert torch.equal(got, torch.stack([full[i, r] for i, r in enumerate(cols)]))
    else:
        assert torch.equal(got, torch.cat([full[i, r] for i, r in enumerate(cols)]))

    assert _changed(form, tokenizer=tok) == want  # intervene: only the selected real columns change
    spec = yaml.safe_load(yml) if yml is not None else form
    bound = resolve_positions(spec, [{"text": t} for t in TEXTS], batch, tok)
    assert _changed(bound) == want  # the runner binds the spec to the batch; no tokenizer needed after


def test_helpers_and_dicts_are_the_same_form():
    batch, _, _ = _layout()
    tok = byte_tokenizer()
    for helper, d in [(token(" Monday"), {"token": " Monday"}), (chars(3, 6), {"chars": [3, 6]})]:
        a = helper.bind(batch["input_ids"], batch["attention_mask"], tokenizer=tok)
        b = Positions(d).bind(batch["input_ids"], batch["attention_mask"], tokenizer=tok)
        assert a.kind == b.kind and torch.equal(a.value, b.value)
    assert as_positions({"slice": [2, 5]}).value == as_positions(slice(2, 5)).value
    assert as_positions("all").is_all and as_positions(None).is_all


def test_fields_in_a_token_string_are_filled_per_row():
    batch, _, _ = _layout()
    tok = byte_tokenizer()
    rows = [{"text": t, "day": "Monday"} for t in TEXTS]
    filled = resolve_positions({"token": " {day}"}, rows, batch, tok)
    plain = resolve_positions({"token": " Monday"}, rows, batch, tok)
    assert torch.equal(filled.value, plain.value)
    with pytest.raises(InputError, match="names field 'month', which row 0 lacks"):
        resolve_positions({"token": " {month}"}, rows, batch, tok)


def test_not_found_names_the_row_and_string_in_one_line(side):
    model, tok = tiny_model("llama"), byte_tokenizer()
    with pytest.raises(InputError, match=r"row 1 .* no token whose text is exactly 'T'") as e:
        capture(model, TEXTS, SITE, positions={"token": "T"}, tokenizer=tok)
    assert "\n" not in str(e.value)
    edit = intervene(model, {SITE: Steer(torch.ones(32), 1.0)}, positions=token(" Friday"), tokenizer=tok)
    with pytest.raises(InputError, match=r"row 0 .*' Friday'"), edit:
        capture(model, TEXTS, SITE, tokenizer=tok)
    with pytest.raises(InputError, match=r"covers no token of row 0") as e:
        capture(model, TEXTS, SITE, positions={"chars": [18, 20]}, tokenizer=tok)
    assert "\n" not in str(e.value)


def test_chars_refuses_a_slow_tokenizer_and_token_works_with_one():
    from transformers import ByT5Tokenizer

    model, slow = tiny_model("llama"), ByT5Tokenizer()
    assert not slow.is_fast
    with pytest.raises(InputError, match="only fast tokenizers.*ByT5Tokenizer") as e:
        capture(model, TEXTS, SITE, positions={"chars": [0, 2]}, tokenizer=slow)
    assert "\n" not in str(e.value)
    full = capture(model, TEXTS, SITE, tokenizer=slow)[SITE]  # byte tokens (+3), EOS appended, right padding
    got = capture(model, TEXTS, SITE, positions={"token": "M"}, tokenizer=slow)[SITE]
    assert torch.equal(got, full[[0, 1], [TEXTS[0].index("M"), TEXTS[1].index("M")]])


def test_text_selectors_need_a_tokenizer_and_token_ids():
    model = tiny_model("llama")
    batch, _, _ = _layout()
    with pytest.raises(InputError, match="tokenizer"):
        capture(model, batch["input_ids"], SITE, positions={"token": "M"})
    with pytest.raises(InputError, match="tokenizer"):
        intervene(model, {SITE: Steer(torch.ones(32), 1.0)}, positions=chars(0, 1))
    # token ids without the text: chars offsets come from the decoded ids
    full = capture(model, batch, SITE)[SITE]
    got = capture(model, batch, SITE, positions=chars(3, 5), tokenizer=byte_tokenizer())[SITE]
    assert torch.equal(got, full[[0, 0, 1, 1], [3, 4, 3, 4]])


@pytest.mark.parametrize("bad", ["first", {"chars": [5, 2]}, {"chars": [-1, 2]}, {"token": ""}, {"slice": "ab"},
                                 {"tokens": " Monday"}, {"token": " a", "chars": [0, 1]}, [1.5], True])
def test_bad_forms_are_one_line_errors(bad):
    with pytest.raises(InputError) as e:
        as_positions(bad)
    assert "\n" not in str(e.value) and "positions" in str(e.value)


def test_token_selector_under_generate_edits_the_prompt_column_only():
    model, tok = tiny_model("llama"), byte_tokenizer()
    batch = tokenize(tok, TEXTS)
    seen: list[tuple[int, int]] = []

    def record(x, ctx):
        seen.extend(zip(ctx.batch_idx.tolist(), ctx.pos.tolist()))
        return x

    with intervene(model, {SITE: record}, positions={"token": " Monday"}, tokenizer=tok):
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=258)
    assert sorted(seen) == [(0, TEXTS[0].index(" Monday") + 6), (1, TEXTS[1].index(" Monday") + 6)]


def test_item_activations_reads_the_item_inside_the_prompt():
    model, tok = tiny_model("llama"), byte_tokenizer()
    items, templates = ["Mon", "Tue", "Wed"], ["On {} we met", "The {} meeting ran long"]
    acts, labels, _ = item_activations(model, tok, items, templates, [SITE], positions={"token": " {item}"})
    prompts, _, _ = build_prompts(items, templates, item_last=False)
    full = capture(model, prompts, SITE, tokenizer=tok)[SITE]
    cols = [p.index(" " + it) + len(it) for p, it in zip(prompts, labels)]
    assert torch.equal(acts[SITE], full[torch.arange(len(prompts)), cols])
    with pytest.raises(InputError, match="one token per prompt"):
        item_activations(model, tok, items, templates, [SITE], positions=[0, 1])
    with pytest.raises(InputError, match=r"positions=\{'token': ' \{item\}'\}"):
        item_activations(model, tok, items, templates, [SITE])
    spans = [[p.index(" " + it) + 1, p.index(" " + it) + 1 + len(it)] for p, it in zip(prompts, labels)]
    by_chars, _, _ = item_activations(model, tok, items, templates, [SITE], positions={"chars": spans})
    assert torch.equal(by_chars[SITE], acts[SITE])  # the span's last token: the item's last character
    last, _, _ = item_activations(model, tok, items, ["I saw {}"], [SITE])
    col, _, _ = item_activations(model, tok, items, ["I saw {}"], [SITE], positions=-1)
    assert torch.equal(last[SITE], col[SITE]) and last[SITE].shape == (3, 32)
