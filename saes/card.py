"""The model card (README.md with YAML front matter) and latent-density plot of a folder of SAEs.

Every number on the card is read from the checkpoints themselves: the architecture and sizes
from the config, training tokens and evaluation metrics from the training summary that
:func:`saes.checkpoint.save` / :func:`saes.checkpoint.annotate` stored, the density plot from
``sparsity.safetensors``. Nothing here uploads; see :mod:`saes.publish`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import yaml

from interp.atomic import atomic_path
from interp.deprecation import renamed_function
from saes.checkpoint import Checkpoint
from saes.evaluate import DENSITY_PLOT
from saes.losses import MASSIVE_ROW
from saes.peers import NOT_SAELENS_PREFIX

CARD_METRICS = (("l0_mean", "L0"), ("explained_variance", "Explained variance"),
                ("ce_loss_recovered", "CE loss recovered"))
"""``training["metrics"]`` keys shown on the card (all required to publish), with their labels; the
names are :func:`saes.evaluate.evaluate`'s."""
BASE_MODELS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
               "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
               "embedded": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""This project's model aliases -> Hub ids (the embedded model is a Q4_1 GGUF of this one)."""
MASSIVE_METRICS = (("explained_variance_typical", "Explained variance (typical rows)"),
                   ("massive_variance_share", "Massive rows' variance share"))
"""The explained variance without the massive-activation rows and those rows' share of the variance
(:func:`saes.evaluate.reconstruction_metrics`), shown beside the explained variance over every row."""
OPTIONAL_METRICS = (*MASSIVE_METRICS, ("absorption_full", "Absorption (full)"),
                    ("absorption_fraction", "Absorption fraction"))
"""Columns shown when a checkpoint holds them: :data:`MASSIVE_METRICS` (recorded by evaluations since they
were added) and the first-letter absorption that ``interp sae eval --absorption`` records under
``training["metrics"]["absorption"]`` (:func:`probes.first_letter_absorption`)."""
SPARSITY_FIELDS = (("k", "k"), ("n_steps", "MP steps"))
"""Config fields that set an SAE's sparsity, shown on the card where the architecture has them:
``k`` active latents per row (TopK; BatchTopK's batch mean), ``n_steps`` matching-pursuit steps."""


