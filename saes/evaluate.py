"""Evaluate an SAE: reconstruction and sparsity over a whole evaluation set, and downstream loss
with the SAE spliced into the model.

Every ratio is accumulated over the whole set before dividing (explained variance done per batch
and averaged is a known bug class): ``explained_variance = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2``
with ``mean(x)`` the mean of the whole set, so predicting that mean scores exactly 0.

Metrics (keys of the returned dict):

* ``l0_mean``, ``l0_quantiles`` (5/25/50/75/95 %), ``l0_histogram`` (count of rows per L0 value);
* ``explained_variance``, ``fvu`` (= 1 - explained variance), ``mse`` (mean over elements),
  ``cosine_similarity`` (mean over rows of cos(x, x_hat));
* ``massive_rows``, ``massive_variance_share``, ``fvu_typical``, ``explained_variance_typical``: residual
  streams hold a few rows whose squared norm is far above the rest (massive activations; on the embedded
  model's layer 12 about 1 row in 7,000, holding ~85 % of the variance), and an FVU over every row then
  measures mostly those rows. Rows whose squared norm is over :data:`saes.losses.MASSIVE_ROW` x the median
  of the first batch's are counted as massive; ``massive_variance_share`` is their part of
  ``sum||x - mean(x)||^2`` and ``fvu_typical`` the FVU over the other rows (about their own mean).
  :func:`reconstruction_metrics` warns when the massive rows hold half the variance or more;
* ``dead_fraction`` (latents that never fire on the set), ``dense_fraction`` (latents firing on more
  than ``dense_threshold`` of the rows), and the per-latent ``latent_density`` (the fraction of rows
  each latent fires on; returned as a tensor, saved as SAELens' ``sparsity.safetensors`` = log10
  density, and as the histogram ``latent_density.png``);
* with a model: ``ce_clean``, ``ce_with_sae``, ``ce_zero_ablation``, ``ce_loss_recovered``
  (``(ce_zero - ce_sae) / (ce_zero - ce_clean)``), ``kl_to_clean`` (mean KL(clean || with SAE) per
  predicted token) and ``delta_lm_loss`` (``ce_sae - ce_clean``).

The report is an :class:`EvalReport`: ``report["feature_density"]``, the old name of
``latent_density``, still reads for one release (with a DeprecationWarning).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from interp.atomic import atomic_path, write_json
from interp.deprecation import RenamedKeys
from saes.base import SAE, SAEError
from saes.losses import MASSIVE_ROW, massive_limit

DENSITY_KEY = "latent_density"
"""Report key of the per-latent firing rate ``[d_sae]`` (fraction of rows where the latent is nonzero)."""
DENSITY_PLOT = "latent_density.png"
"""File name of the density histogram :func:`save_report` writes."""
MASSIVE_SHARE_WARNING = 0.5
"""``massive_variance_share`` at or above which :func:`reconstruction_metrics` warns that ``fvu`` is mostly
the massive rows'."""
RENAMED_KEYS = {"feature_density": DENSITY_KEY}
"""Report keys renamed since the previous release (old -> new); the old ones are still read."""


class EvalReport(RenamedKeys):
    """The dict of metrics :func:`evaluate` returns (plain keys and values; JSON-able but for the
    ``latent_density`` tensor). Reading an old key (``report["feature_density"]``) still works, with
    a DeprecationWarning."""

    _renamed: ClassVar[dict[str, str]] = RENAMED_KEYS
    _owner: ClassVar[str] = "saes.evaluate report"


def latent_density(report: dict[str, Any]) -> Tensor | None:
    """The per-latent density of a report, under its current or its old key (None when absent)."""
    for key in (DENSITY_KEY, "feature_density"):
        if key in report:
            return report[key]
    return None


def explained_variance(x: Float[Tensor, "n d_model"], x_hat: Float[Tensor, "n d_model"]) -> float:
    """``1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2`` over all rows of ``x``."""
    acc = ReconstructionStats(d_model=x.shape[-1], d_sae=1)
    acc.update(x, x_hat, torch.zeros(x.shape[0], 1))
    return acc.result()["explained_variance"]


