"""`interp features circles|clusters` on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_util import one_error_line

import saes
from interp.cli import main
from interp.errors import InputError
from interp.features.clusters import graph_clusters
from interp.features.items import build_prompts, resolve_items
from interp.subspace import Subspace


def write_sae(folder: Path, w_dec: torch.Tensor, k: int = 4, meta=None) -> Path:
    """Save a TopK SAE whose decoder is `w_dec` (encoder: its transpose plus noise)."""
    d_sae, d_model = w_dec.shape
    sae = saes.build("topk", d_model=d_model, d_sae=d_sae, k=k)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T + 0.01 * torch.randn(d_model, d_sae, generator=g))
    return saes.save(sae, folder, metadata=meta or {})


def test_circles_cli_writes_json_png_and_subspaces(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["features", "circles", "--model", str(tiny_dir), "--layers", "0-1", "--items", "days",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "circles.json").read_text())
    assert [r["site"] for r in summary["sites"]] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert summary["n_prompts"] == 7 * summary["n_templates"]
    for r in summary["sites"]:
        assert sorted(r["cyclic_order"]) == sorted(summary["items"])
        sub = Subspace.load(out / "subspaces" / r["site"])
        assert sub.coord_map.angles == pytest.approx(r["angles"])
        assert (out / f"{r['site']}.png").stat().st_size > 1000
    assert (out / "scores.png").exists()
    assert "LOCO err" in capsys.readouterr().out
    # the recorded command runs again: machine paths as placeholders, no list reprs
    assert summary["command"] == ("interp features circles --device cpu --hook hook_resid_post --items days "
                                  "--layers 0-1 --model MODEL --out OUT --rank 2")
    for r in summary["sites"]:  # the circle probe beside the class-mean circle
        probe = Subspace.load(out / "subspaces" / f"{r['site']}.probe")
        assert probe.meta["finder"] == "circle_probe" and probe.coord_map.axes is not None
        assert probe.meta["loco_angle_error"] == pytest.approx(r["probe_loco_angle_error"])
        assert 0 <= r["probe_loto_angle_error"] <= 3.15 and len(r["probe_r2"]) == 2
        assert sorted(r["probe_angles"]) == sorted(summary["items"])


def test_clusters_cli_on_sae_folder(tiny_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 32, generator=g)
    w_dec = torch.cat([base.repeat_interleave(3, 0) + 0.3 * torch.randn(12, 32, generator=g),
                       torch.randn(20, 32, generator=g)])  # 4 planted groups of 3 similar latents
    sae_dir = write_sae(tmp_path / "sae", w_dec, meta={"model_name": str(tiny_dir),
                                                      "hook_name": "blocks.1.hook_resid_post"})
    out = tmp_path / "out"
    rc = main(["features", "clusters", "--sae", str(sae_dir), "--tokens", "3000", "--batch-tokens", "500",
               "--method", "graph", "--n-neighbors", "2", "--sim-cutoff", "0.5", "--min-points", "10",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "clusters.json").read_text())
    # the rows read, not the --tokens asked for: every batch of 500 until 3000 or every cluster had its points
    assert summary["tokens"] == 3000 and 0 < summary["rows_read"] <= 3000 and summary["rows_read"] % 500 == 0
    expected = {tuple(sorted(c)) for c in graph_clusters(w_dec, n_neighbors=2, sim_cutoff=0.5) if len(c) >= 2}
    assert {tuple(sorted(c["latents"])) for c in summary["clusters"]} <= expected
    scores = [c["irreducibility"] for c in summary["clusters"]]
    assert scores == sorted(scores, reverse=True)
    if summary["clusters"]:
        assert (out / "clusters.png").stat().st_size > 1000


def test_clusters_cli_says_what_to_change_when_nothing_is_found(tiny_dir, tmp_path, capsys):
    w_dec = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))  # random atoms: no pair above 0.9
    sae_dir = write_sae(tmp_path / "sae", w_dec, meta={"model_name": str(tiny_dir),
                                                      "hook_name": "blocks.1.hook_resid_post"})
    rc = main(["features", "clusters", "--sae", str(sae_dir), "--tokens", "500", "--batch-tokens", "250",
               "--method", "graph", "--sim-cutoff", "0.9", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert rc == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("hint: ")]
    assert len(hints) == 1 and "lower sim_cutoff below" in hints[0]
    assert json.loads((tmp_path / "out" / "clusters.json").read_text())["n_scored"] == 0


def test_clusters_cli_reads_through_the_validating_loader(tmp_path, capsys):
    folder = write_sae(tmp_path / "sae", torch.randn(12, 8))
    weights = folder / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit: the recorded SHA-256 no longer matches, so saes.read refuses it
    weights.write_bytes(bytes(data))
    assert main(["features", "clusters", "--sae", str(folder), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "corrupt" in err and str(folder) in err


def test_item_and_arg_errors(tmp_path):
    with pytest.raises(InputError, match="at least 3"):
        resolve_items("a,b")
    with pytest.raises(InputError, match="must end with"):
        build_prompts(["Monday"], ["{} is a day"])
    assert main(["features", "circles", "--out", str(tmp_path / "o")]) == 1  # no site named


def test_a_repeated_site_is_recorded_as_one_flag_each():
    """circles.json recorded --site ['a', 'b'], which no shell can run again, and dropped options equal to 0."""
    from interp.cli import build_parser
    from interp.cli.features import recorded_flags

    args = build_parser().parse_args(["features", "circles", "--site", "blocks.1.hook_resid_post", "--site",
                                      "blocks.2.hook_resid_post", "--rank", "0", "--out", "o"])
    flags = recorded_flags(args)
    assert [f for f in flags if f.startswith("--site")] == ["--site blocks.1.hook_resid_post",
                                                            "--site blocks.2.hook_resid_post"]
    assert "--rank 0" in flags and "--out o" in flags