def same_model(a: str, b: str) -> bool:
    """Whether two model names (recorded in checkpoints, or given on the command line) name the same model: the
    same text, names this project maps to the same Hub id (:data:`BASE_MODELS`: ``smollm2-135m`` and
    ``HuggingFaceTB/SmolLM2-135M-Instruct``), or two paths to the same local folder."""
    a, b = str(a), str(b)
    if a == b or BASE_MODELS.get(a.lower(), a) == BASE_MODELS.get(b.lower(), b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def base_model(metadata: dict[str, Any]) -> str | None:
    """The Hub id of the model the SAE reads, where it can be told."""
    name = metadata.get("base_model") or metadata.get("model_name")
    if not isinstance(name, str):
        return None
    if name.lower() in BASE_MODELS:
        return BASE_MODELS[name.lower()]
    looks_like_repo = name.count("/") == 1 and not os.path.isabs(name) and not Path(name).exists()
    return name if looks_like_repo else None


def summary(site: str, ckpt: Checkpoint) -> dict[str, Any]:
    """One row of the card: what the config, training summary and sparsity say about one SAE."""
    cfg = ckpt.sae.cfg
    fields = {f.name for f in dataclasses.fields(cfg)}
    metrics = ckpt.training.get("metrics") if isinstance(ckpt.training.get("metrics"), dict) else {}
    row: dict[str, Any] = {
        "site": site or ckpt.metadata.get("hook_name") or "",
        "hook_name": ckpt.metadata.get("hook_name"),
        "architecture": ckpt.sae.architecture,
        "d_model": cfg.d_model,
        "d_sae": cfg.d_sae,
        **{name: getattr(cfg, name) if name in fields else None for name, _ in SPARSITY_FIELDS},
        "training_tokens": ckpt.training.get("n_tokens"),
    }
    row.update({key: metrics.get(key) for key, _ in (*CARD_METRICS, *MASSIVE_METRICS)})
    absorption = metrics.get("absorption") if isinstance(metrics.get("absorption"), dict) else {}
    row["absorption_full"] = absorption.get("full_absorption_rate")
    row["absorption_fraction"] = absorption.get("absorption_fraction")
    row["eval_tokens"] = metrics.get("n_rows")
    row["eval_predicted_tokens"] = metrics.get("n_predicted_tokens")
    evaluation = metrics.get("evaluation")
    row["evaluated_on"] = evaluated_on(evaluation, ckpt.metadata) if isinstance(evaluation, dict) else None
    if isinstance(metrics.get("dead_fraction"), (int, float)):
        row["dead_fraction"] = metrics["dead_fraction"]
    elif ckpt.sparsity is not None:
        row["dead_fraction"] = float((ckpt.sparsity <= 0).float().mean())
    return row


def evaluated_on(evaluation: dict[str, Any], metadata: dict[str, Any]) -> str:
    """One line saying what an evaluation's metrics were measured on (``training["metrics"]["evaluation"]``, which
    ``interp sae eval`` records): the cache or dataset, rows, seed, the downstream loss's windows, and the site or
    model where they are not the SAE's own."""
    rows = evaluation.get("rows")
    seed = evaluation.get("seed")
    counted = ", ".join(x for x in (f"{_fmt(rows)} rows" if rows is not None else "",
                                    f"seed {seed}" if seed is not None else "") if x)
    if evaluation.get("cache"):
        of = evaluation.get("dataset")
        text = f"activation cache `{evaluation['cache']}`" + (f" of dataset `{of}`" if of else "")
    else:
        text = f"live activations of dataset `{evaluation.get('dataset')}`"
    text += f" ({counted})" if counted else ""
    if evaluation.get("windows"):
        text += (f"; downstream loss on {evaluation['windows']} windows of {evaluation.get('windows_context_size')} "
                 f"tokens of `{evaluation.get('windows_dataset')}`")
    else:
        text += "; no downstream loss"
    site, model = evaluation.get("site"), evaluation.get("model")
    if site and site != metadata.get("hook_name"):
        text += f"; at site `{site}`, not the SAE's `{metadata.get('hook_name')}`"
    if model and model != metadata.get("model_name"):
        text += f"; model `{model}`"
    return text


def front_matter(rows: list[dict[str, Any]], base: str | None, saelens_ok: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "saelens" if saelens_ok else "interp-toolkit",
        "tags": ["sparse-autoencoder", "sae", "interpretability", "interp-toolkit"]
        + (["saelens"] if saelens_ok else []),
    }
    if base:
        meta["base_model"] = base
    meta["sites"] = [r["site"] for r in rows]
    meta["saes"] = [{k: v for k, v in r.items() if v is not None} for r in rows]
    return meta


def render_card(checkpoints: dict[str, Checkpoint], repo_id: str, *, plot: str | None = DENSITY_PLOT,
                dashboards: tuple[str, ...] = ()) -> str:
    """README.md text for ``{site: Checkpoint}`` to be published as ``repo_id``; `dashboards` are the
    folders (relative to the card) of feature dashboards written by ``interp dashboard``, linked from it."""
    rows = [summary(site, ck) for site, ck in checkpoints.items()]
    first = next(iter(checkpoints.values()))
    base = base_model(first.metadata)
    saelens_ok = all(not ck.config.get("architecture", "").startswith(NOT_SAELENS_PREFIX)
                     for ck in checkpoints.values())
    yaml_text = yaml.safe_dump(front_matter(rows, base, saelens_ok), sort_keys=False, allow_unicode=True)
    site = rows[0]["site"]
    archs = ", ".join(sorted({r["architecture"] for r in rows}))
    lines = [
        "---", yaml_text.rstrip(), "---", "",
        f"# Sparse autoencoders for {base or first.metadata.get('model_name') or 'an unnamed model'}", "",
        f"{len(rows)} sparse autoencoder{'s' if len(rows) != 1 else ''} ({archs}) "
        f"trained with [interp-toolkit](https://pypi.org/project/interp-toolkit/) on the activations of "
        f"`{first.metadata.get('model_name')}`, one subfolder per site.", "",
        "## Load", "", "```python", "import saes", "",
        f'sae = saes.load("{repo_id}", site="{site}")  # downloads only that site\'s files',
        "codes = sae.encode(activations)  # [..., d_model] -> [..., d_sae]", "```", "",
    ]
    if saelens_ok:
        lines += ["The folders use SAELens' v6 layout, so SAELens reads them too:", "", "```python",
                  "from huggingface_hub import snapshot_download", "from sae_lens import SAE", "",
                  f'path = snapshot_download("{repo_id}", allow_patterns="{site}/*")',
                  f'sae = SAE.load_from_disk(f"{{path}}/{site}")', "```", ""]
    lines += ["## SAEs", "", _table(rows), ""]
    lines += ["L0: mean active latents per token. Explained variance: 1 - sum of squared errors / total "
              "variance about the mean, over the whole evaluation set. CE loss recovered: "
              "(CE with zero-ablation - CE with the SAE spliced in) / (CE with zero-ablation - clean CE). "
              "Dead: fraction of latents whose recorded firing frequency is 0.", ""]
    if any(r.get("explained_variance_typical") is not None for r in rows):
        lines += [f"Typical rows: the evaluation rows whose squared norm is at most {MASSIVE_ROW:g} x the median "
                  "(residual streams hold a few massive activations far above that; the variance share column is "
                  "theirs). Where they hold most of the variance, the explained variance over every row measures "
                  "mostly them, and the typical-row figure is the one that describes most tokens.", ""]
    if any(r.get("absorption_full") is not None for r in rows):
        lines += ["Absorption: first-letter feature absorption (Chanin et al., the metric SAEBench reports), "
                  "measured on single-token words of the model's vocabulary. Full: fraction of the words a dense "
                  "probe recognises where the letter's main latents stay silent and another latent aligned with "
                  "the probe carries the letter; fraction: the share of the probe projection carried by such "
                  "latents. Means over the letters evaluated; lower is better.", ""]
    if any(r.get("evaluated_on") for r in rows):
        lines += ["Evaluation data (each SAE's metrics come from one evaluation, measured on):", ""]
        lines += [f"- `{r['site']}`: {r.get('evaluated_on') or 'not recorded'}" for r in rows]
        lines += [""]
    if plot:
        lines += ["## Latent density", "", f"![Latent density]({plot})", "",
                  "Histogram of log10 firing frequency of each latent (fraction of tokens where it is nonzero).", ""]
    if dashboards:
        links = ", ".join(f"[`{d}/index.html`]({d}/index.html)" for d in dashboards)
        lines += ["## Dashboards", "",
                  f"What each latent responds to: {links}, static pages written by `interp dashboard sae` (top "
                  "activating contexts, samples by activation quantile, activation histogram, promoted and "
                  "suppressed tokens, nearest latents). Download the folder and open `index.html` in a browser; "
                  "the pages need no server and no network.", ""]
    lines += ["## Files", "",
              "Each site folder holds `cfg.json` (SAELens keys plus this project's `interp` block: format "
              "version, library version, the full SAE config, the training summary and file checksums), "
              "`sae_weights.safetensors` (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_in]`, `b_dec`, "
              "`threshold` where the architecture has one) and `sparsity.safetensors` (log10 firing "
              "frequency). No pickles.", ""]
    versions = sorted({ck.library_version for ck in checkpoints.values() if ck.library_version})
    if versions:
        lines += [f"Written by interp-toolkit {', '.join(versions)}.", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    sparsity = [col for col in SPARSITY_FIELDS if any(r.get(col[0]) is not None for r in rows)]
    cols = [("site", "Site"), ("architecture", "Architecture"), ("d_model", "d_model"), ("d_sae", "d_sae"),
            *sparsity, ("training_tokens", "Training tokens"), *CARD_METRICS, ("dead_fraction", "Dead"),
            *(col for col in OPTIONAL_METRICS if any(r.get(col[0]) is not None for r in rows))]
    out = ["| " + " | ".join(label for _, label in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"`{r[k]}`" if k == "site" else _fmt(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(out)


def plot_latent_density(checkpoints: dict[str, Checkpoint], path: str | os.PathLike) -> Path:
    """Histogram of log10 firing frequency per site, written as a PNG (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    live = [ck.sparsity[ck.sparsity > 0] for ck in checkpoints.values() if ck.sparsity is not None]
    lowest = min((float(s.min()) for s in live if s.numel()), default=1e-10)
    floor = max(-10.0, math.floor(math.log10(lowest)) - 1.0)  # dead latents sit in the leftmost bin
    for site, ck in checkpoints.items():
        if ck.sparsity is None:
            continue
        freq = ck.sparsity.float()
        logf = freq.clamp_min(10**floor).log10()
        dead = int((freq <= 0).sum())
        ax.hist(logf.numpy(), bins=60, range=(floor, 0.0), histtype="step", linewidth=1.4,
                label=f"{site or 'sae'} (dead: {dead}/{freq.numel()})")
    ax.set_xlabel("log10 firing frequency (dead latents at the left edge)")
    ax.set_ylabel("latents")
    ax.set_xlim(floor, 0.0)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Latent density")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


plot_feature_density = renamed_function("plot_feature_density", plot_latent_density)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
