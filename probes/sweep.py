"""Sweep k-sparse probes over every layer and every k as batched tensor work.

>>> result = sweep({"blocks.3.mlp.hook_post": x3, "blocks.4.mlp.hook_post": x4}, labels, ks=(1, 2, 4, 8))
>>> result.to_frame()                 # one row per (layer, k): f1, accuracy, precision, recall, auc, neurons
>>> result.plot_f1("f1_vs_k.png")     # F1 against k, one line per layer
>>> result.plot_top_neurons("top.png")  # heat map: best single neurons of each layer

One train/test split (fixed by ``seed``, stratified, or by group) is shared by every layer and k.
Per chunk of layers: standardise on the training rows, rank the neurons once (see
:mod:`probes.selection`), then for each k fit all layers' logistic regressions in one batched solve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import InputError
from probes.logistic import balanced_weights, fit_logistic, predict_logits
from probes.metrics import classification_report
from probes.results import SweepResult
from probes.selection import canonical_method, f_stat_scores, mean_diff_scores, rank_by_score, rank_neurons
from probes.split import check_both_classes, encode_labels, standardize_stats, train_test_split, undersample

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The values of k the paper sweeps (powers of two up to 256)."""


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """How :func:`sweep` splits, balances, selects and fits."""

    ks: tuple[int, ...] = DEFAULT_KS
    """Sparsity levels to fit; values above a layer's width are skipped for that layer."""
    method: str = "f_stat"
    """Selection method (``probes.METHODS``): mean_diff, f_stat, mutual_info, l1 or adaptive."""
    C: float = 1.0
    """Inverse L2 strength of every logistic fit (scikit-learn's ``C``)."""
    test_size: float = 0.2
    """Fraction of examples (or of groups, when groups are given) held out for testing."""
    seed: int = 0
    """Seed of the train/test split and of undersampling."""
    balance: str | None = "weight"
    """"weight": weigh classes equally in the loss; "undersample": drop majority training rows; None: neither."""
    standardize: bool = True
    """Scale every neuron to zero mean and unit variance on the training rows (as the paper does)."""
    layer_batch: int | None = None
    """Layers fitted together (bounds memory to ``layer_batch * n * d`` floats); None: all at once."""
    top_n: int = 8
    """Neurons per layer scored as single-neuron probes for the heat map."""
    device: str | None = None
    """Where to compute (e.g. "cuda"); None: where the activations are."""
    max_iter: int = 100
    """Most Newton steps per logistic fit."""
    hessian_rows: int | None = 4096
    """Newton steps form the Hessian from about this many training rows (the gradient uses all of
    them, so the optimum is unchanged); None: every row."""
    tol: float = 1e-4
    """Stop a fit when its largest gradient entry is below ``tol * (1 + C * n_train)`` (scikit-learn's
    default tolerance on the same scale)."""

    def __post_init__(self):
        ks = tuple(self.ks)
        if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
            raise InputError(f"ks={self.ks!r} must be a non-empty sequence of positive integers")
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        object.__setattr__(self, "method", canonical_method(self.method))
        if self.C <= 0:
            raise InputError(f"C={self.C} must be > 0")
        if not 0 < self.test_size < 1:
            raise InputError(f"test_size={self.test_size} must be in (0, 1)")
        if self.balance not in ("weight", "undersample", None):
            raise InputError(f"balance={self.balance!r}: expected 'weight', 'undersample' or None")
        if self.layer_batch is not None and self.layer_batch < 1:
            raise InputError(f"layer_batch={self.layer_batch} must be >= 1 or None")
        if self.top_n < 0:
            raise InputError(f"top_n={self.top_n} must be >= 0")
        if self.hessian_rows is not None and self.hessian_rows < 1:
            raise InputError(f"hessian_rows={self.hessian_rows} must be >= 1 or None")
        if not 0 < self.tol < 1:
            raise InputError(f"tol={self.tol} must be in (0, 1)")
        if self.max_iter < 1:
            raise InputError(f"max_iter={self.max_iter} must be >= 1")


