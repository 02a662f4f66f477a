"""A generated dashboard in a real browser (headless Chromium): the index lists the units, search
filters them, a unit page shows highlighted contexts and logit tables, and a screenshot is not blank.

Chromium is required: a missing browser fails the test (``.ci/run`` installs Debian's package)."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

N_UNITS = 12


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is missing: install it with `apt-get install -y chromium` (Debian's package)")
    return path


def _browser(*args: str) -> str:
    cmd = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from interp.dashboard import DashboardConfig, collect, render, sae_units

    root = tmp_path_factory.mktemp("dash")
    rng = random.Random(0)
    words = "the cat sat on <b>mat</b> & we met on Monday".split()
    docs = root / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) for _ in range(80)))
    g = torch.Generator().manual_seed(0)
    w_enc, w_dec = torch.randn(32, N_UNITS, generator=g) * 20, torch.randn(N_UNITS, 32, generator=g)
    units = sae_units(lambda x: torch.relu(x @ w_enc - 0.2), w_dec)
    cfg = DashboardConfig(tokens=800, dataset=str(docs), context_size=32, top_k=6, n_neighbors=3)
    out = collect(tiny_model("llama"), byte_tokenizer(), "blocks.1.hook_resid_post", units, root / "site", cfg,
                  progress=False)
    render(out)
    return out


def test_index_lists_every_unit_and_search_filters_them(site):
    dom = _browser("--dump-dom", (site / "index.html").as_uri())
    rows = re.findall(r"<tr data-index=\"(\d+)\"([^>]*)>", dom)
    assert sorted(int(i) for i, _ in rows) == list(range(N_UNITS))
    assert not any("hidden" in attrs for _, attrs in rows)
    dom = _browser("--dump-dom", (site / "index.html").as_uri() + "#q=latent%203")
    visible = [i for i, attrs in re.findall(r"<tr data-index=\"(\d+)\"([^>]*)>", dom) if "hidden" not in attrs]
    assert visible == ["3"]
    assert '<span id="shown">1</span>' in dom


def test_sorting_by_max_activation_from_the_address(site):
    from interp.dashboard import load

    data = load(site)
    maxes = {u: data.unit(u)["max"] for u in range(N_UNITS)}
    dom = _browser("--dump-dom", (site / "index.html").as_uri() + "#sort=max")
    order = [int(i) for i in re.findall(r"<tr data-index=\"(\d+)\"", dom)]
    shown = [maxes[u] if maxes[u] is not None else float("-inf") for u in order]
    assert shown == sorted(shown, reverse=True)


def test_unit_page_shows_highlighted_contexts_and_logit_tables(site, tmp_path):
    from PIL import Image

    page = site / "units" / "0.html"
    dom = _browser("--dump-dom", page.as_uri())
    assert dom.count('class="tok center"') >= 3
    assert re.search(r'style="background: rgba\(255, 120, 0, 1\.000\)"', dom)  # the top token, fully coloured
    assert 'id="promoted"' in dom and 'id="suppressed"' in dom and 'class="histogram"' in dom
    html = page.read_text()
    assert "&lt;</span>" in html and "&amp;</span>" in html and "><</span>" not in html  # tokens are text, not markup
    shot = tmp_path / "unit.png"
    _browser(f"--screenshot={shot}", "--window-size=1000,900", "--hide-scrollbars", page.as_uri())
    pixels = torch.tensor(list(Image.open(shot).convert("L").getdata()), dtype=torch.float32)
    assert pixels.numel() == 1000 * 900
    assert pixels.std() > 10 and (pixels < 200).float().mean() > 0.01  # text and coloured tokens, not a blank page
    coloured = Image.open(shot).convert("RGB").getcolors(1 << 20)
    assert any(r > 200 and 60 < g < 200 and b < 120 for _, (r, g, b) in coloured)  # the orange highlight


def test_pages_need_no_network(site):
    for page in [site / "index.html", *sorted((site / "units").glob("*.html"))]:
        text = page.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), page
        assert Path(page).stat().st_size < 200_000
