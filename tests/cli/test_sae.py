"""`interp capture` -> `interp sae train` -> `interp sae eval` -> `interp sae publish --dry-run`, through the
command line alone, on a tiny random Llama saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from cli_util import one_error_line

from interp.cli import main
from saes.checkpoint import read

SITES = ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]  # widths 32 and 64


@pytest.fixture(scope="module")
def cache(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    assert main(["capture", "--model", str(tiny_dir), "--sites", *SITES, "--dataset", str(text_file),
                 "--context-size", "32", "--tokens", "6000", "--shard-tokens", "2000", "--device", "cpu",
                 "--out", str(out)]) == 0
    return out


def test_text_to_published_sae_through_the_cli(cache, tiny_dir, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sae", "train", "--cache", str(cache), "--arch", "topk", "--k", "4", "--expansion", "2",
                 "--batch-tokens", "500", "--tokens", "4000", "--device", "cpu", "--out", str(run)]) == 0
    for site, width in zip(SITES, (32, 64)):
        ck = read(run / site)
        assert ck.sae.cfg.d_model == width and ck.sae.cfg.d_sae == 2 * width
        assert ck.metadata["model_name"] == str(tiny_dir) and ck.metadata["hook_name"] == site
        assert ck.metadata["context_size"] == 32 and ck.metadata["dataset_path"] == str(text_file)
        data = ck.training["data"]
        assert ck.training["n_tokens"] == 4000 and data["tokens_trained"] == 4000
        assert data["cache"] == str(cache.resolve()) and data["rows"] >= 6000
    folder = run / SITES[0]
    capsys.readouterr()
    assert main(["sae", "eval", str(folder), "--tokens", "1000", "--windows", "2", "--device", "cpu"]) == 0
    metrics = read(folder).training["metrics"]
    assert 0 < metrics["l0_mean"] <= 4 and metrics["n_rows"] == 1000
    assert "ce_loss_recovered" in metrics and read(folder).sparsity is not None
    assert main(["sae", "eval", str(run / SITES[1]), "--tokens", "1000", "--windows", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["sae", "publish", str(run), "me/tiny-saes", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "for 2 SAE(s) to me/tiny-saes" in out
    assert (run / "README.md").is_file()


def test_training_past_the_cache_and_evaluating_on_it_warn_with_the_numbers(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sae", "train", "--cache", str(cache), "--sites", SITES[0], "--k", "2", "--expansion", "1",
                 "--batch-tokens", "1000", "--tokens", "20000", "--log-every", "5", "--device", "cpu",
                 "--out", str(run)]) == 0
    err = capsys.readouterr().err
    rows = read(run / SITES[0]).training["data"]["rows"]
    assert f"training on 20000 tokens but the cache {cache} holds {rows} rows" in err
    assert main(["sae", "eval", str(run / SITES[0]), "--cache", str(cache), "--tokens", "1000", "--windows", "0",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"evaluating on {cache}, the cache this SAE trained on ({rows} of its {rows} rows" in err


def test_growing_a_cache_and_rerunning_a_complete_one(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "acts"
    common = ["capture", "--model", str(tiny_dir), "--sites", SITES[0], "--dataset", str(text_file),
              "--context-size", "32", "--shard-tokens", "1000", "--device", "cpu", "--out", str(out)]
    assert main([*common, "--tokens", "2000"]) == 0
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*common, "--tokens", "2000"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert main([*common, "--tokens", "3500"]) == 0
    assert len(list(out.glob("shard-*.safetensors"))) > len([f for f in files if f.startswith("shard-")])


def test_a_flag_the_architecture_does_not_have_is_an_error(cache, tmp_path, capsys):
    assert main(["sae", "train", "--cache", str(cache), "--arch", "relu", "--k", "16", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "--k does not apply to architecture 'relu'" in err and "topk" in err
    assert not any(tmp_path.iterdir())


def test_config_file_typos_and_missing_out(cache, tmp_path, capsys):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"arch": "topk", "d_sea": 10}))
    assert main(["sae", "train", "--config", str(cfg), "--cache", str(cache), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "d_sea" in err
    assert main(["sae", "train", "--cache", str(cache)]) == 1
    assert "--out" in capsys.readouterr().err


def test_defaults_live_in_the_dataclasses(capsys):
    """The help shows each default once, taken from the config dataclasses, with no RST markup."""
    import saes

    with pytest.raises(SystemExit):
        main(["sae", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {saes.TrainConfig.batch_tokens})" in text
    assert f"[batchtopk, mpsae, topk] (default: {saes.TopKConfig.k})" in text or "(default: 32)" in text
    assert "``" not in text and ":class:" not in text


@pytest.mark.slow
def test_live_training_and_eval_on_the_embedded_model(tmp_path, capsys):
    """Live activations from SmolLM2 (no cache), a config file, resume checkpoints, metrics written to a folder
    and then into the checkpoint."""
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"arch": "topk", "d_sae": 1152, "k": 16, "tokens": 2048, "batch_tokens": 1024,
                               "sites": ["blocks.3.hook_resid_post"], "context_size": 64}))
    run = tmp_path / "run"
    assert main(["sae", "train", "--config", str(cfg), "--out", str(run), "--checkpoint-every", "1"]) == 0
    folder = run / "blocks.3.hook_resid_post"
    assert (run / "checkpoints" / "latest.json").exists()
    ck = read(folder)
    assert ck.metadata["model_name"] == "smollm2-135m" and ck.metadata["context_size"] == 64
    assert main(["sae", "eval", str(folder), "--tokens", "1024", "--windows", "1", "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["n_rows"] == 1024 and "ce_loss_recovered" in rep
    assert (tmp_path / "ev" / "latent_density.png").exists()
    assert main(["sae", "eval", str(folder), "--tokens", "1024", "--windows", "0"]) == 0
    ck = read(folder)
    assert ck.training["metrics"]["n_rows"] == 1024 and ck.sparsity is not None


def test_overwrite_resume_and_accepted_changes_through_the_cli(cache, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["sae", "train", "--cache", str(cache), "--sites", SITES[0], "--k", "2", "--expansion", "1",
            "--batch-tokens", "500", "--tokens", "3000", "--checkpoint-every", "2", "--log-every", "2",
            "--device", "cpu", "--out", str(run)]
    assert main(args) == 0
    assert main(args) == 1 and one_error_line(capsys.readouterr().err)  # an earlier run's checkpoints
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--resume", "--lr", "0.001"]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "config.lr null -> 0.001" in err and "--accept-changes" in err
    assert main([*args, "--resume", "--lr", "0.001", "--tokens", "4000", "--accept-changes"]) == 0
    history = json.loads((run / "train_history.json").read_text())
    assert [h["step"] for h in history if "event" not in h] == [2, 4, 6, 8]
    event = next(h for h in history if h.get("event") == "resume")
    assert event["step"] == 6 and event["changes"] == {"config.lr": [None, 0.001], "config.total_tokens": [3000, 4000]}
    assert read(run / SITES[0]).training["n_tokens"] == 4000


def test_variants_train_several_saes_of_one_site_as_each_alone(cache, tmp_path, capsys):
    common = ["sae", "train", "--cache", str(cache), "--sites", SITES[0], "--k", "4", "--expansion", "2",
              "--batch-tokens", "500", "--tokens", "2000", "--device", "cpu"]
    together = tmp_path / "together"
    assert main([*common, "--variants", "small:k=2", "wide:d_sae=128", "--out", str(together)]) == 0
    assert json.loads(capsys.readouterr().out)["saved"] == [str(together / f"{SITES[0]}_{v}") for v in ("small",
                                                                                                         "wide")]
    small, wide = read(together / f"{SITES[0]}_small"), read(together / f"{SITES[0]}_wide")
    assert (small.sae.cfg.k, small.sae.cfg.d_sae, wide.sae.cfg.k, wide.sae.cfg.d_sae) == (2, 64, 4, 128)
    assert small.metadata["hook_name"] == wide.metadata["hook_name"] == SITES[0]
    # the same SAE trained alone (every variant starts from the weights it would draw alone; the second one is
    # checked in test_variants_and_sites_each_start_from_the_weights_they_would_train_alone)
    assert main([*common, "--k", "2", "--out", str(tmp_path / "alone")]) == 0
    alone = read(tmp_path / "alone" / SITES[0])
    for key, value in alone.sae.state_dict().items():
        assert torch.equal(value, small.sae.state_dict()[key]), key
    capsys.readouterr()
    assert main([*common, "--variants", "k=2", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "expected NAME:FIELD=VALUE" in err
    assert main([*common, "--variants", "a:n_steps=2", "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "'n_steps=2' is not FIELD=VALUE with a field of architecture 'topk'" in err


def test_capture_from_a_bf16_model_is_recorded_and_close_to_fp32(tiny_dir, text_file, tmp_path, capsys):
    from interp.cache import CachedActivations

    common = ["capture", "--model", str(tiny_dir), "--sites", SITES[0], "--dataset", str(text_file),
              "--context-size", "32", "--tokens", "1000", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*common, "--model-dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["model_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "fp32" / "manifest.json").read_text())["model_dtype"] == "float32"
    a, b = (torch.cat([x[SITES[0]] for x in CachedActivations(tmp_path / d, batch_tokens=500, seed=0, epochs=1)])
            for d in ("fp32", "bf16"))
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape  # the same rows, in the same order
    rel = float((b - a).norm() / a.norm())
    assert 0 < rel < 0.02, rel  # the bf16 model really ran, and its activations stay close to fp32's
    capsys.readouterr()
    grow = [c if c != "1000" else "2000" for c in common]  # growing it from the fp32 model is refused
    assert main([*grow, "--out", str(tmp_path / "bf16")]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "'model_dtype': ('bfloat16', 'float32')" in err


def test_variants_and_sites_each_start_from_the_weights_they_would_train_alone(cache, tmp_path):
    """The SAEs were built one after another from one seeded stream, so every SAE after the first (another site,
    another variant) started from other weights than the same SAE trained alone."""
    from safetensors.torch import load_file

    common = ["sae", "train", "--cache", str(cache), "--arch", "topk", "--d-sae", "64", "--batch-tokens", "500",
              "--tokens", "2000", "--device", "cpu"]
    assert main([*common, "--sites", SITES[0], "--variants", "a:k=4", "b:k=8", "--out", str(tmp_path / "v")]) == 0
    assert main([*common, "--sites", SITES[0], "--k", "8", "--out", str(tmp_path / "alone")]) == 0
    together = load_file(str(tmp_path / "v" / f"{SITES[0]}_b" / "sae_weights.safetensors"))
    alone = load_file(str(tmp_path / "alone" / SITES[0] / "sae_weights.safetensors"))
    assert sorted(together) == sorted(alone) and all(torch.equal(together[k], alone[k]) for k in alone)


def test_eval_into_a_folder_with_results_needs_overwrite(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sae", "train", "--cache", str(cache), "--sites", SITES[0], "--arch", "topk", "--k", "4",
                 "--d-sae", "64", "--batch-tokens", "500", "--tokens", "1000", "--device", "cpu",
                 "--out", str(run)]) == 0
    ev = ["sae", "eval", str(run / SITES[0]), "--cache", str(cache), "--tokens", "1000", "--windows", "0",
          "--device", "cpu", "--out", str(tmp_path / "ev")]
    assert main(ev) == 0
    capsys.readouterr()
    assert main(ev) != 0
    err = capsys.readouterr().err
    assert one_error_line(err) and "already holds eval.json" in err and "--overwrite" in err
    assert main([*ev, "--overwrite"]) == 0
