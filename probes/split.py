"""Labels, train/test splits, cross-validation folds and class balancing, all fixed by a seed.

Splits can be made by *group* (a document, an entity): every example of a group lands on the same
side, so a probe is never tested on a document it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.errors import InputError


def as_features(x, name: str = "X") -> Float[Tensor, "n d"]:
    """A float tensor ``[n, d]`` from a tensor or array (bf16/fp16 become float32)."""
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise InputError(f"{name} must be [n_examples, n_features]; got shape {tuple(t.shape)}. "
                         "Capture one position per example (positions='last') or aggregate first")
    if t.shape[1] == 0:
        raise InputError(f"{name} has no columns (shape {tuple(t.shape)}); a probe needs at least one feature per "
                         "example: check the site or the column selection")
    if not t.is_floating_point():
        t = t.float()
    check_finite(t, name)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def check_finite(x: Tensor, name: str = "X") -> None:
    """Refuse activations holding NaN or inf (every fit would fail or, worse, silently rank them)."""
    if x.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(x.sum())):
        return  # fast path: one reduction, no mask (a sum is non-finite whenever a term is, or on overflow)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(-1, x.shape[-1]).any(-1).nonzero().flatten() if x.dim() else torch.zeros(1)
        raise InputError(f"{name} holds {int(bad.sum())} NaN or infinite values, in {rows.numel()} rows (first: "
                         f"{rows[:5].tolist()}, counting rows over the leading dimensions); drop or fix those rows "
                         "(a float16 capture that overflowed gives inf: capture in float32)")


def check_positive(value, name: str) -> float:
    """`value` as a float, or InputError unless it is a finite number > 0 (a C, an alpha)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name}={value!r} must be a finite number > 0 (e.g. 1.0)")
    return v


