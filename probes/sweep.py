"""Sweep sparse probes over every site and every probe size as batched tensor work.

>>> result = sweep({"blocks.3.mlp.hook_post": x3, "blocks.4.mlp.hook_post": x4}, labels, n_neurons=(1, 2, 4, 8))
>>> result.to_frame()                 # one row per (site, n_neurons): f1, accuracy, precision, recall, auc, neurons
>>> result.plot_f1("f1_vs_n_neurons.png")  # F1 against n_neurons, one line per site
>>> result.plot_top_neurons("top.png")  # heat map: best single neurons of each site

``n_neurons`` is the number of neurons a probe may use (the paper's k in "k-sparse probing"); the
keyword ``ks=`` and ``SweepConfig.ks`` are its deprecated names. One train/test split (fixed by
``seed``, stratified, or by group) is shared by every site and probe size. Per chunk of sites:
standardise on the training rows, rank the neurons once (see :mod:`probes.selection`), then for each
probe size fit all sites' logistic regressions in one batched solve.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.deprecation import renamed_fields, renamed_keywords, renamed_module_attributes
from interp.errors import InputError
from probes.logistic import balanced_weights, fit_logistic, fit_logistic_logits, predict_logits
from probes.metrics import classification_report, f1
from probes.results import SweepRecord, SweepResult
from probes.selection import (
    _class_stats,
    _f_stat_from_stats,
    _mean_diff_from_stats,
    canonical_method,
    rank_by_score,
    rank_neurons,
)
from probes.split import (
    check_both_classes,
    check_finite,
    check_positive,
    encode_labels,
    train_test_split,
    undersample,
)

DEFAULT_N_NEURONS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The probe sizes the paper sweeps (powers of two up to 256)."""

__getattr__ = renamed_module_attributes(__name__, {"DEFAULT_KS": "DEFAULT_N_NEURONS"}, globals())


def probe_sizes(n_neurons) -> tuple[int, ...]:
    """``n_neurons`` of a sweep as sorted distinct positive integers, or a one-line error."""
    sizes = tuple(n_neurons)
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise InputError(f"n_neurons={n_neurons!r} must be a non-empty sequence of positive integers "
                         "(neurons per probe), e.g. (1, 2, 4, 8)")
    return tuple(sorted(set(sizes)))


@renamed_fields({"ks": "n_neurons"})
@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """How :func:`sweep` splits, balances, selects and fits. ``ks=`` is the deprecated name of ``n_neurons``."""

    n_neurons: tuple[int, ...] = DEFAULT_N_NEURONS
    """Probe sizes to fit (neurons per probe), stored sorted and without repeats; sizes above a
    site's width are skipped for that site."""
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
    """Sites fitted together (bounds memory to ``layer_batch * n * d`` floats); None: all at once."""
    top_n: int = 8
    """Neurons per site scored as single-neuron probes for the heat map."""
    device: str | None = None
    """Where to compute (e.g. "cuda"); None: where the activations are."""
    max_iter: int = 100
    """Most Newton steps per logistic fit."""
    hessian_rows: int | None = None
    """Newton steps form the Hessian from about this many training rows (the gradient uses all of
    them, so the optimum is unchanged; if a sub-sampled Hessian converges slowly, the fit switches to
    every row); None: every row (measured fastest on 16k rows x n_neurons <= 256: exact Newton
    converges in about two steps from the warm start of the previous probe size)."""
    tol: float = 1e-4
    """Stop a fit when its largest gradient entry is below ``tol * (1 + C * n_train)`` (scikit-learn's
    default tolerance on the same scale)."""

    def __post_init__(self):
        object.__setattr__(self, "n_neurons", probe_sizes(self.n_neurons))
        object.__setattr__(self, "method", canonical_method(self.method))
        check_positive(self.C, "C")
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


