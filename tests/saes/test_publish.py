"""Publishing: validation, model card, density plot, and the upload call (mocked: no Hub access here)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from saes import REGISTRY
from saes.checkpoint import annotate, read, save
from saes.publish import PublishError, prepare, publish, validate

D_MODEL, D_SAE = 16, 64
SITES = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]


def trained_like(folder, site, arch="topk", seed=0, metrics=True, sparsity=True):
    cls = REGISTRY[arch]
    sparsity_field = {"topk": {"k": 8}, "mpsae": {"n_steps": 6}}.get(arch, {})
    sae = cls(cls.config_class(d_model=D_MODEL, d_sae=D_SAE, **sparsity_field))
    freq = torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed)) ** 4
    freq[:3] = 0.0  # three dead latents
    training = {"n_tokens": 2_000_000, "steps": 488}
    if metrics:
        training["metrics"] = {"l0_mean": 8.0, "explained_variance": 0.71 + seed / 100, "ce_loss_recovered": 0.9}
    save(sae, folder / site, metadata={"model_name": "smollm2-135m", "hook_name": site, "context_size": 128,
                                       "prepend_bos": False},
         sparsity=freq if sparsity else None, training=training)


@pytest.fixture
def repo(tmp_path):
    for i, site in enumerate(SITES):
        trained_like(tmp_path / "out", site, seed=i)
    return tmp_path / "out"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_prepare_writes_card_and_plot(repo):
    plan = prepare(repo, "me/smollm2-saes")
    card = (repo / "README.md").read_text()
    assert card == plan.card
    meta = front_matter(card)
    assert meta["library_name"] == "saelens" and "sparse-autoencoder" in meta["tags"]
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["sites"] == SITES
    row = meta["saes"][1]
    assert row["architecture"] == "topk" and row["d_sae"] == D_SAE and row["k"] == 8
    assert row["training_tokens"] == 2_000_000 and row["l0_mean"] == 8.0
    assert row["explained_variance"] == pytest.approx(0.72) and row["ce_loss_recovered"] == 0.9
    assert row["dead_fraction"] == pytest.approx(3 / D_SAE)
    assert 'saes.load("me/smollm2-saes", site="blocks.3.hook_resid_post")' in card
    assert "| `blocks.6.hook_resid_post` | topk | 16 | 64 | 8 | 2,000,000 | 8 | 0.72 | 0.9 | 0.04688 |" in card
    assert "## Latent density" in card and "![Latent density](latent_density.png)" in card
    assert "## Dashboards" not in card  # none in the folder: no link
    assert "MP steps" not in card and "n_steps" not in meta["saes"][0]  # no MP-SAE here: no steps column
    assert (repo / "latent_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(plan.files) == sorted(["README.md", "latent_density.png"] + [
        f"{s}/{n}" for s in SITES for n in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")])


def test_card_links_the_dashboard_and_the_plan_uploads_it(repo):
    dash = repo / "dashboard"
    (dash / "units").mkdir(parents=True)
    for name in ("index.html", "data.json", "data.safetensors", "units/0.html"):
        (dash / name).write_text("x")
    (dash / ".interp-lock").write_text("")
    plan = prepare(repo, "me/smollm2-saes")
    assert "## Dashboards" in plan.card and "[`dashboard/index.html`](dashboard/index.html)" in plan.card
    assert sorted(f for f in plan.files if f.startswith("dashboard/")) == [
        "dashboard/data.json", "dashboard/data.safetensors", "dashboard/index.html", "dashboard/units/0.html"]


class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_publish_uploads_only_checkpoint_files_card_and_plot(repo):
    (repo / "train_history.json").write_text("[]")  # other run outputs stay local
    (repo / "checkpoints").mkdir()
    api = FakeApi()
    plan = publish(repo, "me/smollm2-saes", private=True, api=api)
    (name, repo_id, kwargs), (name2, up) = api.calls
    assert (name, repo_id, kwargs["private"], kwargs["exist_ok"]) == ("create_repo", "me/smollm2-saes", True, True)
    assert name2 == "upload_folder" and up["repo_id"] == "me/smollm2-saes" and up["folder_path"] == str(repo)
    assert up["allow_patterns"] == plan.files and "train_history.json" not in plan.files


def test_nothing_is_uploaded_when_validation_fails(tmp_path):
    trained_like(tmp_path / "out", SITES[0], metrics=False)
    trained_like(tmp_path / "out", SITES[1], sparsity=False)
    api = FakeApi()
    with pytest.raises(PublishError) as info:
        publish(tmp_path / "out", "me/x", api=api)
    msg = str(info.value)
    assert "training['metrics']['explained_variance'] is None" in msg and SITES[0] in msg
    assert "no sparsity.safetensors" in msg and SITES[1] in msg
    assert api.calls == [] and not (tmp_path / "out" / "README.md").exists()


def test_validation_reports_a_broken_checkpoint(repo):
    w = repo / SITES[0] / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(PublishError, match="does not load: .*SHA-256"):
        validate(repo)


def test_validation_needs_model_name(tmp_path):
    trained_like(tmp_path / "out", SITES[0])
    cfg_path = tmp_path / "out" / SITES[0] / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["metadata"]["model_name"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PublishError, match="metadata\\['model_name'\\] is not set"):
        validate(tmp_path / "out")


def test_annotate_adds_metrics_then_publishes(tmp_path):
    trained_like(tmp_path / "out", SITES[0], metrics=False)
    folder = tmp_path / "out" / SITES[0]
    before = read(folder).sae.W_dec.clone()
    annotate(folder, metrics={"l0_mean": 7.9, "explained_variance": 0.6, "ce_loss_recovered": 0.8})
    ckpt = read(folder)
    assert ckpt.training["metrics"]["l0_mean"] == 7.9 and ckpt.training["steps"] == 488
    assert torch.equal(ckpt.sae.W_dec, before) and ckpt.sparsity is not None
    assert validate(tmp_path / "out").keys() == {SITES[0]}


def test_annotate_takes_an_evaluate_report(tmp_path):
    from saes.evaluate import reconstruction_metrics

    trained_like(tmp_path / "out", SITES[0], metrics=False, sparsity=False)
    folder = tmp_path / "out" / SITES[0]
    sae = read(folder).sae
    x = torch.randn(256, D_MODEL, generator=torch.Generator().manual_seed(0))
    report = reconstruction_metrics(sae, [x[:128], x[128:]], progress=False)
    annotate(folder, metrics={**report, "ce_loss_recovered": 0.5})
    ckpt = read(folder)
    assert ckpt.training["metrics"]["l0_mean"] == pytest.approx(8.0)  # TopK with k=8 on random data
    assert ckpt.training["metrics"]["explained_variance"] == report["explained_variance"]
    assert torch.allclose(ckpt.sparsity, report["latent_density"], atol=1e-6, rtol=1e-4)
    assert validate(tmp_path / "out").keys() == {SITES[0]}


def test_annotate_reads_a_report_with_the_old_density_key(tmp_path):
    trained_like(tmp_path / "out", SITES[0], metrics=False, sparsity=False)
    folder = tmp_path / "out" / SITES[0]
    density = torch.linspace(0, 1, D_SAE)
    annotate(folder, metrics={"l0_mean": 7.9, "feature_density": density})  # a report from before the rename
    ckpt = read(folder)
    assert torch.allclose(ckpt.sparsity, density, atol=1e-6, rtol=1e-4)
    assert set(ckpt.training["metrics"]) == {"l0_mean"}  # the tensor went to sparsity.safetensors only


def test_card_names_each_sparsity_knob_and_the_old_plot_name_warns(tmp_path):
    from saes.card import plot_feature_density, plot_latent_density

    trained_like(tmp_path / "out", SITES[0], arch="mpsae")
    trained_like(tmp_path / "out", SITES[1], arch="topk")
    plan = prepare(tmp_path / "out", "me/x")
    rows = {r["site"]: r for r in front_matter(plan.card)["saes"]}
    assert rows[SITES[0]]["n_steps"] == 6 and "k" not in rows[SITES[0]]
    assert rows[SITES[1]]["k"] == 8 and "n_steps" not in rows[SITES[1]]
    assert "| Site | Architecture | d_model | d_sae | k | MP steps | Training tokens |" in plan.card
    assert f"| `{SITES[0]}` | mpsae | 16 | 64 | n/a | 6 |" in plan.card
    checkpoints = validate(tmp_path / "out")
    new = plot_latent_density(checkpoints, tmp_path / "new.png")
    with pytest.warns(DeprecationWarning, match="'plot_feature_density' is deprecated, use 'plot_latent_density'"):
        old = plot_feature_density(checkpoints, tmp_path / "old.png")
    assert new.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and old.read_bytes() == new.read_bytes()


def test_non_saelens_architecture_card_says_so(tmp_path):
    trained_like(tmp_path / "out", SITES[0], arch="jumprelu")
    folder = tmp_path / "out" / SITES[0]
    ck = read(folder)
    with torch.no_grad():
        ck.sae.threshold.fill_(-1.0)
    save(ck.sae, folder, metadata=ck.metadata, training=ck.training, sparsity=ck.sparsity)
    meta = front_matter(prepare(tmp_path / "out", "me/x").card)
    assert meta["library_name"] == "interp-toolkit" and "saelens" not in meta["tags"]


def test_cli_dry_run(repo, capsys):
    from interp.cli import main

    assert main(["sae", "publish", str(repo), "me/smollm2-saes", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 8 files for 2 SAE(s) to me/smollm2-saes" in out
    assert (repo / "README.md").exists()


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    from interp.cli import main

    assert main(["sae", "publish", str(tmp_path), "me/x", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "no cfg.json here" in err and err.count("\n") == 1


def test_card_shows_the_typical_row_figures_when_recorded(tmp_path):
    """An evaluation that recorded the massive-row split puts it on the card beside the all-row figure;
    checkpoints evaluated before it existed publish as they did (no column, no note)."""
    from saes.evaluate import reconstruction_metrics

    trained_like(tmp_path / "old", SITES[0])
    old = prepare(tmp_path / "old", "me/old").card
    assert "typical rows" not in old and "Massive rows" not in old
    trained_like(tmp_path / "out", SITES[0], metrics=False, sparsity=False)
    folder = tmp_path / "out" / SITES[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, D_MODEL, generator=g)
    x[300] *= 100.0  # one massive row
    with pytest.warns(UserWarning, match="massive"):
        report = reconstruction_metrics(read(folder).sae, [x[:256], x[256:]], progress=False)
    annotate(folder, metrics={**report, "ce_loss_recovered": 0.5})
    card = prepare(tmp_path / "out", "me/new").card
    row = front_matter(card)["saes"][0]
    assert row["explained_variance_typical"] == pytest.approx(report["explained_variance_typical"])
    assert row["massive_variance_share"] == pytest.approx(report["massive_variance_share"])
    assert row["massive_variance_share"] > 0.5
    assert "| Explained variance (typical rows) | Massive rows' variance share |" in card
    assert "Typical rows: the evaluation rows whose squared norm is at most 10 x the median" in card