class ReconstructionStats:
    """Streaming sums for the reconstruction and sparsity metrics (exact over the whole set), kept for every
    row and, apart, for the massive rows (squared norm over ``MASSIVE_ROW`` x the first batch's median)."""

    def __init__(self, d_model: int, d_sae: int):
        self.n = 0
        self.sum_x = torch.zeros(d_model, dtype=torch.float64)
        self.sum_x2 = torch.zeros((), dtype=torch.float64)
        self.sum_err = torch.zeros((), dtype=torch.float64)
        self.sum_cos = torch.zeros((), dtype=torch.float64)
        self.fires = torch.zeros(d_sae, dtype=torch.float64)
        self.l0: list[Tensor] = []
        self.d_model = d_model
        self.massive_limit: float | None = None
        """Squared norm above which a row counts as massive (set by the first batch; inf when its median is 0)."""
        self.n_m = 0
        self.sum_x_m = torch.zeros(d_model, dtype=torch.float64)
        self.sum_x2_m = torch.zeros((), dtype=torch.float64)
        self.sum_err_m = torch.zeros((), dtype=torch.float64)

    def update(self, x: Float[Tensor, "n d_model"], x_hat: Float[Tensor, "n d_model"],
               codes: Float[Tensor, "n d_sae"]) -> None:
        x, x_hat = x.detach().double().cpu(), x_hat.detach().double().cpu()
        active = (codes.detach() != 0).cpu()
        sq, err = x.pow(2).sum(-1), (x - x_hat).pow(2).sum(-1)
        if self.massive_limit is None and x.shape[0]:
            self.massive_limit = float(massive_limit(sq))
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += sq.sum()
        self.sum_err += err.sum()
        self.sum_cos += F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum()
        self.fires += active.sum(0).double()
        self.l0.append(active.sum(-1))
        if self.massive_limit is not None:
            big = sq > self.massive_limit
            if big.any():
                self.n_m += int(big.sum())
                self.sum_x_m += x[big].sum(0)
                self.sum_x2_m += sq[big].sum()
                self.sum_err_m += err[big].sum()

    def _massive(self, total_var: Tensor) -> dict[str, Any]:
        """``massive_rows``, ``massive_variance_share`` and the FVU / explained variance over the other rows;
        ``total_var`` is every row's ``sum||x - mean(x)||^2``."""
        mean = self.sum_x / self.n
        # sum over the massive rows of ||x - mean||^2, mean being every row's
        var_m = self.sum_x2_m - 2 * (self.sum_x_m @ mean) + self.n_m * mean.pow(2).sum()
        n_t = self.n - self.n_m
        out: dict[str, Any] = {"massive_rows": self.n_m,
                               "massive_variance_share": float(var_m / total_var.clamp_min(1e-30))}
        if n_t:
            sum_x_t = self.sum_x - self.sum_x_m
            var_t = (self.sum_x2 - self.sum_x2_m) - sum_x_t.pow(2).sum() / n_t
            fvu_t = float((self.sum_err - self.sum_err_m) / var_t.clamp_min(1e-30))
            out.update(fvu_typical=fvu_t, explained_variance_typical=1 - fvu_t)
        return out

    def result(self, dense_threshold: float = 0.1) -> EvalReport:
        if self.n == 0:
            raise SAEError("no rows were evaluated: the evaluation data yielded nothing")
        total_var = self.sum_x2 - self.sum_x.pow(2).sum() / self.n
        l0 = torch.cat(self.l0).float()
        density = self.fires / self.n
        q = torch.quantile(l0, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
        return EvalReport({
            "n_rows": self.n,
            "explained_variance": float(1 - self.sum_err / total_var.clamp_min(1e-30)),
            "fvu": float(self.sum_err / total_var.clamp_min(1e-30)),
            "mse": float(self.sum_err / (self.n * self.d_model)),
            "cosine_similarity": float(self.sum_cos / self.n),
            **self._massive(total_var),
            "l0_mean": float(l0.mean()),
            "l0_quantiles": dict(zip(["p05", "p25", "p50", "p75", "p95"], q)),
            "l0_histogram": torch.bincount(l0.long()).tolist(),
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold,
            DENSITY_KEY: density.float(),
        })


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable, *, site: str | None = None, n_batches: int | None = None,
                           dense_threshold: float = 0.1, progress: bool = True) -> EvalReport:
    """Reconstruction and sparsity metrics of ``sae`` over ``batches`` (tensors ``[rows, d_model]``
    of raw activations, or dicts ``{site: tensor}`` with ``site`` naming which)."""
    acc = ReconstructionStats(sae.cfg.d_model, sae.cfg.d_sae)
    bar = tqdm(total=n_batches, disable=not progress, desc="sae eval")
    for i, b in enumerate(batches):
        if isinstance(b, dict):
            if site is None and len(b) != 1:
                raise SAEError(f"the evaluation data yields sites {sorted(b)}: pass site=")
            b = b[site] if site is not None else next(iter(b.values()))
        x = b.to(sae.device)
        out = sae(x)
        acc.update(x.float(), out.x_hat.float(), out.codes)
        bar.update(1)
        if n_batches is not None and i + 1 >= n_batches:
            break  # before asking a live store for one more batch
    bar.close()
    report = acc.result(dense_threshold)
    share = report["massive_variance_share"]
    if share >= MASSIVE_SHARE_WARNING:
        typical = report.get("fvu_typical", float("nan"))
        warnings.warn(f"{report['massive_rows']} of {report['n_rows']} evaluated rows are massive activations "
                      f"(squared norm over {MASSIVE_ROW:g} x the median) and hold {share:.0%} of the variance, so "
                      f"fvu {report['fvu']:.4f} is mostly theirs; over the other rows fvu_typical is {typical:.4f}: "
                      "report both", stacklevel=2)
    return report