def _as_layers(activations) -> dict[str, Tensor]:
    if isinstance(activations, Tensor):
        if activations.dim() != 3:
            raise InputError(f"a tensor of activations must be [layer, n, d]; got {tuple(activations.shape)}")
        return {str(i): a for i, a in enumerate(activations)}
    if isinstance(activations, Mapping):
        layers = {str(k): v for k, v in activations.items()}
    elif isinstance(activations, Sequence):
        layers = {str(i): v for i, v in enumerate(activations)}
    else:
        raise InputError("activations_by_layer must be a dict {layer name: [n, d] tensor}, a list of "
                         f"[n, d] tensors or a [layer, n, d] tensor; got {type(activations).__name__}")
    if not layers:
        raise InputError("activations_by_layer is empty")
    out = {}
    for name, v in layers.items():
        t = torch.as_tensor(v)
        if t.dim() != 2:
            raise InputError(f"layer {name!r}: activations must be [n, d]; got shape {tuple(t.shape)}. Capture one "
                             "position per example (positions='last' or a boolean mask), or pool [batch, seq, d] "
                             "with probes.aggregate_tokens(x, attention_mask)")
        out[name] = t
    sizes = {t.shape[0] for t in out.values()}
    if len(sizes) != 1:
        raise InputError(f"every layer must hold the same examples; got row counts {sorted(sizes)}")
    return out


def sweep(
    activations_by_layer: Mapping[str, Float[Tensor, "n d"]] | Float[Tensor, "layer n d"],
    labels,
    ks: Sequence[int] = DEFAULT_KS,
    method: str = "f_stat",
    *,
    groups=None,
    config: SweepConfig | None = None,
    progress: bool = True,
    **options,
) -> SweepResult:
    """Fit k-sparse probes for every layer and every k; returns a :class:`probes.SweepResult`.

    Args:
        activations_by_layer: ``{layer name: [n, d]}`` (any features: MLP neurons, residual
            dimensions, SAE latents), a list of ``[n, d]``, or a ``[layer, n, d]`` tensor.
        labels: one binary label per example (any two values).
        ks, method: sparsity levels and selection method (see :class:`SweepConfig`).
        groups: one id per example (document, entity); whole groups go to train or test.
        config: a :class:`SweepConfig`; other keyword options (``C``, ``seed``, ``balance``,
            ``device`` ...) build one.
    """
    if config is None:
        config = SweepConfig(ks=tuple(ks), method=method, **options)
    elif options:
        config = dataclasses.replace(config, **options)
    layers = _as_layers(activations_by_layer)
    n = next(iter(layers.values())).shape[0]
    y, classes = encode_labels(labels, n)
    train, test = train_test_split(n, config.test_size, config.seed, stratify=y, groups=groups)
    if config.balance == "undersample":
        train = train[undersample(y[train], config.seed)]
    check_both_classes(y[train], "the training split")
    check_both_classes(y[test], "the test split")
    by_width: dict[int, list[str]] = {}
    for name, t in layers.items():
        by_width.setdefault(t.shape[1], []).append(name)
    chunks = []
    for names in by_width.values():
        step = config.layer_batch or len(names)
        chunks += [names[i:i + step] for i in range(0, len(names), step)]
    result = SweepResult(config=config, classes=classes, layers=list(layers), n_train=len(train), n_test=len(test))
    bar = tqdm(total=sum(len(c) for c in chunks), desc=f"sweep ({config.method})", unit="layer",
               disable=not progress)
    for names in chunks:
        _sweep_chunk(result, [layers[nm] for nm in names], names, y, train, test, config)
        bar.update(len(names))
    bar.close()
    result.records.sort(key=lambda r: (result.layers.index(r["layer"]), r["k"]))
    return result