def positive_values(values, name: str, example) -> list[float]:
    """`values` as floats, or InputError unless they are a non-empty list of finite numbers > 0 (Cs, alphas)."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise InputError(f"{name}={values!r} must be a non-empty list of finite positive values, e.g. {example}")
    return out


def _first_rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return f"{rows.size} rows (first: {rows[:5].tolist()})"


def encode_labels(y, n: int | None = None) -> tuple[Float[Tensor, " n"], list]:
    """Binary labels of any two values -> (0/1 float tensor, [negative class, positive class]).

    The positive class is the larger of the two (True, 1, or the later string in sorted order).
    Labels holding NaN or None, or values that cannot be ordered, are refused.
    """
    if isinstance(y, Tensor):
        y = y.detach().cpu()
        y = y.float() if y.dtype == torch.bfloat16 else y  # numpy has no bfloat16
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise InputError(f"labels must be one value per example ([n]); got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"got {arr.shape[0]} labels for {n} examples; they must match")
    if arr.dtype == object:
        missing = np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in arr], dtype=bool)
        if missing.any():
            raise InputError(f"labels hold None or NaN in {_first_rows(missing)}; every example needs one of two "
                             "classes: drop those rows or fill them")
    elif arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise InputError(f"labels hold NaN or infinite values in {_first_rows(~np.isfinite(arr))}; every example "
                         "needs one of two classes: drop those rows or fill them")
    try:
        classes = sorted(np.unique(arr).tolist())
    except TypeError:
        kinds = sorted({type(v).__name__ for v in arr.tolist()})
        raise InputError(f"labels mix values of types {kinds} that cannot be ordered; give two classes of one "
                         "type (e.g. 0/1 or two strings)") from None
    if len(classes) != 2:
        raise InputError(f"a binary probe needs exactly 2 classes; got {len(classes)}: {classes[:10]}. "
                         "For several classes fit one probe per class on (labels == c)")
    return torch.as_tensor(arr == classes[1], dtype=torch.float32), classes


def as_target(y, n: int | None = None) -> Float[Tensor, " n"]:
    """Real-valued regression targets ``[n]``."""
    try:
        arr = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"targets must be numbers (one real value per example); got values that are not ({e}). "
                         "For class labels use a classification probe (SparseProbe, LinearProbe, sweep)") from None
    t = torch.as_tensor(arr)
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        raise InputError(f"targets must be [n] = [{n}]; got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError("targets contain NaN or infinite values")
    return t


def _group_ids(groups, n: int) -> Int[Tensor, " n"]:
    arr = np.asarray(groups.cpu() if isinstance(groups, Tensor) else groups)
    if arr.shape != (n,):
        raise InputError(f"groups must be one id per example ([{n}]); got shape {arr.shape}")
    return torch.as_tensor(np.unique(arr, return_inverse=True)[1].reshape(-1))


def train_test_split(
    n: int,
    test_size: float = 0.2,
    seed: int = 0,
    stratify: Tensor | None = None,
    groups: Sequence | Tensor | np.ndarray | None = None,
) -> tuple[Int[Tensor, " n_train"], Int[Tensor, " n_test"]]:
    """Indices of a train/test split fixed by `seed`.

    With `groups`, whole groups go to one side (about `test_size` of the groups, shuffled); without,
    the split is stratified by `stratify` (0/1 labels) when given.
    """
    if not 0 < test_size < 1:
        raise InputError(f"test_size={test_size} must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    if groups is not None:
        gid = _group_ids(groups, n)
        n_groups = int(gid.max()) + 1
        if n_groups < 2:
            raise InputError("groups holds a single group; a group split needs at least 2")
        perm = torch.randperm(n_groups, generator=g)
        n_test = min(n_groups - 1, max(1, round(test_size * n_groups)))
        test_mask = torch.zeros(n_groups, dtype=torch.bool)
        test_mask[perm[:n_test]] = True
        is_test = test_mask[gid]
        return torch.nonzero(~is_test)[:, 0], torch.nonzero(is_test)[:, 0]
    strata = [torch.arange(n)] if stratify is None else [torch.nonzero(stratify == v)[:, 0]
                                                          for v in torch.unique(stratify)]
    train, test = [], []
    for idx in strata:
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, round(test_size * len(idx)))) if len(idx) > 1 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def fold_ids(n: int, cv: int, seed: int = 0, groups=None, y: Tensor | None = None) -> Int[Tensor, " n"]:
    """Fold number (0..cv-1) of each example; by group when `groups` is given, else stratified by the 0/1
    labels `y` when given (each class dealt round-robin over the folds, as scikit-learn's StratifiedKFold
    balances them: with 2 positives in 40 rows and 3 folds, unstratified folds left a training part with no
    positive in a third of draws)."""
    if cv < 2:
        raise InputError(f"cv={cv} must be at least 2 folds")
    g = torch.Generator().manual_seed(seed)
    if groups is None:
        perm = torch.randperm(n, generator=g)
        if y is None:
            return perm % cv
        order = perm[torch.sort((y[perm] > 0.5).to(torch.uint8), stable=True).indices]  # by class, shuffled within
        folds = torch.empty(n, dtype=torch.long)
        folds[order] = torch.arange(n) % cv
        return folds
    gid = _group_ids(groups, n)
    n_groups = int(gid.max()) + 1
    if n_groups < cv:
        raise InputError(f"cv={cv} folds need at least {cv} groups; got {n_groups}")
    return (torch.randperm(n_groups, generator=g) % cv)[gid]


def undersample(y: Float[Tensor, " n"], seed: int = 0) -> Int[Tensor, " m"]:
    """Indices keeping every example of the rarer class and as many random ones of the other."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(y > 0.5)[:, 0], torch.nonzero(y <= 0.5)[:, 0]
    m = min(len(pos), len(neg))
    keep = [c[torch.randperm(len(c), generator=g)[:m]] for c in (pos, neg)]
    return torch.cat(keep).sort().values


def check_both_classes(y: Float[Tensor, " n"], where: str) -> None:
    """InputError unless `y` holds both classes."""
    n_pos = int((y > 0.5).sum())
    if n_pos == 0 or n_pos == y.shape[0]:
        raise InputError(f"{where} holds a single class ({n_pos} positive of {y.shape[0]}); "
                         "both classes are needed: add examples or change the split")


def standardize_stats(x: Float[Tensor, "*layer n d"], mask: Bool[Tensor, " n"] | None = None,
                      eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation per feature (over the rows in `mask`); constant features get 1."""
    rows = x if mask is None else x[..., mask, :]
    mean = rows.mean(-2, keepdim=True)
    std = ((rows - mean) ** 2).mean(-2, keepdim=True).sqrt()
    return mean, torch.where(std > eps, std, torch.ones_like(std))


def log_grid(lo: float, hi: float, num: int) -> list[float]:
    """`num` values evenly spaced in log between `lo` and `hi`."""
    return [float(v) for v in np.logspace(math.log10(lo), math.log10(hi), num)]
