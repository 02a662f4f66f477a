"""Probe metrics in torch, batched over any leading dimensions (one value per layer, per k, ...).

Classification metrics take 0/1 labels and 0/1 predictions (``f1``, ``precision``, ``recall``,
``accuracy``) or real-valued scores (``roc_auc``); the positive class is 1, and other label values are
refused (``probes.split.encode_labels`` maps any two classes to 0/1, as the probes do). Regression metrics
(``r2``, ``spearman``) take real targets and predictions. Undefined values (a precision with no
positive prediction, an AUC with a single class) are 0.0 for precision/recall/F1, as scikit-learn's
``zero_division=0``, and NaN for AUC and correlations.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import InputError


def _binary(name: str, v: Tensor) -> Tensor:
    """`v` as floats, refused unless every value is 0 or 1 (labels of 1/2 or -1/1 gave precisions of 3.25)."""
    v = torch.as_tensor(v)
    f = v.float()
    if v.dtype != torch.bool and bool(((f != 0) & (f != 1)).any()):
        found = torch.unique(f.flatten()[:100_000]).tolist()[:6]
        raise InputError(f"{name} must be 0/1 (the positive class 1); got values {found}. Map two classes with "
                         "probes.split.encode_labels(labels), which the probes use (the larger value is positive)")
    return f


def _counts(y: Tensor, pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y, pred = _binary("labels", y), _binary("predictions", pred)
    tp = (y * pred).sum(-1)
    fp = ((1 - y) * pred).sum(-1)
    fn = (y * (1 - pred)).sum(-1)
    return tp, fp, fn


def accuracy(y: Float[Tensor, "*batch n"], pred: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Fraction of predictions equal to the label."""
    return (_binary("labels", y) == _binary("predictions", pred)).float().mean(-1)


def precision(y: Float[Tensor, "*batch n"], pred: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """tp / (tp + fp); 0 where nothing is predicted positive."""
    tp, fp, _ = _counts(y, pred)
    return torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))


def recall(y: Float[Tensor, "*batch n"], pred: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """tp / (tp + fn); 0 where there is no positive label."""
    tp, _, fn = _counts(y, pred)
    return torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))


def f1(y: Float[Tensor, "*batch n"], pred: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """2 tp / (2 tp + fp + fn) for the positive class; 0 where that is 0/0."""
    tp, fp, fn = _counts(y, pred)
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp(min=1), torch.zeros_like(tp))


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks 1..n along the last dimension, ties given their average rank (as scipy's rankdata)."""
    v = v.double()
    order = v.argsort(-1)
    sv = v.gather(-1, order)
    n = v.shape[-1]
    pos = torch.arange(1, n + 1, dtype=torch.float64, device=v.device).expand_as(sv)
    new = torch.ones_like(sv, dtype=torch.bool)
    new[..., 1:] = sv[..., 1:] != sv[..., :-1]
    group = new.long().cumsum(-1) - 1  # tie-group id of each sorted entry
    total = torch.zeros_like(sv).scatter_add_(-1, group, pos)
    count = torch.zeros_like(sv).scatter_add_(-1, group, torch.ones_like(pos))
    avg = (total / count.clamp(min=1)).gather(-1, group)
    return torch.empty_like(avg).scatter_(-1, order, avg)


def roc_auc(y: Float[Tensor, "*batch n"], score: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN with a single class."""
    y = _binary("labels", y).double()
    ranks = _average_ranks(score)
    n_pos = y.sum(-1)
    n_neg = y.shape[-1] - n_pos
    u = (ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2
    auc = u / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan"))).float()


def r2(y: Float[Tensor, "*batch n"], pred: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Coefficient of determination 1 - SS_res / SS_tot over the whole set (predicting the mean gives 0).

    On a constant target (SS_tot = 0) it is 1 for a perfect prediction and 0 otherwise, as scikit-learn's
    ``r2_score`` gives (not -inf or NaN)."""
    y, pred = y.double(), pred.double()
    ss_res = ((y - pred) ** 2).sum(-1)
    ss_tot = ((y - y.mean(-1, keepdim=True)) ** 2).sum(-1)
    constant = torch.where(ss_res == 0, torch.ones_like(ss_res), torch.zeros_like(ss_res))
    return torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(torch.finfo(torch.float64).tiny), constant).float()


def pearson(a: Float[Tensor, "*batch n"], b: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Pearson correlation along the last dimension; NaN where either side is constant."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).float()


def spearman(y: Float[Tensor, "*batch n"], pred: Float[Tensor, "*batch n"]) -> Float[Tensor, "*batch"]:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(_average_ranks(y), _average_ranks(pred))


def classification_report(
    y: Float[Tensor, "*#batch n"], score: Float[Tensor, "*batch n"], threshold: float = 0.0
) -> dict[str, Tensor]:
    """Accuracy, precision, recall, F1 (predicting ``score > threshold``) and AUC, each ``[*batch]``."""
    pred = (score > threshold).float()
    y = _binary("labels", y).expand_as(pred)
    return {"accuracy": accuracy(y, pred), "precision": precision(y, pred), "recall": recall(y, pred),
            "f1": f1(y, pred), "auc": roc_auc(y, score)}


def regression_report(y: Float[Tensor, "*#batch n"], pred: Float[Tensor, "*batch n"]) -> dict[str, Tensor]:
    """R^2 and Spearman correlation, each ``[*batch]``."""
    y = y.float().expand_as(pred)
    return {"r2": r2(y, pred), "spearman": spearman(y, pred)}