def _sweep_chunk(result: SweepResult, tensors: list[Tensor], names: list[str], y: Tensor,
                 train: Tensor, test: Tensor, cfg: SweepConfig) -> None:
    device = torch.device(cfg.device) if cfg.device else tensors[0].device
    dtype = tensors[0].dtype if tensors[0].dtype in (torch.float32, torch.float64) else torch.float32
    order = torch.cat([train, test]).to(device)
    n_tr, n_layers, d = len(train), len(tensors), tensors[0].shape[1]
    xs = [t.to(device=device, dtype=dtype) for t in tensors]
    y_tr, y_te = y[train].to(device, dtype), y[test].to(device, dtype)
    w = balanced_weights(y_tr) if cfg.balance == "weight" else None
    if cfg.method in ("mean_diff", "f_stat"):  # statistics over the training rows without copying them
        rows = torch.zeros(len(y), dtype=dtype, device=device)
        rows[train.to(device)] = 1
        yd = y.to(device, dtype)
        score = mean_diff_scores if cfg.method == "mean_diff" else f_stat_scores
        opts = {"standardize": cfg.standardize} if cfg.method == "mean_diff" else {}
        ranking = torch.cat([rank_by_score(score(x[None], yd, rows=rows, **opts)) for x in xs])
    else:
        x_tr = torch.stack([x.index_select(0, order[:n_tr]) for x in xs])
        ranking = rank_neurons(x_tr, y_tr, cfg.method, sample_weight=w, C=cfg.C, standardize=cfg.standardize)
        del x_tr
    top = min(cfg.top_n, d)
    width = max(min(max(cfg.ks), d), top)
    # the selected neurons, train rows then test rows, stored [L, width, n] so that the first k
    # neurons are a contiguous block
    sel = torch.stack([x.index_select(1, ranking[i, :width]).index_select(0, order).T for i, x in enumerate(xs)])
    del xs
    if cfg.standardize:  # only the selected neurons are ever fitted, so only they are scaled
        mean, scale = standardize_stats(sel[:, :, :n_tr].mT)
        sel = (sel - mean.mT) / scale.mT
    s_tr, s_te = sel[:, :, :n_tr].contiguous(), sel[:, :, n_tr:].contiguous()
    coef = torch.zeros(n_layers, 0, dtype=dtype, device=device)
    b = torch.zeros(n_layers, dtype=dtype, device=device)
    for k in cfg.ks:
        if k > d:
            continue
        xk_tr, xk_te = s_tr[:, :k].mT, s_te[:, :k].mT  # [L, n, k] views
        init = (torch.cat([coef, coef.new_zeros(n_layers, k - coef.shape[1])], 1), b)  # supports are nested
        coef, b = fit_logistic(xk_tr, y_tr, C=cfg.C, sample_weight=w, max_iter=cfg.max_iter, tol=cfg.tol, init=init,
                               hessian_rows=cfg.hessian_rows)
        test_rep = classification_report(y_te, predict_logits(xk_te, coef, b))
        train_f1 = classification_report(y_tr, predict_logits(xk_tr, coef, b))["f1"]
        for i, name in enumerate(names):
            rec = {"layer": name, "k": k, "method": cfg.method}
            rec.update({m: float(v[i]) for m, v in test_rep.items()})
            rec["train_f1"] = float(train_f1[i])
            rec["neurons"] = ranking[i, :k].tolist()
            rec["coef"] = [round(float(c), 6) for c in coef[i]]
            result.records.append(rec)
    if top:  # each of the best-ranked neurons alone, as a 1-sparse probe
        x1_tr = s_tr[:, :top].reshape(n_layers * top, n_tr, 1)
        x1_te = s_te[:, :top].reshape(n_layers * top, -1, 1)
        coef, b = fit_logistic(x1_tr, y_tr, C=cfg.C, sample_weight=w, max_iter=cfg.max_iter, tol=cfg.tol)
        rep = classification_report(y_te, predict_logits(x1_te, coef, b))
        for i, name in enumerate(names):
            sl = slice(i * top, (i + 1) * top)
            result.top_neurons[name] = [
                {"neuron": int(nr), "f1": float(f), "auc": float(a), "coef": float(c)}
                for nr, f, a, c in zip(ranking[i, :top], rep["f1"][sl], rep["auc"][sl], coef[sl, 0])]
    for i, name in enumerate(names):
        result.rankings[name] = ranking[i].cpu()
