"""Render a dashboard's data as a static site: ``index.html``, ``style.css`` and ``units/<n>.html``.

The site is self-contained (one ``style.css`` beside ``index.html`` that every page links, inline
SVG plots, a few lines of inline JavaScript, nothing from outside the folder), so the folder opens
from ``file://`` with no server and no network. Jinja2 renders
them with autoescaping on: a token is text, never markup. The index lists the units with their
frequency, max activation, top context token and top promoted tokens; a search box filters them
(also from the address: ``index.html#q=word``) and buttons sort them by frequency or max activation
(``#sort=frequency``). Each unit page shows the histogram, the top contexts (each token's background
says its activation; hover for the value; the activating token is outlined), samples by quantile,
the logit tables and the nearest units.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from interp.atomic import write_text
from interp.dashboard.results import DashboardData, load
from interp.errors import InputError

__all__ = ["render"]

_VISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def _visible(text: str) -> str:
    return "".join(_VISIBLE.get(ch, ch) for ch in text) or "∅"


def _colour(act: float, scale: float) -> str:
    a = min(1.0, abs(act) / scale) if scale > 0 else 0.0
    return f"rgba(255, 120, 0, {a:.3f})" if act >= 0 else f"rgba(30, 110, 255, {a:.3f})"


def _edge(e: float | None) -> str:
    return "unbounded" if e is None else f"{e:.3g}"


def histogram_svg(hist: list[dict[str, Any]], width: int = 640, height: int = 140) -> str:
    """Bars of the nonzero bins (log-spaced bins drawn at equal widths), with the edges labelled."""
    used = [j for j, h in enumerate(hist) if h["count"]]
    if not used:
        return '<p class="meta">no nonzero activation</p>'
    lo, hi = used[0], used[-1]
    bins = hist[lo:hi + 1]
    top = max(h["count"] for h in bins)
    bw = width / len(bins)
    parts = [f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 30}" '
             f'role="img" aria-label="activation histogram">']
    for i, h in enumerate(bins):
        bh = (height - 10) * h["count"] / top
        parts.append(f'<rect x="{i * bw + 1:.1f}" y="{height - bh:.1f}" width="{max(bw - 2, 1):.1f}" '
                     f'height="{bh:.1f}" fill="#e07000"><title>{_edge(h["lo"])} to {_edge(h["hi"])}: '
                     f'{h["count"]}</title></rect>')
    step = max(1, len(bins) // 6)
    for i in range(0, len(bins) + 1, step):
        e = bins[i]["lo"] if i < len(bins) else bins[-1]["hi"]
        parts.append(f'<text x="{min(i * bw, width - 30):.1f}" y="{height + 16}" font-size="11">{_edge(e)}</text>')
    parts.append(f'<text x="0" y="{height + 29}" font-size="10" fill="#666">activation (log-spaced bins); bar '
                 f'height: count, tallest {top}</text></svg>')
    return "".join(parts)


def scatter_svg(points: dict[str, Sequence[float]], size: int = 320) -> str:
    """A scatter plot of labelled 2-D points (class means in a subspace's first two coordinates)."""
    xs = [float(p[0]) for p in points.values()]
    ys = [float(p[1]) for p in points.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-12)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    pad = 40

    def at(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - cx + span / 2) / span * (size - 2 * pad), size - pad - (y - cy + span / 2) / span *
                (size - 2 * pad))

    parts = [f'<svg class="scatter" xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
             'aria-label="class means">']
    from html import escape

    for label, x, y in zip(points, xs, ys):
        px, py = at(x, y)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="#1a55a0"/>'
                     f'<text x="{px + 7:.1f}" y="{py + 4:.1f}" font-size="12">{escape(str(label))}</text>')
    parts.append('<text x="4" y="14" font-size="10" fill="#666">coordinate 0 (right), coordinate 1 (up)</text></svg>')
    return "".join(parts)


def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(visible=_visible, colour=_colour, edge=_edge)
    return env


def render(folder: str | os.PathLike, units: Sequence[int] | None = None, *, title: str | None = None) -> Path:
    """Write ``index.html`` and one page per unit into `folder` (which holds the data of
    :func:`interp.dashboard.collect`); `units` limits the pages to those unit numbers (0-based, in the
    data's order). Returns the path of ``index.html``."""
    data: DashboardData = load(folder)
    n = data.n_units
    chosen = list(range(n)) if units is None else [int(u) for u in units]
    bad = [u for u in chosen if not 0 <= u < n]
    if bad or not chosen:
        raise InputError(f"units {bad or chosen} are not in 0..{n - 1} (the data holds {n} units)")
    info = data.info
    env = _env()
    folder = Path(folder)
    title = title or f"{info['kind']}s of {info['site']} ({info['model'] or 'model'})"
    records = []
    for pos, u in enumerate(chosen):
        rec = data.unit(u)
        scale = max([abs(a) for c in rec["contexts"] for _, a in c["tokens"]] + [0.0]) or 1.0
        page = env.get_template("unit.html").render(
            title=f"{rec['name']} · {title}", root="../", info=info, u=rec, scale=scale,
            histogram=histogram_svg(rec["histogram"]),
            prev=chosen[pos - 1] if pos > 0 else None, next=chosen[pos + 1] if pos + 1 < len(chosen) else None,
            pages=set(chosen))
        write_text(folder / "units" / f"{u}.html", _utf8(page))
        words = [rec["name"]] + [t for c in rec["contexts"][:3] for t, _ in c["tokens"]] + \
            [t for t, _ in rec["logits_up"][:5]]
        rec["search"] = " ".join(words).lower()
        records.append({k: rec[k] for k in ("index", "name", "frequency", "max", "contexts", "logits_up", "search")})
    points = (info.get("extra") or {}).get("class_means")
    scatter = scatter_svg(points) if points and all(len(p) >= 2 and all(map(math.isfinite, p[:2]))
                                                    for p in points.values()) else None
    write_text(folder / "style.css", (Path(__file__).parent / "templates" / "style.css").read_text())
    index = env.get_template("index.html").render(title=title, root="", info=info, units=records,
                                                  n_units=len(records),
                                                  scatter=scatter)
    return write_text(folder / "index.html", _utf8(index))


def _utf8(page: str) -> str:
    """The page with any text UTF-8 cannot hold (a lone surrogate in a hand-edited or foreign token text) as "?"."""
    try:
        page.encode("utf-8")
        return page
    except UnicodeEncodeError:
        return page.encode("utf-8", "replace").decode("utf-8")
