"""`interp dashboard sae|probe|subspace` on a tiny random model."""

from __future__ import annotations

import json

import pytest
import torch
from cli_util import one_error_line

from interp.cli import main

SITE = "blocks.1.hook_resid_post"


def _pass_flags(text_file, out, top_k: bool = True) -> list[str]:
    return ["--tokens", "400", "--dataset", str(text_file), "--context-size", "32", *(["--top-k", "4"] * top_k),
            "--device", "cpu", "--quiet", "--out", str(out)]


@pytest.fixture
def sae_dir(tiny_dir, tmp_path):
    import saes

    sae = saes.build("topk", d_model=32, d_sae=48, k=4)
    with torch.no_grad():
        sae.W_enc.mul_(30)
    return saes.save(sae, tmp_path / "sae", metadata={"model_name": str(tiny_dir), "hook_name": SITE})


def test_sae_dashboard_of_chosen_latents(sae_dir, text_file, tmp_path, capsys):
    out = tmp_path / "dash"
    assert main(["dashboard", "sae", str(sae_dir), "--latents", "0-7,40", "--neuronpedia", "res-test",
                 *_pass_flags(text_file, out)]) == 0
    info = json.loads((out / "data.json").read_text())
    batch = json.loads((out / "neuronpedia" / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [*range(8), 40] and batch["sae_set"] == "res-test"
    assert info["names"] == [f"latent {i}" for i in [*range(8), 40]] and info["ids"] == [*range(8), 40]
    assert info["site"] == SITE and info["kind"] == "latent" and info["n_tokens"] >= 400
    assert sorted(p.name for p in (out / "units").iterdir()) == sorted(f"{i}.html" for i in range(9))
    assert "wrote" in capsys.readouterr().out
    before = (out / "data.safetensors").read_bytes()
    assert main(["dashboard", "sae", str(sae_dir), "--latents", "0-7,40", *_pass_flags(text_file, out)]) == 0
    assert (out / "data.safetensors").read_bytes() == before  # a finished pass is not run again


def test_probe_dashboard_from_neurons_and_from_results(tiny_dir, text_file, tmp_path):
    out = tmp_path / "p"
    site = "blocks.1.mlp.hook_post"
    assert main(["dashboard", "probe", "--model", str(tiny_dir), "--site", site, "--neurons", "3,60",
                 *_pass_flags(text_file, out)]) == 0
    info = json.loads((out / "data.json").read_text())
    assert info["names"] == ["neuron 3", "neuron 60"] and info["signed"] is True
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"records": [{"site": site, "n_neurons": 2, "neurons": [5, 9]},
                                               {"site": site, "n_neurons": 1, "neurons": [5]}]}))
    out2 = tmp_path / "p2"
    assert main(["dashboard", "probe", "--model", str(tiny_dir), "--site", site, "--results", str(results),
                 "--n-neurons", "2", *_pass_flags(text_file, out2)]) == 0
    assert json.loads((out2 / "data.json").read_text())["names"] == ["neuron 5", "neuron 9"]


def test_subspace_dashboard_with_class_means(tiny_dir, text_file, tmp_path):
    from interp.subspace import CircleMap, Subspace

    g = torch.Generator().manual_seed(0)
    angles = {"Monday": 0.0, "Wednesday": 2.0, "Friday": 4.0}
    sub = Subspace(torch.randn(2, 32, generator=g), coord_map=CircleMap(torch.zeros(2), 1.0, angles))
    sub.save(tmp_path / "sub")
    out = tmp_path / "s"
    assert main(["dashboard", "subspace", str(tmp_path / "sub"), "--model", str(tiny_dir), "--site", SITE,
                 *_pass_flags(text_file, out)]) == 0
    info = json.loads((out / "data.json").read_text())
    assert info["names"] == ["coordinate 0", "coordinate 1", "angle Monday", "angle Wednesday", "angle Friday"]
    assert sorted(info["extra"]["class_means"]) == sorted(angles)
    assert 'class="scatter"' in (out / "index.html").read_text()


@pytest.mark.parametrize("argv,words", [
    (["sae", "{sae}", "--latents", "0-999"], "not in 0..47"),
    (["sae", "{sae}", "--latents", "a-b"], "expected numbers"),
    (["sae", "{tmp}/missing"], "missing"),
    (["probe", "--model", "{model}", "--site", "blocks.1.mlp.hook_post"], "--neurons"),
    (["probe", "--model", "{model}", "--site", "blocks.1.mlp.hook_post", "--neurons", "64"], "not in 0..63"),
    (["probe", "--model", "{model}", "--site", "blocks.9.hook_resid_post", "--neurons", "1"], "layer"),
    (["subspace", "{tmp}/nosub", "--model", "{model}", "--site", SITE], "subspace"),
    (["sae", "{sae}", "--top-k", "0"], "top_k must be >= 1"),
])
def test_bad_input_is_one_line(argv, words, sae_dir, tiny_dir, text_file, tmp_path, capsys):
    argv = [a.format(sae=sae_dir, tmp=tmp_path, model=tiny_dir) for a in argv]
    flags = _pass_flags(text_file, tmp_path / "o", top_k="--top-k" not in argv)
    assert main(["dashboard", *argv, *flags]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err), err
    assert words in err, err


def test_other_settings_in_the_same_folder_are_refused(sae_dir, text_file, tmp_path, capsys):
    out = tmp_path / "dash"
    assert main(["dashboard", "sae", str(sae_dir), "--latents", "0-3", *_pass_flags(text_file, out)]) == 0
    capsys.readouterr()
    assert main(["dashboard", "sae", str(sae_dir), "--latents", "0-4", *_pass_flags(text_file, out)]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "other settings" in err
