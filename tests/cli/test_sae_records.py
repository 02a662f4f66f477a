"""What `interp sae train` and `interp sae eval` record, and what `interp sae publish` accepts: one evaluation's
metrics with the data they were measured on, the rows asked for, the SAE's own site and model, one run per output
folder, one model per repository."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_util import one_error_line
from safetensors.torch import load_file

from interp.cli import main
from saes.checkpoint import annotate, read

SITE = "blocks.1.hook_resid_post"  # width 32
OTHER_SITE = "blocks.0.hook_resid_post"  # also width 32: an SAE of SITE runs there without a shape error


@pytest.fixture(scope="module")
def cache(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    assert main(["capture", "--model", str(tiny_dir), "--sites", SITE, "--dataset", str(text_file),
                 "--context-size", "32", "--tokens", "6000", "--shard-tokens", "2000", "--device", "cpu",
                 "--out", str(out)]) == 0
    return out


def train_args(cache, out, *extra: str) -> list[str]:
    return ["sae", "train", "--cache", str(cache), "--arch", "topk", "--k", "4", "--d-sae", "64", "--batch-tokens",
            "500", "--tokens", "1000", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """A run folder holding one trained SAE of SITE (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_args(cache, out)) == 0
    return out


def copy_run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def eval_args(folder, *extra: str) -> list[str]:
    return ["sae", "eval", str(folder), "--device", "cpu", *extra]