def _as_sites(activations) -> dict[str, Tensor]:
    if isinstance(activations, Tensor):
        if activations.dim() != 3:
            raise InputError(f"a tensor of activations must be [site, n, d]; got {tuple(activations.shape)}")
        return {str(i): a for i, a in enumerate(activations)}
    if isinstance(activations, Mapping):
        sites = {str(k): v for k, v in activations.items()}
    elif isinstance(activations, Sequence):
        sites = {str(i): v for i, v in enumerate(activations)}
    else:
        raise InputError("activations_by_site must be a dict {site name: [n, d] tensor}, a list of "
                         f"[n, d] tensors or a [site, n, d] tensor; got {type(activations).__name__}")
    if not sites:
        raise InputError("activations_by_site is empty")
    out = {}
    for name, v in sites.items():
        t = torch.as_tensor(v)
        if t.dim() != 2:
            raise InputError(f"site {name!r}: activations must be [n, d]; got shape {tuple(t.shape)}. Capture one "
                             "position per example (positions='last' or a boolean mask), or pool [batch, seq, d] "
                             "with probes.aggregate_tokens(x, attention_mask)")
        check_finite(t, f"site {name!r}")
        out[name] = t
    sizes = {t.shape[0] for t in out.values()}
    if len(sizes) != 1:
        raise InputError(f"every site must hold the same examples; got row counts {sorted(sizes)}")
    return out


def _check_sizes(sizes: tuple[int, ...], widths: dict[str, int]) -> None:
    """Warn about probe sizes some sites are too narrow for; refuse sizes that fit no site at all."""
    if min(sizes) > max(widths.values()):
        raise InputError(f"n_neurons={list(sizes)}: every size exceeds the width of every site ({max(widths.values())} "
                         "neurons at most), so no probe can be fitted; choose sizes up to the sites' width")
    dropped = {}
    for name, width in widths.items():
        over = [k for k in sizes if k > width]
        if over:
            dropped.setdefault((tuple(over), width), []).append(name)
    for (over, width), names in dropped.items():
        shown = names if len(names) <= 5 else names[:5] + [f"... {len(names) - 5} more"]
        warnings.warn(f"n_neurons {list(over)} exceed the {width} neurons of site(s) {shown}: no probe of those "
                      "sizes is fitted there (the other sizes and sites are)", UserWarning, stacklevel=3)


@renamed_keywords({"ks": "n_neurons", "activations_by_layer": "activations_by_site"})
def sweep(
    activations_by_site: Mapping[str, Float[Tensor, "n d"]] | Float[Tensor, "site n d"],
    labels,
    n_neurons: Sequence[int] | None = None,
    method: str = "f_stat",
    *,
    groups=None,
    config: SweepConfig | None = None,
    progress: bool = True,
    **options,
) -> SweepResult:
    """Fit sparse probes for every site and every probe size; returns a :class:`probes.SweepResult`.

    Args:
        activations_by_site: ``{site name: [n, d]}`` (any activations: MLP neurons, residual
            dimensions, SAE latents), a list of ``[n, d]``, or a ``[site, n, d]`` tensor.
        labels: one binary label per example (any two values).
        n_neurons: probe sizes (neurons per probe); None: ``config.n_neurons``, or
            :data:`DEFAULT_N_NEURONS` without a config. ``ks=`` is its deprecated name.
        method: selection method (see :class:`SweepConfig`).
        groups: one id per example (document, entity); whole groups go to train or test.
        config: a :class:`SweepConfig`; other keyword options (``C``, ``seed``, ``balance``,
            ``device`` ...) build one, or replace its fields.

    Probe sizes larger than a site's width are skipped for that site with a ``UserWarning`` naming the
    sizes and sites: a partial result is what a sweep over sites of several widths wants (the other
    sizes and sites are still fitted). When no size fits any site, :class:`InputError`.
    """
    if n_neurons is not None:
        options["n_neurons"] = tuple(n_neurons)
    if config is None:
        config = SweepConfig(method=method, **options)
    elif options:
        config = dataclasses.replace(config, **options)
    sites = _as_sites(activations_by_site)
    n = next(iter(sites.values())).shape[0]
    y, classes = encode_labels(labels, n)
    train, test = train_test_split(n, config.test_size, config.seed, stratify=y, groups=groups)
    if config.balance == "undersample":
        train = train[undersample(y[train], config.seed)]
    check_both_classes(y[train], "the training split")
    check_both_classes(y[test], "the test split")
    _check_sizes(config.n_neurons, {name: t.shape[1] for name, t in sites.items()})
    by_width: dict[int, list[str]] = {}
    for name, t in sites.items():
        by_width.setdefault(t.shape[1], []).append(name)
    chunks = []
    for names in by_width.values():
        step = config.layer_batch or len(names)
        chunks += [names[i:i + step] for i in range(0, len(names), step)]
    result = SweepResult(config=config, classes=classes, sites=list(sites), n_train=len(train), n_test=len(test))
    bar = tqdm(total=sum(len(c) for c in chunks), desc=f"sweep ({config.method})", unit="site",
               disable=not progress)
    scratch: dict[str, Tensor] = {}  # buffers reused across chunks (fresh memory costs page faults)
    for names in chunks:
        _sweep_chunk(result, [sites[nm] for nm in names], names, y, train, test, config, scratch)
        bar.update(len(names))
    bar.close()
    result.records.sort(key=lambda r: (result.sites.index(r["site"]), r["n_neurons"]))
    return result


