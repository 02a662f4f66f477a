"""First-letter feature absorption of a sparse dictionary (Chanin et al. 2024, "A is for Absorption";
the variant SAEBench reports).

The task: does a single-token word (``" tartan"``) start with the letter T? A dense linear probe on the
model's activations (the ground truth) answers it for most words. For each letter, k-sparse probes on
the dictionary's latents find the *main latents* of "starts with T": the best single latent, plus
further latents while each one raises the probe's held-out F1 by more than ``split_f1_jump``
(feature splitting). A held-out T word that the dense probe recognises is *absorbed* when the main
latents stay silent and another latent carries the letter instead: the latent with the largest
projection onto the probe direction is aligned with the probe (cosine >= ``full_cos_threshold``) and
supplies at least ``projection_threshold`` of the activation's projection onto it. The *full absorption
rate* of a letter is the fraction of its recognised words that are absorbed; the *absorption fraction*
(SAEBench's partial score) is the share of the probe projection carried by up to
``max_absorbing_latents`` aligned non-main latents rather than by the main ones, averaged over the same
words. Both are averaged over the letters evaluated.

This module takes the dictionary as two plain things, an ``encode`` callable ``acts -> codes`` and its
decoder rows ``W_dec [d_sae, d_model]``, so any SAE (or other sparse code) can be measured and the
library needs no SAE class. :func:`first_letter_data` builds the words' activations with a model.

Where this differs from the published method and SAEBench's code:

- words: tokens that decode to a space and two or more ASCII letters, sampled up to
  ``words_per_letter`` per letter (not the whole vocabulary), split train/test by lower-cased word so
  ``" The"`` and ``" the"`` never straddle the split;
- prompt: ``icl_examples`` lines ``"{word} has the first letter: {L}"`` then the word itself, read at
  the word (SAEBench reads the same token with the rest of the line after it, which a causal model
  cannot see; the two activations are identical);
- ground truth: one-vs-rest L2 logistic probes (:class:`probes.LinearProbe`, C by cross-validation)
  instead of one 26-way softmax probe; the probe direction is taken in activation units;
- k-sparse probes: :class:`probes.SparseProbe` (selection by ``method``, default F-statistic, keeping
  latents that fire more on the letter's words) instead of an L1-regularised ranking;
- a latent's projection onto the probe is ``code * <W_dec[i], p>`` (SAEBench: ``code * cos``; equal
  for unit-norm decoder rows);
- letters whose dense probe has held-out F1 below ``min_probe_f1`` or fewer than
  ``min_true_positives`` recognised test words are skipped and listed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.errors import InputError
from probes.estimators import LinearProbe, SparseProbe
from probes.metrics import f1
from probes.selection import canonical_method

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8
"""A main latent with a code below this counts as silent."""
WORD = re.compile(r" [A-Za-z]{2,}")
"""What a single-token word decodes to."""


@dataclass(frozen=True, kw_only=True)
class AbsorptionConfig:
    """Options of the first-letter absorption evaluation (defaults follow SAEBench where it has one)."""

    words_per_letter: int = 160
    """Words sampled per first letter (all of a letter's words when it has fewer)."""
    icl_examples: int = 6
    """Example lines before the word in each prompt (SAEBench: 10)."""
    test_fraction: float = 0.4
    """Share of the words (grouped by lower-cased word) held out to measure absorption."""
    seed: int = 0
    """Seed of the word sample, the examples and the split."""
    max_latents: int = 10
    """Largest k of the k-sparse probes (SAEBench's max_k_value)."""
    split_f1_jump: float = 0.03
    """A further main latent is kept while it raises the k-sparse probe's F1 by more than this."""
    method: str = "f_stat"
    """Latent selection method of the k-sparse probes (one of probes.METHODS)."""
    min_probe_f1: float = 0.6
    """Letters whose dense probe has a lower held-out F1 are skipped."""
    min_true_positives: int = 10
    """Letters with fewer held-out words the dense probe recognises are skipped (SAEBench: 20 over
    the whole vocabulary)."""
    full_cos_threshold: float = 0.025
    """Full absorption: least cosine between the top latent's decoder row and the probe."""
    fraction_cos_threshold: float = 0.1
    """Absorption fraction: least cosine of a latent counted as absorbing."""
    projection_threshold: float = 0.4
    """Least share of the activation's probe projection the absorbing latent(s) must supply."""
    max_absorbing_latents: int = 3
    """Absorption fraction: most absorbing latents summed per word."""
    batch_size: int = 64
    """Prompts per forward pass when building the data."""

    def __post_init__(self) -> None:
        for name in ("words_per_letter", "max_latents", "min_true_positives", "max_absorbing_latents", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"AbsorptionConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.icl_examples, int) or self.icl_examples < 0:
            raise InputError(f"AbsorptionConfig.icl_examples must be an integer >= 0, got {self.icl_examples!r}")
        if not 0 < self.test_fraction < 1:
            raise InputError(f"AbsorptionConfig.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        for name in ("split_f1_jump", "min_probe_f1", "full_cos_threshold", "fraction_cos_threshold",
                     "projection_threshold"):
            if not isinstance(getattr(self, name), (int, float)):
                raise InputError(f"AbsorptionConfig.{name} must be a number, got {getattr(self, name)!r}")
        canonical_method(self.method)


@dataclass
class LetterData:
    """Activations of labelled words: what :func:`absorption` measures on."""

    acts: Float[Tensor, "n d_model"]
    """One activation per word (at the word's token)."""
    labels: Int[Tensor, " n"]
    """Class of each word: the index of its first letter in ``classes``."""
    test: Tensor
    """``[n]`` bool: held-out words (absorption is measured on these, probes are fitted on the rest)."""
    words: list[str]
    """The words, for reading the results."""
    classes: str = LETTERS
    """Class names (the letters)."""


def word_tokens(tokenizer) -> list[tuple[str, int]]:
    """``(text, token id)`` of every vocabulary token that decodes to a space and 2+ ASCII letters."""
    out = []
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([token])
        if WORD.fullmatch(text):
            out.append((text, idx))
    return out


def _single_token(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def first_letter_prompts(tokenizer, cfg: AbsorptionConfig = AbsorptionConfig()) -> tuple[list[list[int]], LetterData]:
    """Token ids of one prompt per sampled word (the word is the last token), and the words' labels
    and split (``acts`` left empty: ``[n, 0]``). The prompt is ``icl_examples`` lines ``"{w} has the first
    letter: {L}"`` of other words, then the word."""
    vocab = word_tokens(tokenizer)
    if not vocab:
        raise InputError("the tokenizer has no single-token words (a space and 2+ ASCII letters); the "
                         "first-letter task needs a tokenizer with whole-word tokens")
    gen = torch.Generator().manual_seed(cfg.seed)
    by_letter: dict[int, list[int]] = {}
    for i, (text, _) in enumerate(vocab):
        by_letter.setdefault(LETTERS.index(text[1].lower()), []).append(i)
    chosen = []
    for letter in sorted(by_letter):
        idx = by_letter[letter]
        perm = torch.randperm(len(idx), generator=gen)[: cfg.words_per_letter]
        chosen += [idx[int(j)] for j in perm]
    suffix = _single_token(tokenizer, " has the first letter:")
    newline = _single_token(tokenizer, "\n")
    answers = {c: _single_token(tokenizer, " " + c.upper()) for c in LETTERS}
    prompts = []
    for i in chosen:
        others = torch.randint(0, len(vocab) - 1, (cfg.icl_examples,), generator=gen).tolist()
        ids: list[int] = []
        for j in others:
            text, tid = vocab[j if j < i else j + 1]  # never the word itself
            ids += [tid, *suffix, *answers[text[1].lower()], *newline]
        prompts.append(ids + [vocab[i][1]])
    words = [vocab[i][0] for i in chosen]
    labels = torch.tensor([LETTERS.index(w[1].lower()) for w in words])
    groups = sorted({w.strip().lower() for w in words})
    held = torch.randperm(len(groups), generator=gen)[: round(cfg.test_fraction * len(groups))]
    held_words = {groups[int(j)] for j in held}
    test = torch.tensor([w.strip().lower() in held_words for w in words])
    return prompts, LetterData(torch.empty(len(words), 0), labels, test, words)


@torch.no_grad()
def first_letter_data(model, tokenizer, site: str, cfg: AbsorptionConfig = AbsorptionConfig(), *,
                      progress: bool = True) -> LetterData:
    """Sample words, build their prompts and capture each word's activation at ``site``."""
    from interp.capture import capture

    prompts, data = first_letter_prompts(tokenizer, cfg)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):  # left padding: the word is the last column of every row
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    acts = capture(model, {"input_ids": ids, "attention_mask": mask}, site, positions="last",
                   batch_size=cfg.batch_size, dtype=torch.float32, progress=progress)[site]
    return dataclasses.replace(data, acts=acts)


@dataclass
class LetterProbes:
    """Dense one-vs-rest probes per class: unit directions in activation units and held-out scores."""

    directions: Float[Tensor, "n_classes d_model"]
    scores: Float[Tensor, "n_test n_classes"]
    """Each probe's logit on each held-out word."""
    f1: list[float]
    """Held-out F1 of each probe."""


def letter_probes(data: LetterData) -> LetterProbes:
    """Fit one :class:`probes.LinearProbe` per class on the training words (C by cross-validation,
    L-BFGS: a Newton step on every residual-stream width would cost ``d_model ** 2`` per row)."""
    _check(data)
    x_train, x_test = data.acts[~data.test], data.acts[data.test]
    y_train, y_test = data.labels[~data.test], data.labels[data.test]
    dirs, scores, f1s = [], [], []
    for c in range(len(data.classes)):
        if not (y_train == c).any() or (y_train == c).all():
            dirs.append(torch.zeros(data.acts.shape[1]))
            scores.append(torch.full((x_test.shape[0],), -1.0))
            f1s.append(0.0)
            continue
        probe = LinearProbe(solver="lbfgs").fit(x_train, y_train == c)
        w = probe.coef_ / probe.scale_  # a direction in activation units
        dirs.append(w / w.norm().clamp_min(1e-12))
        s = probe.decision_function(x_test).float()
        scores.append(s)
        f1s.append(float(f1((y_test == c).float(), (s > 0).float())))
    return LetterProbes(torch.stack(dirs).float(), torch.stack(scores, 1), f1s)


@torch.no_grad()
def encode_rows(encode: Callable[[Tensor], Tensor], acts: Tensor, batch: int = 1024) -> Tensor:
    """``encode`` over the rows of ``acts`` in chunks, as float32 on the CPU."""
    return torch.cat([encode(acts[s:s + batch]).float().cpu() for s in range(0, acts.shape[0], batch)])


def main_latents(codes_train: Tensor, y_train: Tensor, codes_test: Tensor, y_test: Tensor,
                 cfg: AbsorptionConfig) -> tuple[list[int], list[float]]:
    """The main latents of one class (k-sparse probes with the feature-splitting rule) and the
    held-out F1 of the k-sparse probe for every k tried."""
    y_train, y_test = y_train.bool(), y_test.bool()
    first = SparseProbe(1, cfg.method).fit(codes_train, y_train)
    fires_more = codes_train[y_train].mean(0) > codes_train[~y_train].mean(0)
    more = fires_more[first.ranking_]
    # the latents that fire more on the class first (only those are tried), the rest after them
    ranking = torch.cat([first.ranking_[more], first.ranking_[~more]])
    best, chosen, f1s = -1.0, [], []
    for k in range(1, min(cfg.max_latents, int(more.sum())) + 1):
        probe = SparseProbe(k, cfg.method).fit(codes_train, y_train, ranking=ranking)
        score = float(f1(y_test.float(), (probe.decision_function(codes_test) > 0).float()))
        f1s.append(score)
        if score <= best + cfg.split_f1_jump:
            break
        best, chosen = score, ranking[:k].tolist()
    return chosen, f1s


def word_absorption(codes: Float[Tensor, "n d_sae"], proj: Float[Tensor, " n"], contrib_dir: Float[Tensor, " d_sae"],
                    cos: Float[Tensor, " d_sae"], main: list[int], cfg: AbsorptionConfig) -> tuple[Tensor, Tensor]:
    """Per word: (full absorption, absorption fraction), SAEBench's rules.

    ``proj`` is each activation's projection onto the unit probe direction, ``contrib_dir[i]`` =
    ``<W_dec[i], p>``, so latent i supplies ``codes[:, i] * contrib_dir[i]`` of it."""
    contrib = codes * contrib_dir
    is_main = torch.zeros(codes.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = contrib[:, is_main].sum(1)
    # absorption fraction: up to max_absorbing_latents aligned, positively projecting non-main latents
    aligned = ~is_main & (cos >= cfg.fraction_cos_threshold) & (contrib > 0)
    cand = torch.where(aligned, contrib, torch.zeros_like(contrib))
    top = cand.topk(min(cfg.max_absorbing_latents, cand.shape[1]), dim=1).values.sum(1)
    safe = torch.where(proj == 0, torch.full_like(proj, EPS), proj)
    absorbed = torch.minimum(top, proj - main_proj)
    partial = (absorbed / (absorbed + main_proj)).clamp(0, 1)
    frac = torch.where(main_proj <= 0, torch.ones_like(proj), partial)
    frac = torch.where((main_proj >= proj) | (top / safe < cfg.projection_threshold), torch.zeros_like(proj), frac)
    # full absorption: main latents silent, the top projecting latent aligned and carrying enough
    silent = (codes[:, is_main] < EPS).all(1)
    best_val, best_idx = contrib.max(1)
    full = (silent & (cos[best_idx] >= cfg.full_cos_threshold) & (proj >= 0)
            & (best_val / safe >= cfg.projection_threshold))
    return full, frac


def first_letter_absorption(encode: Callable[[Tensor], Tensor], W_dec: Float[Tensor, "d_sae d_model"],
                            data: LetterData, cfg: AbsorptionConfig = AbsorptionConfig(), *,
                            probes: LetterProbes | None = None) -> dict[str, Any]:
    """First-letter absorption of the dictionary ``(encode, W_dec)`` on ``data``; see the module docstring.

    Returns (JSON-able) ``full_absorption_rate`` and ``absorption_fraction`` (means over the letters
    evaluated), ``mean_main_latents``, ``n_letters``, per-letter details under ``letters``, the letters
    skipped with the reason under ``skipped``, and the options under ``config``. Pass ``probes`` (from
    :func:`letter_probes`) to reuse the dense probes across dictionaries."""
    _check(data)
    W = torch.as_tensor(W_dec).detach().float().cpu()
    if W.dim() != 2 or W.shape[1] != data.acts.shape[1]:
        raise InputError(f"W_dec must be [d_sae, d_model={data.acts.shape[1]}], got {tuple(W.shape)}")
    codes = encode_rows(encode, data.acts)
    if codes.shape != (data.acts.shape[0], W.shape[0]):
        raise InputError(f"encode returned {tuple(codes.shape)} for {data.acts.shape[0]} rows; expected "
                         f"[{data.acts.shape[0]}, d_sae={W.shape[0]}] to match W_dec")
    probes = probes or letter_probes(data)
    train, test = ~data.test, data.test
    x_test, y_test, codes_test = data.acts[test].float(), data.labels[test], codes[test]
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    letters, skipped = {}, {}
    for c, name in enumerate(data.classes):
        positives = (y_test == c) & (probes.scores[:, c] > 0)
        n_tp = int(positives.sum())
        if not bool((y_test == c).any()) or bool((y_test == c).all()):
            skipped[name] = f"{int((y_test == c).sum())} of {len(y_test)} test words start with it"
            continue
        if probes.f1[c] < cfg.min_probe_f1:
            skipped[name] = f"dense probe F1 {probes.f1[c]:.3f} < {cfg.min_probe_f1}"
            continue
        if n_tp < cfg.min_true_positives:
            skipped[name] = f"{n_tp} recognised test words < {cfg.min_true_positives}"
            continue
        main, f1s = main_latents(codes[train], data.labels[train] == c, codes_test, y_test == c, cfg)
        p = probes.directions[c]
        full, frac = word_absorption(codes_test[positives], x_test[positives] @ p, W @ p, unit @ p, main, cfg)
        absorbed = torch.nonzero(test)[:, 0][positives][full].tolist()
        letters[name] = {"full_absorption_rate": float(full.float().mean()), "absorption_fraction": float(frac.mean()),
                         "n_true_positives": n_tp, "n_full_absorption": int(full.sum()), "main_latents": main,
                         "sparse_probe_f1": [round(v, 4) for v in f1s], "probe_f1": round(probes.f1[c], 4),
                         "absorbed_words": [data.words[i] for i in absorbed]}
    out: dict[str, Any] = {"n_letters": len(letters), "n_words": int(data.acts.shape[0]),
                           "n_test_words": int(test.sum())}
    if letters:
        rows = letters.values()
        out.update(full_absorption_rate=sum(r["full_absorption_rate"] for r in rows) / len(letters),
                   absorption_fraction=sum(r["absorption_fraction"] for r in rows) / len(letters),
                   mean_main_latents=sum(len(r["main_latents"]) for r in rows) / len(letters))
    else:
        out.update(full_absorption_rate=None, absorption_fraction=None, mean_main_latents=None)
    out.update(letters=letters, skipped=skipped, config=dataclasses.asdict(cfg))
    return out


def _check(data: LetterData) -> None:
    n = data.acts.shape[0] if data.acts.dim() == 2 else 0
    if n == 0 or data.labels.shape != (n,) or data.test.shape != (n,):
        raise InputError(f"LetterData needs acts [n, d_model], labels [n] and test [n] with n > 0; got acts "
                         f"{tuple(data.acts.shape)}, labels {tuple(data.labels.shape)}, test {tuple(data.test.shape)}")
    if bool(data.test.all()) or not bool(data.test.any()):
        raise InputError(f"LetterData.test marks {int(data.test.sum())} of {n} words as held out; both the "
                         "training and the test side need words (change test_fraction or add words)")
