"""Metrics of a patching sweep: one number per run, read from the logits at the last real token.

>>> logit_diff(" Monday", " Friday")     # logit of the answer minus logit of the other answer
>>> prob(" Monday")                      # probability of an answer
>>> kl()                                 # KL(clean run || this run) over the next-token distribution
>>> lambda logits: logits[:, 42]         # any callable: [n, vocab] logits -> [n] values

A metric is bound to one prompt pair before a sweep uses it (:meth:`Metric.bind`): token strings are
turned into ids with the tokenizer, a value given per pair (a list, one per pair) is picked for that
pair, and ``kl`` takes the clean run's distribution as its reference. The bound metric must be
differentiable in the logits for :func:`interp.patching.attribution_patching` (all built-ins are).
``kl`` is zero, with a zero gradient, at the clean run: attribution patching with ``kl`` and
``direction="noise"`` (gradient taken on the clean run) therefore estimates every cell as 0.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError

Bound = Callable[[Float[Tensor, "n vocab"]], Float[Tensor, " n"]]
"""A metric bound to one prompt pair: last-token logits of ``n`` runs -> ``n`` values."""

TYPES = ("logit_diff", "prob", "kl")


def token_id(tokenizer, token: str | int, what: str, vocab: int | None = None) -> int:
    """The single token id of ``token`` (an id passes through, checked against the `vocab` size when given)."""
    if isinstance(token, int) and not isinstance(token, bool):
        if token < 0 or (vocab is not None and token >= vocab):
            raise InputError(f"{what}: token id {token} is outside the vocabulary "
                             f"(0..{'' if vocab is None else vocab - 1}); give a token string or a valid id")
        return token
    if not isinstance(token, str) or not token:
        raise InputError(f"{what}: expected a token string such as ' Monday' or a token id; got {token!r}")
    if tokenizer is None:
        raise InputError(f"{what} {token!r} is text, so the sweep needs tokenizer=... to read it (or give its id)")
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise InputError(f"{what} {token!r} is {len(ids)} tokens {ids}; metrics compare single tokens (mind the "
                         "leading space, e.g. ' Monday')")
    return int(ids[0])


def _per_pair(value, pair: int, n_pairs: int, what: str):
    if isinstance(value, (list, tuple)):
        if len(value) != n_pairs:
            raise InputError(f"{what}: {len(value)} values given for {n_pairs} prompt pairs; give one per pair, or one "
                             "for all")
        return value[pair]
    return value


class Metric(abc.ABC):
    """Base class: ``bind`` resolves the metric for one prompt pair."""

    name: str = "metric"

    @abc.abstractmethod
    def bind(self, *, pair: int, n_pairs: int, clean_logits: Float[Tensor, " vocab"], tokenizer) -> Bound:
        """The metric for prompt pair ``pair`` (of ``n_pairs``), given the clean run's last-token logits."""

    def describe(self) -> dict:
        """JSON-able description (written into results)."""
        return {"type": self.name}


class LogitDiff(Metric):
    """``logit[target] - logit[baseline]``; each a token string, a token id, or a list with one per pair."""

    name = "logit_diff"

    def __init__(self, target, baseline):
        self.target, self.baseline = target, baseline

    def bind(self, *, pair, n_pairs, clean_logits, tokenizer):
        v = clean_logits.shape[-1]
        t = token_id(tokenizer, _per_pair(self.target, pair, n_pairs, "logit_diff target"), "logit_diff target", v)
        b = token_id(tokenizer, _per_pair(self.baseline, pair, n_pairs, "logit_diff baseline"), "logit_diff baseline",
                     v)
        return lambda logits: logits[:, t] - logits[:, b]

    def describe(self):
        return {"type": self.name, "target": self.target, "baseline": self.baseline}


class Prob(Metric):
    """Probability of ``token`` (a string, an id, or one per pair) under the next-token distribution."""

    name = "prob"

    def __init__(self, token):
        self.token = token

    def bind(self, *, pair, n_pairs, clean_logits, tokenizer):
        t = token_id(tokenizer, _per_pair(self.token, pair, n_pairs, "prob token"), "prob token",
                     clean_logits.shape[-1])
        return lambda logits: logits.float().softmax(-1)[:, t]

    def describe(self):
        return {"type": self.name, "token": self.token}


class KL(Metric):
    """``KL(clean || run)`` of the next-token distributions (0 at the clean run; lower is closer)."""

    name = "kl"

    def bind(self, *, pair, n_pairs, clean_logits, tokenizer):
        ref = clean_logits.detach().float().log_softmax(-1)

        def kl(logits):
            logp = logits.float().log_softmax(-1)
            return (ref.exp() * (ref - logp)).sum(-1)
        return kl


class FnMetric(Metric):
    """A user callable ``fn(logits [n, vocab]) -> [n]``, the same for every pair."""

    def __init__(self, fn: Callable, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def bind(self, *, pair, n_pairs, clean_logits, tokenizer):
        def call(logits):
            out = self.fn(logits)
            if not isinstance(out, Tensor) or out.shape != logits.shape[:1]:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise InputError(f"metric {self.name!r} returned {got} for logits of shape {tuple(logits.shape)}; a "
                                 f"metric returns one value per run, shape ({logits.shape[0]},)")
            return out
        return call

    def describe(self):
        return {"type": "callable", "name": self.name}


def logit_diff(target, baseline) -> LogitDiff:
    """``logit[target] - logit[baseline]`` at the last token (strings, ids, or one of each per pair)."""
    return LogitDiff(target, baseline)


def prob(token) -> Prob:
    """Probability of ``token`` at the last token."""
    return Prob(token)


def kl() -> KL:
    """KL divergence from the clean run's next-token distribution."""
    return KL()


def as_metric(metric) -> Metric:
    """A :class:`Metric` from a Metric, a callable, ``"kl"``, or a spec dict ``{type: logit_diff, target, baseline}``
    / ``{type: prob, token}`` / ``{type: kl}``."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        metric = {"type": metric}
    if isinstance(metric, Mapping):
        kind = metric.get("type")
        keys = {"logit_diff": {"target", "baseline"}, "prob": {"token"}, "kl": set()}.get(kind)
        if keys is None:
            raise InputError(f"metric type {kind!r} is not known; use one of {list(TYPES)} or pass a callable "
                             "logits [n, vocab] -> [n]")
        given = set(metric) - {"type"}
        if given != keys:
            raise InputError(f"metric {kind!r} takes keys {sorted(keys)}; got {sorted(given)}")
        return {"logit_diff": lambda: LogitDiff(metric["target"], metric["baseline"]),
                "prob": lambda: Prob(metric["token"]), "kl": KL}[kind]()
    if callable(metric):
        return FnMetric(metric)
    raise InputError(f"metric must be logit_diff(...), prob(...), kl(), a callable logits [n, vocab] -> [n] or a "
                     f"spec dict; got {type(metric).__name__}")


def fill_fields(metric: Mapping, rows: Sequence[Mapping]) -> dict:
    """A spec metric whose strings hold ``{field}`` becomes one value per row, filled from that row's fields."""
    out = {}
    for key, value in metric.items():
        if key != "type" and isinstance(value, str) and "{" in value:
            try:
                out[key] = [value.format(**r) for r in rows]
            except KeyError as e:
                raise InputError(f"metric {key} {value!r} names field {e} that the rows lack; their fields: "
                                 f"{sorted(rows[0]) if rows else []}") from None
        else:
            out[key] = value
    return out