def test_a_second_evaluation_replaces_the_first_ones_metrics_and_says_what_they_were_measured_on(
        trained, cache, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    folder = run / SITE
    assert main(eval_args(folder, "--cache", str(cache), "--tokens", "1000", "--windows", "2")) == 0
    first = read(folder).training["metrics"]
    assert "ce_loss_recovered" in first and first["n_rows"] == 1000
    assert main(eval_args(folder, "--cache", str(cache), "--tokens", "1500", "--windows", "0",
                          "--eval-seed", "7")) == 0
    metrics = read(folder).training["metrics"]
    # nothing of the first evaluation is left beside the second's numbers
    assert metrics["n_rows"] == 1500 and metrics["explained_variance"] != first["explained_variance"]
    assert not {"ce_loss_recovered", "n_predicted_tokens", "ce_clean", "kl_to_clean"} & set(metrics)
    assert metrics["evaluation"] == {"site": SITE, "model": read(folder).metadata["model_name"], "seed": 7,
                                     "tokens_requested": 1500, "cache": cache.name,
                                     "cache_model": read(folder).metadata["model_name"],
                                     "dataset": read(folder).metadata["dataset_path"], "rows": 1500}
    capsys.readouterr()
    assert main(["sae", "publish", str(run), "me/x", "--dry-run"]) == 1  # no CE loss recovered measured now
    err = capsys.readouterr().err
    assert one_error_line(err) and "training['metrics']['ce_loss_recovered'] is None" in err
    assert main(eval_args(folder, "--cache", str(cache), "--tokens", "1200", "--windows", "2")) == 0
    assert main(["sae", "publish", str(run), "me/x", "--dry-run"]) == 0
    card = (run / "README.md").read_text()
    assert (f"- `{SITE}`: activation cache `{cache.name}` of dataset `{read(folder).metadata['dataset_path']}` "
            "(1200 rows, seed 1234); downstream loss on 2 windows of 32 tokens of") in card
    assert str(cache.parent) not in card  # the folder's name, not this machine's path to it


def test_eval_at_another_site_or_of_another_model_is_refused_unless_written_elsewhere(
        trained, tiny_dir, text_file, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    folder = run / SITE
    cfg_before = (folder / "cfg.json").read_bytes()
    live = ["--dataset", str(text_file), "--context-size", "32", "--tokens", "500", "--windows", "1"]
    capsys.readouterr()
    assert main(eval_args(folder, "--site", OTHER_SITE, *live)) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and f"--site {OTHER_SITE}: this SAE reads {SITE}" in err and "--out" in err
    other_model = tmp_path / "another-model"
    shutil.copytree(tiny_dir, other_model)
    assert main(eval_args(folder, "--model", str(other_model), *live)) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and f"--model {other_model}: this SAE was trained on {tiny_dir}" in err
    assert (folder / "cfg.json").read_bytes() == cfg_before  # nothing recorded
    # the same model named by another path to its folder is the same model
    assert main(eval_args(folder, "--model", str(tiny_dir) + "/.", *live)) == 0
    assert read(folder).training["metrics"]["evaluation"]["model"] == str(tiny_dir) + "/."
    # written elsewhere, with the site and model it was measured at
    assert main(eval_args(folder, "--site", OTHER_SITE, "--model", str(other_model), *live,
                          "--out", str(tmp_path / "ev"))) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["evaluation"]["site"] == OTHER_SITE and report["evaluation"]["model"] == str(other_model)
    assert report["evaluation"]["cache"] is None and report["evaluation"]["dataset"] == str(text_file)


def test_eval_reads_exactly_the_rows_asked_for_or_all_the_cache_holds(trained, cache, tmp_path, capsys):
    from saes.evaluate import reconstruction_metrics

    folder = trained / SITE
    held = sum(t[SITE].shape[0] for t in (load_file(str(p)) for p in sorted(cache.glob("shard-*.safetensors"))))
    assert held > 4097
    assert main(eval_args(folder, "--cache", str(cache), "--tokens", "4097", "--windows", "0",
                          "--out", str(tmp_path / "a"))) == 0
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["n_rows"] == 4097
    capsys.readouterr()
    assert main(eval_args(folder, "--cache", str(cache), "--tokens", str(held + 500), "--windows", "0",
                          "--out", str(tmp_path / "b"))) == 0
    err = capsys.readouterr().err
    assert f"--tokens {held + 500} but the cache {cache} holds {held} rows: evaluating on all {held}" in err
    assert f"{held} are read now" in err  # the in-sample warning quotes the rows read, not the rows asked for
    report = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert report["n_rows"] == held and report["evaluation"]["rows"] == held
    # every row of the cache once, no row twice: the same metrics as the shards' rows read straight from the files
    rows = torch.cat([load_file(str(p))[SITE] for p in sorted(cache.glob("shard-*.safetensors"))])
    ref = reconstruction_metrics(read(folder).sae, [rows], progress=False)
    assert report["explained_variance"] == pytest.approx(ref["explained_variance"], rel=1e-4)
    assert report["l0_mean"] == pytest.approx(ref["l0_mean"], rel=1e-6)
    assert report["mse"] == pytest.approx(ref["mse"], rel=1e-4)


def test_a_resume_with_another_batch_size_is_refused_and_the_tokens_printed_are_the_checkpoints(
        cache, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["sae", "train", "--cache", str(cache), "--arch", "topk", "--k", "4", "--d-sae", "64", "--device", "cpu",
              "--out", str(out)]
    assert main([*common, "--batch-tokens", "256", "--tokens", "512"]) == 0
    capsys.readouterr()
    assert main([*common, "--batch-tokens", "128", "--tokens", "1024", "--resume", "--accept-changes"]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "config.batch_tokens 256 -> 128" in err
    assert "config.batch_tokens cannot be accepted" in err and "resume with batch_tokens=256" in err
    assert read(out / SITE).training["n_tokens"] == 512  # untouched
    assert main([*common, "--batch-tokens", "256", "--tokens", "1024", "--resume", "--accept-changes"]) == 0
    printed = json.loads(capsys.readouterr().out)
    training = read(out / SITE).training
    assert printed["tokens"] == training["n_tokens"] == training["data"]["tokens_trained"] == 1024
    assert printed["steps"] == training["steps"] == 4


def test_overwrite_removes_the_earlier_runs_saes_and_nothing_else(cache, tmp_path, capsys):
    import saes

    out = tmp_path / "run"
    assert main(train_args(cache, out, "--variants", "a:k=4", "b:k=8")) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(SITE)) == [f"{SITE}_a", f"{SITE}_b"]
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "cfg.json").write_text("{}")
    saes.save(saes.build("topk", d_model=8, d_sae=16, k=2), out / "my_sae")  # an SAE, but no run's output
    assert main(train_args(cache, out, "--k", "2", "--overwrite")) == 0
    kept = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert kept == sorted([SITE, "checkpoints", "mine", "my_sae", "notes.txt", "train_history.json"])
    assert read(out / SITE).sae.cfg.k == 2 and (out / "mine" / "cfg.json").read_text() == "{}"
    assert read(out / "my_sae").sae.cfg.d_sae == 16
    # an earlier run's output without its checkpoints is refused as well, and kept byte for byte
    shutil.rmtree(out / "checkpoints")
    before = (out / SITE / "sae_weights.safetensors").read_bytes()
    capsys.readouterr()
    assert main(train_args(cache, out, "--k", "3", "--variants", "c:k=3")) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and f"{out} holds the output of an earlier run ({SITE}, train_history.json)" in err
    assert (out / SITE / "sae_weights.safetensors").read_bytes() == before and not (out / f"{SITE}_c").exists()


def test_publish_refuses_saes_of_different_models(trained, cache, tmp_path, capsys):
    from saes.publish import PublishError, validate

    folder = tmp_path / "evaluated"
    shutil.copytree(trained / SITE, folder)
    assert main(eval_args(folder, "--cache", str(cache), "--tokens", "500", "--windows", "1")) == 0
    repo = tmp_path / "repo"
    for sub, model in (("a", "EleutherAI/pythia-70m"), ("b", "openai-community/gpt2")):
        shutil.copytree(folder, repo / sub)
        annotate(repo / sub, metadata={"model_name": model})
    with pytest.raises(PublishError, match=r"the SAEs read different models \(a: 'EleutherAI/pythia-70m', "
                                           r"b: 'openai-community/gpt2'\)"):
        validate(repo)
    capsys.readouterr()
    assert main(["sae", "publish", str(repo), "me/x", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert one_error_line(err) and "different models" in err and not (repo / "README.md").exists()
    # two names of one model are one model
    annotate(repo / "a", metadata={"model_name": "smollm2"})
    annotate(repo / "b", metadata={"model_name": "smollm2-135m"})
    assert sorted(validate(repo)) == ["a", "b"]
