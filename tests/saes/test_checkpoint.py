"""Save/load round trips of every registered architecture, atomic writes, sites, Hub downloads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import saes
import saes.mp  # noqa: F401  (registers "mpsae" until saes/__init__ imports it)
from saes import REGISTRY
from saes.checkpoint import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME, list_sites, load, read, save
from saes.safetensors_check import CheckpointError

D_MODEL, D_SAE = 16, 64


def make(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> saes.SAE:
    """An SAE of ``arch`` with every parameter and buffer randomised (thresholds included)."""
    cls = REGISTRY[arch]
    sae = cls(cls.config_class(d_model=D_MODEL, d_sae=D_SAE)).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in sae.state_dict().values():
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) * 0.5)
    return sae


def outputs(sae: saes.SAE, x: torch.Tensor) -> saes.SaeOutput:
    with torch.no_grad():
        return sae(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_round_trip_every_architecture(tmp_path, arch, dtype):
    sae = make(arch, dtype)
    meta = {"model_name": "smollm2-135m", "hook_name": "blocks.3.hook_resid_post", "context_size": 128,
            "prepend_bos": False}
    training = {"n_tokens": 1234, "metrics": {"l0": 7.5, "explained_variance": 0.8}}
    freq = torch.rand(D_SAE, generator=torch.Generator().manual_seed(1))
    save(sae, tmp_path / "sae", metadata=meta, sparsity=freq, training=training)
    ckpt = read(tmp_path / "sae")
    back = ckpt.sae
    assert type(back) is type(sae) and back.cfg == sae.cfg and back.dtype == dtype
    for key, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(9, D_MODEL).to(dtype)
    for a, b in zip(outputs(sae, x), outputs(back, x)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert ckpt.source == "interp" and ckpt.training == training
    assert {k: ckpt.metadata[k] for k in meta} == meta
    assert torch.allclose(ckpt.sparsity, freq, atol=1e-6, rtol=1e-4)


def test_cfg_json_has_saelens_v6_keys_and_project_block(tmp_path):
    save(make("topk"), tmp_path / "s", metadata={"hook_name": "blocks.0.hook_resid_pre"})
    cfg = json.loads((tmp_path / "s" / CFG_FILENAME).read_text())
    for key in ("d_in", "d_sae", "dtype", "architecture", "apply_b_dec_to_input", "normalize_activations",
                "metadata", "k"):
        assert key in cfg, key
    assert cfg["d_in"] == D_MODEL and cfg["architecture"] == "topk"
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_pre"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    block = cfg["interp"]
    assert block["format_version"] == 1 and block["config"] == make("topk").cfg.to_dict()
    assert set(block["files"]) == {WEIGHTS_FILENAME}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [CFG_FILENAME, WEIGHTS_FILENAME]


def test_non_default_config_fields_survive(tmp_path):
    cls = REGISTRY["topk"]
    cfg = dataclasses.replace(cls.config_class(d_model=D_MODEL, d_sae=D_SAE), k=5, aux_coeff=0.5, k_aux=3,
                              apply_b_dec_to_input=False)
    save(cls(cfg), tmp_path / "s")
    assert load(tmp_path / "s").cfg == cfg


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_config_saved_before_enc_init_scale_existed_loads(tmp_path, arch):
    sae = make(arch)
    save(sae, tmp_path / "s")
    path = tmp_path / "s" / CFG_FILENAME
    cfg = json.loads(path.read_text())
    del cfg["interp"]["config"]["enc_init_scale"]  # as written before the field existed
    path.write_text(json.dumps(cfg))
    back = load(tmp_path / "s")
    assert back.cfg == sae.cfg  # the field takes its default; the weights are the saved ones
    for key, value in sae.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_negative_jumprelu_threshold_is_not_claimed_saelens_compatible(tmp_path):
    sae = make("jumprelu")
    with torch.no_grad():
        sae.threshold[0] = -0.5  # SAELens' relu(pre) * (pre > t) would differ here
    save(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / CFG_FILENAME).read_text())
    assert cfg["architecture"] == "interp.jumprelu"
    assert torch.equal(load(tmp_path / "s").threshold, sae.threshold)


def test_batchtopk_unset_threshold_round_trips(tmp_path):
    sae = REGISTRY["batchtopk"](REGISTRY["batchtopk"].config_class(d_model=D_MODEL, d_sae=D_SAE))
    save(sae, tmp_path / "s")
    assert float(load(tmp_path / "s").threshold) == float(sae.threshold) == -1.0


def test_several_sites_in_one_folder(tmp_path):
    a, b = make("topk", seed=1), make("relu", seed=2)
    save(a, tmp_path / "repo" / "blocks.3.hook_resid_post", metadata={"hook_name": "blocks.3.hook_resid_post"})
    save(b, tmp_path / "repo" / "blocks.6.hook_resid_post", metadata={"hook_name": "blocks.6.hook_resid_post"})
    assert list_sites(tmp_path / "repo") == ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
    got = load(tmp_path / "repo", site="blocks.6.hook_resid_post")
    assert type(got) is type(b) and torch.equal(got.W_dec, b.W_dec)
    with pytest.raises(CheckpointError, match="2 sites"):
        load(tmp_path / "repo")
    with pytest.raises(CheckpointError, match="no SAE for site 'blocks.9"):
        load(tmp_path / "repo", site="blocks.9.hook_resid_post")


def test_load_moves_to_device(tmp_path):
    save(make("relu"), tmp_path / "s")
    assert load(tmp_path / "s", device="cpu").device.type == "cpu"


def test_crash_before_rename_leaves_nothing_loadable(tmp_path, monkeypatch):
    from saes import checkpoint

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save(make("topk"), tmp_path / "s")
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is cleaned up too


def test_crash_during_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from saes import checkpoint

    old = make("topk", seed=1)
    save(old, tmp_path / "s")
    monkeypatch.setattr(checkpoint, "_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        save(make("topk", seed=2), tmp_path / "s")
    assert torch.equal(load(tmp_path / "s").W_dec, old.W_dec)


def test_overwrite_replaces_all_files(tmp_path):
    save(make("topk", seed=1), tmp_path / "s", sparsity=torch.full((D_SAE,), 0.1))
    new = make("topk", seed=2)
    save(new, tmp_path / "s")  # no sparsity this time: the old sparsity file must not survive
    assert not (tmp_path / "s" / SPARSITY_FILENAME).exists()
    assert torch.equal(load(tmp_path / "s").W_dec, new.W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_refuses_to_overwrite_a_folder_with_other_files(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save(make("relu"), tmp_path / "s")
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_half_written_folder_from_another_save_does_not_load(tmp_path):
    save(make("topk", seed=1), tmp_path / "a")
    save(make("topk", seed=2), tmp_path / "b")
    (tmp_path / "a" / WEIGHTS_FILENAME).write_bytes((tmp_path / "b" / WEIGHTS_FILENAME).read_bytes())
    with pytest.raises(CheckpointError, match="SHA-256"):
        load(tmp_path / "a")


@pytest.mark.parametrize("bad", [
    {"metadata": {"x": torch.zeros(1)}},
    {"training": {"loss": float("nan")}},
    {"sparsity": torch.full((D_SAE,), 2.0)},
    {"sparsity": torch.zeros(3)},
    {"metadata": ["not", "a", "dict"]},
])
def test_save_rejects_bad_extras(tmp_path, bad, unchecked):
    with unchecked(), pytest.raises(saes.SAEError):
        save(make("relu"), tmp_path / "s", **bad)
    assert not (tmp_path / "s").exists()


def test_save_rejects_unregistered_class(tmp_path):
    class Loose(REGISTRY["relu"]):
        pass

    with pytest.raises(saes.SAEError, match="registered"):
        save(Loose(REGISTRY["relu"].config_class(d_model=4, d_sae=8)), tmp_path / "s")


# ----------------------------------------------------------------------------- Hub (mocked)
class FakeHub:
    """Stands in for huggingface_hub: serves files from a local folder and records requests."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache, self.requested, self.listed = root, cache, [], 0

    def list_repo_files(self, repo_id, **kwargs):
        self.listed += 1
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def hf_hub_download(self, repo_id, filename, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        self.requested.append(filename)
        src = self.root / filename
        if not src.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        dst = self.cache / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        return str(dst)


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    import huggingface_hub

    root = tmp_path / "remote"
    for i, site in enumerate(["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]):
        save(make("topk", seed=i), root / site, metadata={"hook_name": site},
             sparsity=torch.full((D_SAE,), 0.01) if i == 1 else None)
    fake = FakeHub(root, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    return fake


def test_hub_load_downloads_only_the_requested_site(hub_repo):
    sae = load("someone/smollm2-saes", site="blocks.2.hook_resid_post")
    assert torch.equal(sae.W_dec, make("topk", seed=1).W_dec)
    assert hub_repo.requested == [f"blocks.2.hook_resid_post/{n}" for n in (CFG_FILENAME, WEIGHTS_FILENAME,
                                                                            SPARSITY_FILENAME)]
    assert hub_repo.listed == 0


def test_hub_load_without_site_lists_sites(hub_repo):
    with pytest.raises(CheckpointError, match="3 sites"):
        load("someone/smollm2-saes")
    assert hub_repo.requested == []


def test_hub_missing_sparsity_is_fine(hub_repo):
    ckpt = read("someone/smollm2-saes", site="blocks.1.hook_resid_post")
    assert ckpt.sparsity is None and hub_repo.requested[-1].endswith(SPARSITY_FILENAME)


def test_hub_sparsify_layout_downloads_its_two_files(tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors.torch import save_file

    root = tmp_path / "remote"
    for hook in ("layers.1", "layers.2"):
        (root / hook).mkdir(parents=True)
        (root / hook / CFG_FILENAME).write_text(json.dumps({"activation": "topk", "num_latents": D_SAE, "k": 4,
                                                            "d_in": D_MODEL}))
        save_file({"encoder.weight": torch.randn(D_SAE, D_MODEL), "encoder.bias": torch.zeros(D_SAE),
                   "W_dec": torch.randn(D_SAE, D_MODEL), "b_dec": torch.zeros(D_MODEL)},
                  str(root / hook / "sae.safetensors"))
    fake = FakeHub(root, tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    ckpt = read("EleutherAI/some-saes", site="layers.2")
    assert ckpt.source == "sparsify" and ckpt.sae.cfg.k == 4
    assert fake.requested == ["layers.2/cfg.json", "layers.2/sae.safetensors"]


def test_hub_failure_is_a_clear_error(hub_repo, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError, match="no such local folder, and fetching site 'blocks.1.hook_resid_post'"):
        load("someone/typo", site="blocks.1.hook_resid_post")


def test_not_a_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        load(tmp_path / "nope" / "deeper")


# ------------------------------------------------------------------ what a command hands on
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_checkpoint_hands_over_decoder_and_encoder(tmp_path, arch):
    """A feature finder needs the latents' write directions and an encoder: ``decoder()`` is the
    matrix ``decode`` applies, ``encoder()`` is ``encode`` without autograd."""
    sae = make(arch)
    if arch == "mpsae":
        with torch.no_grad():
            sae.W_dec.mul_(2.0)  # rows off unit norm: the MP-SAE decodes with them normalised
    save(sae, tmp_path / "s", metadata={"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"})
    ckpt = read(tmp_path / "s")
    assert ckpt.metadata["model_name"] == "tiny" and ckpt.metadata["hook_name"] == "blocks.1.hook_resid_post"
    x = torch.randn(7, D_MODEL, generator=torch.Generator().manual_seed(3))
    codes = ckpt.encoder()(x)
    assert codes.shape == (7, D_SAE) and not codes.requires_grad
    sparse = ckpt.encoder(sparse=True)(x)
    assert sparse.is_sparse and not sparse.requires_grad and torch.equal(sparse.to_dense(), codes)
    with torch.no_grad():
        torch.testing.assert_close(codes, ckpt.sae.encode(x))
        dec = ckpt.decoder()
        assert dec.shape == (D_SAE, D_MODEL) and not dec.requires_grad
        torch.testing.assert_close(codes @ dec + ckpt.sae.decode(torch.zeros(D_SAE)), ckpt.sae.decode(codes))


def test_saelens_pre_v6_metadata_keys_are_read(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "s"
    folder.mkdir()
    save_file({"W_enc": torch.randn(D_MODEL, D_SAE), "b_enc": torch.zeros(D_SAE), "W_dec": torch.randn(D_SAE, D_MODEL),
               "b_dec": torch.zeros(D_MODEL)}, str(folder / WEIGHTS_FILENAME))
    (folder / CFG_FILENAME).write_text(json.dumps({
        "architecture": "standard", "d_in": D_MODEL, "d_sae": D_SAE, "dtype": "float32",
        "model_name": "gpt2", "hook_point": "blocks.2.hook_resid_pre", "context_size": 128}))
    meta = read(folder).metadata
    assert meta == {"model_name": "gpt2", "hook_name": "blocks.2.hook_resid_pre", "context_size": 128}


@pytest.mark.parametrize("key,value", [("architecture", "standard"), ("k", 3), ("apply_b_dec_to_input", False),
                                       ("normalize_activations", "layer_norm"),
                                       ("rescale_acts_by_decoder_norm", True), ("reshape_activations", "hook_z")])
def test_ours_whose_saelens_keys_disagree_is_refused(tmp_path, key, value):
    """SAELens reads the top-level keys, this project the 'interp' block: they must describe one SAE."""
    cls = REGISTRY["topk"]
    save(cls(cls.config_class(d_model=D_MODEL, d_sae=D_SAE, k=4)), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / CFG_FILENAME).read_text())
    (tmp_path / "s" / CFG_FILENAME).write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=rf"{key}={value!r} disagrees with 'interp'"):
        read(tmp_path / "s")
