"""Named item families (days, months) and prompts built around an item, for the supervised finders.

Each built-in prompt is a short prefix followed by the item with a leading space (" Monday"), so the
item is the last token and position 0 (an attention sink in models without BOS) is never the one read.
:func:`item_activations` captures every requested site at one token per prompt in one forward pass:
the last one by default, or a position of :mod:`interp.positions` that picks one token per prompt,
such as ``positions={"token": " {item}"}`` for templates with the item in the middle (``{item}`` is
filled per prompt with that prompt's item), or a character span per prompt ``{"chars": [[a, b], ...]}``
(read at the span's last token). ``"last"`` and negative columns count back from the end of each
prompt's own tokens (padding, and special tokens the tokenizer appends such as BERT's ``[SEP]``, are
not counted), so ``-1`` and ``"last"`` read the item on decoder and encoder models alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError
from interp.positions import PositionsArg, as_positions, last_token_index

ITEM_SETS: dict[str, list[str]] = {
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
               "October", "November", "December"],
}
"""Cyclic families, in their cyclic order."""

TEMPLATES: dict[str, list[str]] = {
    "days": ["I will see you on {}", "The meeting is on {}", "The shop is closed every {}", "We arrived last {}",
             "Let's meet next {}", "My favourite day is {}", "The deadline is this {}", "She was born on a {}",
             "The concert takes place on {}", "He always goes swimming on {}", "Today is {}",
             "The package should arrive by {}", "Our class is held on {}", "They left early on {}",
             "The market opens on {}", "It rained all day on {}"],
    "months": ["I was born in {}", "The trip is planned for {}", "The festival takes place in {}",
               "We moved house last {}", "The report is due in {}", "My favourite month is {}",
               "The season starts in {}", "They got married in {}", "School ends in {}", "It snowed a lot in {}",
               "The museum reopens in {}", "Prices went up in {}", "Her birthday is in {}", "The harvest begins in {}",
               "We will travel in {}", "The contract expires in {}"],
}
"""Prompt templates per family; ``{}`` is replaced by the item (the prompt's last word)."""

GENERIC_TEMPLATES = ["The word is {}", "I thought about {}", "Here is an example: {}", "She said {}",
                     "The answer was {}", "We talked about {}", "He wrote down {}", "Next on the list: {}"]


def resolve_items(items: str | Sequence[str]) -> tuple[list[str], list[str], str]:
    """``(items, templates, family name)`` from a family name or a comma-separated / listed set."""
    if isinstance(items, str) and items in ITEM_SETS:
        return list(ITEM_SETS[items]), list(TEMPLATES[items]), items
    names = [s.strip() for s in items.split(",")] if isinstance(items, str) else [str(s) for s in items]
    names = [s for s in names if s]
    if len(names) < 3:
        raise InputError(f"items must be one of {sorted(ITEM_SETS)} or at least 3 comma-separated items; got {items!r}")
    return names, list(GENERIC_TEMPLATES), "custom"


def build_prompts(items: Sequence[str], templates: Sequence[str], *,
                  item_last: bool = True) -> tuple[list[str], list[str], list[int]]:
    """Every template with every item: ``(prompts, item label per prompt, template index per prompt)``.

    Each template holds one ``{}`` for the item; with `item_last` (the default) it must end with it.
    """
    bad = [t for t in templates if t.count("{}") != 1 or (item_last and not t.endswith("{}"))]
    if bad and item_last:
        raise InputError(f"templates must end with a single '{{}}' (the item is read at the last token); bad: {bad}. "
                         "For an item inside the prompt, read it with positions={'token': ' {item}'}")
    if bad:
        raise InputError(f"templates must hold a single '{{}}' for the item; bad: {bad}")
    prompts, labels, tids = [], [], []
    for ti, t in enumerate(templates):
        for it in items:
            prompts.append(t.format(it))
            labels.append(it)
            tids.append(ti)
    return prompts, labels, tids


def item_activations(model, tokenizer, items: Sequence[str], templates: Sequence[str], sites: Sequence[str], *,
                     positions: PositionsArg = "last", batch_size: int = 32,
                     device: str = "cpu") -> tuple[dict[str, Float[Tensor, "n d_model"]], list[str], list[int]]:
    """Activations at the item token for every (template, item) prompt, at every site.

    `positions` picks the one token read per prompt (:mod:`interp.positions`): ``"last"`` (default;
    templates must then end with the item), ``{"token": " {item}"}`` (``{item}`` is filled per prompt
    with that prompt's item, so the item is found wherever the template puts it), ``{"chars": [a, b]}``
    or one ``[a, b]`` per prompt (in :func:`build_prompts` order: templates outer, items inner; the
    span's last token is read), or a single column. Items that the tokenizer splits into several
    tokens are read at their last token.

    ``"last"`` and negative columns count back from the end of each prompt's own text: the last token of
    the prompt is ``-1`` in every row whatever the padding side, and special tokens the tokenizer appends
    (BERT's and RoBERTa's ``[SEP]`` / ``</s>``) are not counted, so ``"last"`` reads the item, not
    ``[SEP]``. Columns ``>= 0`` count from the start of the tokenized input (a prepended ``[CLS]`` or BOS
    is column 0).

    Returns ``({site: [n, d_model]}, labels, template ids)``.
    """
    from interp.capture import capture, tokenize

    pos = as_positions(positions)
    prompts, labels, tids = build_prompts(items, templates, item_last=pos.kind == "last")
    pos = pos.fill([{"item": label} for label in labels])
    single_col = pos.kind == "cols" and pos.value.shape[1] == 1 and not pos.ragged
    if not (pos.one_per_row or single_col or pos.kind == "chars"):
        raise InputError(f"item_activations reads one token per prompt; positions={positions!r} picks several. "
                         "Use 'last', {'token': ' {item}'}, {'chars': [a, b]} or a single column")
    if single_col and pos.value.shape[0] not in (1, len(prompts)):
        raise InputError(f"positions gives {pos.value.shape[0]} per-prompt columns for {len(prompts)} prompts "
                         "(templates x items, in build_prompts order); give one column, or one per prompt")
    inputs = prompts
    if pos.kind == "chars" or pos.kind == "last" or (single_col and bool((pos.value < 0).any())):
        # one column per prompt, found here: the span's last token, or counted back from the prompt's end
        inputs = tokenize(tokenizer, prompts, return_special_tokens_mask=True)
        added = inputs.pop("special_tokens_mask", None)
        real = inputs["attention_mask"].bool()
        if pos.kind == "chars":
            mask = pos.bind(inputs["input_ids"], inputs["attention_mask"], tokenizer=tokenizer, texts=prompts).value
            cols = torch.where(mask, torch.arange(mask.shape[1]), -1).max(1).values
        else:
            ends = _prompt_ends(real, added)
            back = torch.full((len(prompts),), -1) if pos.kind == "last" else pos.value[:, 0].expand(len(prompts))
            cols = torch.where(back < 0, ends + 1 + back, back)
            starts = torch.where(real, torch.arange(real.shape[1]), real.shape[1]).min(1).values
            bad = [i for i in range(len(prompts)) if back[i] < 0 and cols[i] < starts[i]]
            if bad:
                i = bad[0]
                raise InputError(f"positions={positions!r} counts back past the start of prompt {i} "
                                 f"({prompts[i]!r}, {int(ends[i] - starts[i]) + 1} tokens); give a column "
                                 "inside every prompt")
        pos = as_positions([[int(c)] for c in cols])
        single_col = True
    acts = capture(model, inputs, list(sites), positions=pos, tokenizer=tokenizer, batch_size=batch_size,
                   device=device, dtype=torch.float32)
    return {s: acts[s][:, 0] if single_col else acts[s] for s in sites}, labels, tids


def _prompt_ends(real: Tensor, added: Tensor | None) -> Tensor:
    """Per row, the column of the prompt's last token: the last real column that is not a special token the
    tokenizer appended (``[SEP]``, ``</s>``); `added` is the tokenizer's ``special_tokens_mask``."""
    if added is None:
        return last_token_index(real)
    ends = last_token_index(real & ~added.bool())
    # a prompt of special tokens only keeps its first column
    first = torch.where(real, torch.arange(real.shape[1]), real.shape[1]).min(1).values
    return torch.where(ends >= 0, ends, torch.where(real.any(1), first, -1))


def token_counts(tokenizer, items: Sequence[str]) -> dict[str, int]:
    """Number of tokens of each item with a leading space (1 for every day and month on SmolLM2)."""
    return {it: len(tokenizer(" " + it, add_special_tokens=False)["input_ids"]) for it in items}
