"""`interp features circles|clusters` on a tiny random model, and the SAE folder reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interp.cli import main
from interp.errors import InputError
from interp.features.clusters import graph_clusters
from interp.features.cli import parse_layers
from interp.features.items import build_prompts, resolve_items
from interp.features.sae_reader import read_sae
from interp.subspace import Subspace

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import byte_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def write_sae(folder: Path, w_dec: torch.Tensor, arch="topk", k=4, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    d_sae, d_model = w_dec.shape
    g = torch.Generator().manual_seed(1)
    tensors = {"W_enc": w_dec.T.contiguous() + 0.01 * torch.randn(d_model, d_sae, generator=g),
               "b_enc": torch.zeros(d_sae), "W_dec": w_dec.contiguous(), "b_dec": torch.zeros(d_model)}
    if arch == "jumprelu":
        tensors["threshold"] = torch.full((d_sae,), 0.1)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": d_model, "d_sae": d_sae, "architecture": arch, "apply_b_dec_to_input": True,
           "metadata": meta or {}}
    if arch == "topk":
        cfg["k"] = k
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


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


def test_clusters_cli_on_sae_folder(tiny_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 32, generator=g)
    w_dec = torch.cat([base.repeat_interleave(3, 0) + 0.3 * torch.randn(12, 32, generator=g),
                       torch.randn(20, 32, generator=g)])  # 4 planted groups of 3 similar latents
    sae_dir = write_sae(tmp_path / "sae", w_dec, meta={"model_name": str(tiny_dir),
                                                      "hook_name": "blocks.1.hook_resid_post"})
    out = tmp_path / "out"
    rc = main(["features", "clusters", "--sae", str(sae_dir), "--tokens", "3000", "--batch-tokens", "500",
               "--sim-cutoff", "0.5", "--min-points", "10", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "clusters.json").read_text())
    expected = {tuple(sorted(c)) for c in graph_clusters(w_dec, n_neighbors=2, sim_cutoff=0.5) if len(c) >= 2}
    assert {tuple(sorted(c["latents"])) for c in summary["clusters"]} <= expected
    scores = [c["irreducibility"] for c in summary["clusters"]]
    assert scores == sorted(scores, reverse=True)
    if summary["clusters"]:
        assert (out / "clusters.png").stat().st_size > 1000


def test_sae_reader_matches_the_saes_package(tmp_path):
    saes = pytest.importorskip("saes")
    from saes import checkpoint

    for arch, kw in (("topk", {"k": 5}), ("relu", {}), ("jumprelu", {})):
        torch.manual_seed(0)
        sae = saes.build(arch, d_model=16, d_sae=40, **kw)
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_()
        folder = checkpoint.save(sae, tmp_path / arch)
        ours = read_sae(folder)
        x = torch.randn(8, 16)
        assert torch.allclose(ours.encode(x), sae.encode(x), atol=1e-5), arch
        assert torch.equal(ours.W_dec, sae.W_dec.detach())


def test_reader_and_arg_errors(tmp_path):
    with pytest.raises(InputError, match="not a readable SAE"):
        read_sae(tmp_path)
    folder = write_sae(tmp_path / "mp", torch.randn(6, 4), arch="matching_pursuit")
    with pytest.raises(InputError, match="cannot be encoded here"):
        read_sae(folder)
    assert parse_layers("4-6,9") == [4, 5, 6, 9] and parse_layers("0-29:10") == [0, 10, 20]
    with pytest.raises(InputError, match="--layers"):
        parse_layers("x")
    with pytest.raises(InputError, match="at least 3"):
        resolve_items("a,b")
    with pytest.raises(InputError, match="must end with"):
        build_prompts(["Monday"], ["{} is a day"])
    assert main(["features", "circles", "--out", str(tmp_path / "o")]) == 1  # no site named