def _token_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-position next-token cross-entropy ``[batch, seq-1]``."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1)


@torch.no_grad()
def downstream_metrics(model, sae: SAE, site: str, windows: Int[Tensor, "n seq"], *,
                       splice_mask: Tensor | None = None, batch_size: int = 8,
                       progress: bool = True) -> dict[str, float]:
    """Next-token loss of ``model`` on ``windows`` clean, with the SAE's reconstruction spliced in at
    ``site``, and with the site zero-ablated. ``splice_mask [n, seq]`` (default: every position)
    says where the SAE replaces the activation; elsewhere the clean activation flows on, so positions
    the SAE never saw in training (position 0, separators) can be left alone."""
    from interp.sites import add_write_hook, remove_hooks, resolve

    target = resolve(model, site)
    if splice_mask is None:
        splice_mask = torch.ones_like(windows, dtype=torch.bool)
    dev = next(model.parameters()).device
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    current: dict[str, Tensor] = {}

    def splice(a: Tensor) -> Tensor:
        m = current["mask"].to(a.device)[..., None]
        return torch.where(m, sae(a.to(sae.dtype)).x_hat.to(a.dtype), a)

    def zero(a: Tensor) -> Tensor:
        return torch.where(current["mask"].to(a.device)[..., None], torch.zeros_like(a), a)

    for lo in tqdm(range(0, windows.shape[0], batch_size), disable=not progress, desc="downstream CE"):
        ids = windows[lo:lo + batch_size].to(dev)
        current["mask"] = splice_mask[lo:lo + batch_size]
        clean = model(input_ids=ids).logits
        logp_clean = clean.float().log_softmax(-1)[:, :-1]
        sums["clean"] += float(_token_ce(clean, ids).sum())
        del clean
        for name, fn in (("sae", splice), ("zero", zero)):
            handles = add_write_hook(target, fn)
            try:
                logits = model(input_ids=ids).logits
            finally:
                remove_hooks(handles)
            sums[name] += float(_token_ce(logits, ids).sum())
            if name == "sae":
                logp = logits.float().log_softmax(-1)[:, :-1]
                sums["kl"] += float((logp_clean.exp() * (logp_clean - logp)).sum())
            del logits
        count += ids.shape[0] * (ids.shape[1] - 1)
    ce = {k: v / count for k, v in sums.items()}
    denom = ce["zero"] - ce["clean"]
    return {"ce_clean": ce["clean"], "ce_with_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom != 0 else float("nan"),
            "kl_to_clean": ce["kl"], "delta_lm_loss": ce["sae"] - ce["clean"], "n_predicted_tokens": count}


def evaluate(sae: SAE, batches: Iterable, *, site: str | None = None, n_batches: int | None = None,
             model=None, windows: Tensor | None = None, splice_mask: Tensor | None = None,
             out_dir: str | os.PathLike | None = None, dense_threshold: float = 0.1,
             batch_size: int = 8, progress: bool = True) -> EvalReport:
    """All metrics: reconstruction over ``batches``; downstream loss when ``model`` and token
    ``windows`` are given (``site`` names where to splice). With ``out_dir``: ``eval.json``,
    ``sparsity.safetensors`` and ``latent_density.png`` are written there."""
    report = reconstruction_metrics(sae, batches, site=site, n_batches=n_batches,
                                    dense_threshold=dense_threshold, progress=progress)
    if model is not None:
        if site is None or windows is None:
            raise SAEError("downstream metrics need site= (where to splice) and windows= (token ids [n, seq])")
        report.update(downstream_metrics(model, sae, site, windows, splice_mask=splice_mask,
                                         batch_size=batch_size, progress=progress))
    if out_dir is not None:
        save_report(report, out_dir)
    return report


def save_report(report: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``eval.json``, ``sparsity.safetensors`` (log10 density) and ``latent_density.png``.

    ``report`` is :func:`evaluate`'s; one holding the density under its old key ``feature_density``
    is read too."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    density = latent_density(report)
    if density is None:
        raise SAEError(f"the report has no {DENSITY_KEY!r} (per-latent firing rate); pass the dict evaluate() "
                       f"returned; keys found: {sorted(report)}")
    log_density = torch.log10(density + 1e-10)
    with atomic_path(out / "sparsity.safetensors") as tmp:
        save_file({"sparsity": log_density.contiguous()}, str(tmp))
    skip = {DENSITY_KEY, *RENAMED_KEYS}
    write_json(out / "eval.json", {k: v for k, v in report.items() if k not in skip})
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.hist(log_density.numpy(), bins=60)
    ax.set_xlabel("log10 latent density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"dead {report['dead_fraction']:.1%}, dense {report['dense_fraction']:.1%}, "
                 f"L0 {report['l0_mean']:.1f}")
    fig.tight_layout()
    fig.savefig(out / DENSITY_PLOT, dpi=110)
    return out