def _sweep_chunk(result: SweepResult, tensors: list[Tensor], names: list[str], y: Tensor,
                 train: Tensor, test: Tensor, cfg: SweepConfig, scratch: dict[str, Tensor]) -> None:
    device = torch.device(cfg.device) if cfg.device else tensors[0].device
    dtype = tensors[0].dtype if tensors[0].dtype in (torch.float32, torch.float64) else torch.float32
    n_sites, d = len(tensors), tensors[0].shape[1]
    train, test = train.to(device), test.to(device)
    order = torch.cat([train, test])  # training rows first, then test rows
    n, n_tr = len(order), len(train)
    xs = [t.to(device=device, dtype=dtype) for t in tensors]
    yd = y.to(device, dtype)[order]
    y_tr, y_te = yd[:n_tr], yd[n_tr:]
    w_tr = balanced_weights(y_tr) if cfg.balance == "weight" else None
    is_train = torch.zeros(len(y), dtype=dtype, device=device)
    is_train[train] = 1
    yall = y.to(device, dtype)
    stats = [_class_stats(x[None], yall, is_train) for x in xs]  # one pass per site: scores and scales
    if cfg.method == "f_stat":
        ranking = torch.cat([rank_by_score(_f_stat_from_stats(*st)) for st in stats])
    elif cfg.method == "mean_diff":
        ranking = torch.cat([rank_by_score(_mean_diff_from_stats(*st, standardize=cfg.standardize))
                             for st in stats])
    else:
        x_tr = torch.stack([x.index_select(0, train) for x in xs])
        ranking = rank_neurons(x_tr, y_tr, cfg.method, sample_weight=w_tr,
                               C=cfg.C, standardize=cfg.standardize)
        del x_tr
    top = min(cfg.top_n, d)
    width = max(min(max(cfg.n_neurons), d), top)
    # the selected neurons [L, rows, width], best first, so a probe of m neurons reads the first m
    # columns; only they are ever fitted, so only they are scaled
    sel = _buffer(scratch, "sel", (n_sites, n, width), dtype, device)
    buf = _buffer(scratch, "buf", (len(y), width), dtype, device)
    for i, (x, (m0, m1, n0, n1, ssd)) in enumerate(zip(xs, stats)):
        idx = ranking[i, :width]
        torch.index_select(x, 1, idx, out=buf)
        if cfg.standardize:  # (x - mean) / std as x * (1 / std) - mean / std in one pass
            std = (ssd[0, idx] / (n0 + n1)).sqrt()
            inv = 1 / torch.where(std > 1e-6, std, torch.ones_like(std))
            torch.addcmul(-((n0 * m0 + n1 * m1) / (n0 + n1))[0, idx] * inv, buf, inv, out=buf)
        torch.index_select(buf, 0, order, out=sel[i])
    del buf, xs, stats
    views = [sel]  # narrow fits read dense copies of the first 64 and 8 columns: whole cache lines
    for cols in (64, 8):
        if views[-1].shape[2] > cols:
            views.append(_buffer(scratch, f"first{cols}", (n_sites, n, cols), dtype, device))
            views[-1].copy_(views[-2][:, :, :cols])
    fits, coef = [], torch.zeros(n_sites, 0, dtype=dtype, device=device)
    b = torch.zeros(n_sites, dtype=dtype, device=device)
    z = torch.zeros(n_sites, n_tr, dtype=dtype, device=device)
    for size in cfg.n_neurons:
        if size > d:
            continue
        # supports are nested: warm start from the previous size (its logits stay those of the new init)
        init = (torch.cat([coef, coef.new_zeros(n_sites, size - coef.shape[1])], 1), b)
        x_sel = next(v for v in views[::-1] if v.shape[2] >= size)[:, :, :size]
        coef, b, z = fit_logistic_logits(x_sel[:, :n_tr], y_tr, C=cfg.C, sample_weight=w_tr, max_iter=cfg.max_iter,
                                         tol=cfg.tol, init=init, hessian_rows=cfg.hessian_rows, init_logits=z)
        fits.append((size, coef, z, predict_logits(x_sel[:, n_tr:], coef, b)))
    if fits:  # metrics of every probe size at once: [n_sizes, L, rows]
        test_rep = {m: v.tolist() for m, v in classification_report(y_te, torch.stack([f[3] for f in fits])).items()}
        train_f1 = f1(y_tr.expand(len(fits), n_sites, -1), (torch.stack([f[2] for f in fits]) > 0).to(dtype)).tolist()
        for j, (size, coef, _, _) in enumerate(fits):
            coefs, neurons = coef.tolist(), ranking[:, :size].tolist()
            for i, name in enumerate(names):
                rec = SweepRecord(site=name, n_neurons=size, method=cfg.method)
                rec.update({m: float(v[j][i]) for m, v in test_rep.items()})
                rec["train_f1"] = float(train_f1[j][i])
                rec["neurons"] = neurons[i]
                rec["coef"] = [round(c, 6) for c in coefs[i]]
                result.records.append(rec)
    if top:  # each of the best-ranked neurons alone, as a 1-sparse probe
        x1 = sel[:, :, :top].mT.reshape(n_sites * top, n, 1)
        coef, b = fit_logistic(x1[:, :n_tr], y_tr, C=cfg.C, sample_weight=w_tr, max_iter=cfg.max_iter, tol=cfg.tol)
        rep = classification_report(y_te, predict_logits(x1[:, n_tr:], coef, b))
        for i, name in enumerate(names):
            sl = slice(i * top, (i + 1) * top)
            result.top_neurons[name] = [
                {"neuron": int(nr), "f1": float(f), "auc": float(a), "coef": float(c)}
                for nr, f, a, c in zip(ranking[i, :top], rep["f1"][sl], rep["auc"][sl], coef[sl, 0])]
    for i, name in enumerate(names):
        result.rankings[name] = ranking[i].cpu()


def _buffer(scratch: dict[str, Tensor], name: str, shape: tuple[int, ...], dtype, device) -> Tensor:
    """An uninitialised ``shape`` tensor backed by ``scratch[name]``, grown when too small."""
    numel = math.prod(shape)
    old = scratch.get(name)
    if old is None or old.numel() < numel or old.dtype != dtype or old.device != torch.device(device):
        old = scratch[name] = torch.empty(numel, dtype=dtype, device=device)
    return old[:numel].view(shape)
