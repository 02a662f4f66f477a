"""Interop: our checkpoints load in SAELens with the same outputs; SAELens' and sparsify's load here.

The peers are in the ``test`` extra; where one cannot be imported the tests skip with the reason.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

import saes.mp  # noqa: F401  (registers "mpsae" until saes/__init__ imports it)
from saes import REGISTRY
from saes.checkpoint import SPARSITY_FILENAME, load, read, save
from saes.peers import SAELENS_NAMES

D_MODEL, D_SAE, K = 16, 64, 5


def randomise(module: torch.nn.Module, seed: int, nonneg: tuple[str, ...] = ()) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_((torch.randn(t.shape, generator=g) * 0.5).to(t.dtype))
                if name in nonneg:
                    t.abs_()


def ours(arch: str, seed: int = 0):
    cls = REGISTRY[arch]
    fields = {name: K for name in ("k", "n_steps") if name in cls.config_class.__dataclass_fields__}
    sae = cls(cls.config_class(d_model=D_MODEL, d_sae=D_SAE, **fields))
    # SAELens' JumpReLU clamps thresholds at 0 (relu before the gate); ours are clamped in training too
    randomise(sae, seed, nonneg=("threshold",) if arch == "jumprelu" else ())
    if arch == "mpsae":  # SAELens' matching pursuit uses W_dec rows as they are: ours keeps them unit norm
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae.eval()


@pytest.fixture(scope="module")
def sae_lens():
    warnings.filterwarnings("ignore", category=UserWarning)
    return pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install 'interp-toolkit[test]')")


@pytest.fixture(scope="module")
def sparsify():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify needs this on a CPU-only machine
    return pytest.importorskip("sparsify", reason="sparsify is not installed (pip install 'interp-toolkit[test]')")


X = torch.randn(11, D_MODEL, generator=torch.Generator().manual_seed(123))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(a for a in SAELENS_NAMES if a in REGISTRY))
def test_ours_loads_in_saelens_with_the_same_outputs(tmp_path, sae_lens, arch, dtype):
    sae = ours(arch).to(dtype)
    save(sae, tmp_path / "s", metadata={"model_name": "smollm2-135m", "hook_name": "blocks.3.hook_resid_post",
                                        "context_size": 128, "prepend_bos": False})
    if arch == "mpsae" and dtype == torch.bfloat16:
        # bf16 rounding moves the atoms off unit norm: SAELens (raw W_dec) would compute something else,
        # so the file must not claim SAELens' architecture name
        cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
        assert cfg["architecture"] == "interp.mpsae"
        return
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "s")
    assert type(theirs).__name__ == {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE",
                                     "matching_pursuit": "MatchingPursuitSAE"}[SAELENS_NAMES[arch]]
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post" and theirs.dtype == dtype
    if arch == "mpsae":  # our n_steps is written under SAELens' own key
        assert theirs.cfg.max_iterations == sae.cfg.n_steps == K
    x = X.to(dtype)
    with torch.no_grad():
        codes = sae.encode(x)
        assert (codes != 0).any()
        torch.testing.assert_close(theirs.encode(x), codes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(codes), sae.decode(codes), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), sae(x).x_hat, rtol=1e-5, atol=1e-6)


def test_mp_sae_files_that_saelens_would_read_differently_are_not_given_its_name(tmp_path):
    """SAELens pursues in float32, with the file's b_dec, on W_dec rows as they are: an MP-SAE whose selection runs
    in bf16, that holds a b_dec it does not use, or whose rows are 5e-5 off unit norm (measured: different atoms
    in 14 of 500 rows over 40 steps) is written under the project's own name, which SAELens refuses."""
    from dataclasses import replace

    from saes.peers import saelens_architecture

    assert saelens_architecture(ours("mpsae")) == "matching_pursuit"
    base = ours("mpsae")
    bf16 = REGISTRY["mpsae"](replace(base.cfg, pursuit_dtype="bfloat16"))
    bf16.load_state_dict(base.state_dict())
    no_bias = REGISTRY["mpsae"](replace(base.cfg, decoder_bias=False))
    no_bias.load_state_dict(base.state_dict())  # b_dec holds the random values the SAE ignores
    off = ours("mpsae")
    with torch.no_grad():
        off.W_dec.mul_(1 + 5e-5)
    for sae in (bf16, no_bias, off):
        assert saelens_architecture(sae) == "interp.mpsae"
        save(sae, tmp_path / "s")
        assert json.loads((tmp_path / "s" / "cfg.json").read_text())["architecture"] == "interp.mpsae"
        torch.testing.assert_close(load(tmp_path / "s").encode(X), sae.encode(X))  # still exact here
    with torch.no_grad():
        no_bias.b_dec.zero_()
    assert saelens_architecture(no_bias) == "matching_pursuit"


def _saelens_models(sl):
    std = sl.StandardSAE(sl.StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    topk = sl.TopKSAE(sl.TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K))
    jump = sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitSAE, MatchingPursuitSAEConfig

    mp = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D_MODEL, d_sae=D_SAE, max_iterations=K,
                                                     residual_threshold=0.5, stop_on_duplicate_support=True))
    return {"standard": std, "topk": topk, "jumprelu": jump, "matching_pursuit": mp}


@pytest.mark.parametrize("theirs_arch,our_arch", [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu"),
                                                  ("matching_pursuit", "mpsae")])
def test_saelens_checkpoint_loads_here_with_the_same_outputs(tmp_path, sae_lens, theirs_arch, our_arch):
    theirs = _saelens_models(sae_lens)[theirs_arch]
    randomise(theirs, seed=7)  # JumpReLU thresholds include negative values: SAELens' relu clamps them
    if theirs_arch == "matching_pursuit":  # MP needs unit-norm atoms (SAELens trains them so)
        with torch.no_grad():
            theirs.W_dec /= theirs.W_dec.norm(dim=1, keepdim=True)
    theirs.cfg.metadata.hook_name = "blocks.2.hook_resid_pre"
    theirs.save_model(tmp_path / "s")
    freq = torch.rand(D_SAE)
    save_file({"sparsity": torch.log10(freq + 1e-10)}, str(tmp_path / "s" / SPARSITY_FILENAME))
    ckpt = read(tmp_path / "s")
    assert ckpt.source == "saelens" and ckpt.sae.architecture == our_arch
    assert ckpt.metadata["hook_name"] == "blocks.2.hook_resid_pre"
    torch.testing.assert_close(ckpt.sparsity, freq, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        codes = theirs.encode(X)
        assert (codes != 0).any()
        torch.testing.assert_close(ckpt.sae.encode(X), codes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.sae.decode(codes), theirs.decode(codes), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.sae(X).x_hat, theirs(X), rtol=1e-5, atol=1e-6)


def test_saelens_batchtopk_inference_checkpoint_loads_as_jumprelu(tmp_path, sae_lens):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    train = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K))
    randomise(train, seed=3)
    train.topk_threshold = torch.tensor(0.3)
    train.save_inference_model(tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "s")
    sae = load(tmp_path / "s")
    assert sae.architecture == "jumprelu"
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(X), theirs.encode(X), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae(X).x_hat, theirs(X), rtol=1e-5, atol=1e-6)


def test_saelens_round_trip_back_through_our_format(tmp_path, sae_lens):
    """SAELens -> here -> our format -> SAELens again: same outputs all the way."""
    theirs = _saelens_models(sae_lens)["topk"]
    randomise(theirs, seed=9)
    theirs.save_model(tmp_path / "a")
    save(load(tmp_path / "a"), tmp_path / "b")
    again = sae_lens.SAE.load_from_disk(tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(again(X), theirs(X), rtol=1e-5, atol=1e-6)


def test_saelens_unsupported_architecture_is_refused(tmp_path, sae_lens):
    gated = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    gated.save_model(tmp_path / "s")
    from saes.safetensors_check import CheckpointError

    with pytest.raises(CheckpointError, match="unknown architecture 'gated'"):
        load(tmp_path / "s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizing", ["num_latents", "expansion_factor"])
def test_sparsify_checkpoint_loads_here_with_the_same_outputs(tmp_path, sparsify, dtype, sizing):
    cfg = (sparsify.SparseCoderConfig(num_latents=D_SAE, k=K) if sizing == "num_latents"
           else sparsify.SparseCoderConfig(expansion_factor=D_SAE // D_MODEL, k=K))
    theirs = sparsify.SparseCoder(D_MODEL, cfg, dtype=dtype)
    randomise(theirs, seed=11)
    theirs.save_to_disk(tmp_path / "layers.4")
    ckpt = read(tmp_path, site="layers.4")
    assert ckpt.source == "sparsify" and ckpt.sae.architecture == "topk" and ckpt.sae.dtype == dtype
    assert ckpt.metadata["hook_name"] == "layers.4"
    x = X.to(dtype)
    with torch.no_grad():
        enc = theirs.encode(x)
        dense = torch.zeros(x.shape[0], D_SAE, dtype=dtype).scatter(-1, enc.top_indices, enc.top_acts)
        assert (dense != 0).any()
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
        torch.testing.assert_close(ckpt.sae.encode(x), dense, **tol)
        torch.testing.assert_close(ckpt.sae.decode(dense), theirs.decode(enc.top_acts, enc.top_indices), **tol)


def test_sparsify_multi_hookpoint_folder(tmp_path, sparsify):
    for i, hook in enumerate(["layers.1", "layers.2"]):
        sc = sparsify.SparseCoder(D_MODEL, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
        randomise(sc, seed=i)
        sc.save_to_disk(tmp_path / hook)
    sae = load(tmp_path, site="layers.2")
    sc = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.2")
    with torch.no_grad():
        torch.testing.assert_close(sae.W_enc, sc.encoder.weight.T)


def test_sparsify_skip_connection_is_refused(tmp_path, sparsify):
    from saes.safetensors_check import CheckpointError

    sc = sparsify.SparseCoder(D_MODEL, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True))
    sc.save_to_disk(tmp_path / "layers.0")
    with pytest.raises(CheckpointError, match="skip_connection=True has no equivalent"):
        load(tmp_path / "layers.0")


# ------------------------------------------------------------------ what the peers' own trainers write
def _runner_topk(sae_lens, seed: int = 5):
    """SAELens' TopK training SAE as its runner trains it (``rescale_acts_by_decoder_norm=True``), with
    random weights whose decoder rows are far from unit norm."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    train = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K))
    assert train.cfg.rescale_acts_by_decoder_norm  # SAELens' default for training TopK SAEs
    randomise(train, seed=seed)
    train.cfg.metadata.model_name, train.cfg.metadata.hook_name = "smollm2-135m", "blocks.4.hook_resid_post"
    return train


def test_saelens_runner_topk_with_rescale_flag_loads_with_saelens_outputs(tmp_path, sae_lens):
    """The runner saves with save_inference_model: norms folded into the encoder, rows at unit norm, the
    flag still true in cfg.json. SAELens then rescales by norms of 1, which we read as plain TopK."""
    train = _runner_topk(sae_lens)
    train.save_inference_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["rescale_acts_by_decoder_norm"] is True
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "s")
    assert theirs.cfg.rescale_acts_by_decoder_norm
    norms = theirs.W_dec.detach().norm(dim=1)
    assert not torch.equal(norms, torch.ones_like(norms))  # unit only up to rounding, as the runner leaves them
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)

    ckpt = read(tmp_path / "s")
    assert ckpt.source == "saelens" and ckpt.sae.architecture == "topk" and ckpt.sae.cfg.k == K
    assert ckpt.metadata["model_name"] == "smollm2-135m"
    assert ckpt.metadata["hook_name"] == "blocks.4.hook_resid_post"
    with torch.no_grad():
        codes = theirs.encode(X)
        assert (codes != 0).sum(-1).eq(K).all()
        torch.testing.assert_close(ckpt.sae.encode(X), codes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.sae.decode(codes), theirs.decode(codes), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.sae(X).x_hat, theirs(X), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.sae(X).x_hat, train(X), rtol=1e-5, atol=1e-5)  # what was trained


def test_saelens_rescale_flag_with_decoder_rows_off_unit_norm_is_refused(tmp_path, sae_lens):
    """SAELens' trainer writes its mid-run checkpoints with save_model: norms not folded in."""
    from saes.safetensors_check import CheckpointError

    train = _runner_topk(sae_lens)
    with torch.no_grad():
        train.W_dec.mul_(1.05 / train.W_dec.norm(dim=1, keepdim=True))
    train.save_model(tmp_path / "s")
    with pytest.raises(CheckpointError) as info:
        read(tmp_path / "s")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "s" / "sae_weights.safetensors") in msg
    assert re.search(r"W_dec row norms are in \[1\.0[45]\d*, 1\.05\d*\], not within 1e-06 of 1", msg), msg
    assert "rescale_acts_by_decoder_norm" in msg and "fold_W_dec_norm()" in msg

    # doing what the message says makes it load, with SAELens' outputs
    train.fold_W_dec_norm()
    train.cfg.rescale_acts_by_decoder_norm = False
    train.save_model(tmp_path / "folded")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "folded")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "folded").encode(X), theirs.encode(X), rtol=1e-5, atol=1e-6)


def test_saelens_rescale_flag_on_another_architecture_is_refused(tmp_path, sae_lens):
    from saes.safetensors_check import CheckpointError

    std = _saelens_models(sae_lens)["standard"]
    std.save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    with pytest.raises(CheckpointError, match=r"rescale_acts_by_decoder_norm=True is not supported here"):
        read(tmp_path / "s")


def test_saelens_matching_pursuit_off_unit_norm_is_refused(tmp_path, sae_lens):
    """SAELens' matching pursuit uses W_dec rows as they are; ours divides them by their norm."""
    from saes.safetensors_check import CheckpointError

    mp = _saelens_models(sae_lens)["matching_pursuit"]
    randomise(mp, seed=2)
    mp.save_model(tmp_path / "s")
    with pytest.raises(CheckpointError, match=r"W_dec row norms are in \[.*SAELens' matching pursuit"):
        read(tmp_path / "s")


def _sparsify_run(sparsify, root, hookpoints: list[str], seeds: tuple[int, ...] = (0,)):
    """A run folder exactly as sparsify's own Trainer writes it (SAEs, optimizer and state files)."""
    from conftest import tiny_model
    from datasets import Dataset

    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    cfg = sparsify.TrainConfig(sparsify.SparseCoderConfig(num_latents=D_SAE, k=K), batch_size=2,
                               hookpoints=hookpoints, init_seeds=list(seeds), save_dir=str(root),
                               run_name="run", log_to_wandb=False)
    trainer = sparsify.Trainer(cfg, data, tiny_model("llama"))
    trainer.save()
    return root / "run", trainer


def test_sparsify_trainer_run_with_one_hookpoint_loads_without_naming_it(tmp_path, sparsify):
    run, trainer = _sparsify_run(sparsify, tmp_path, ["layers.1"])
    assert (run / "config.json").is_file() and (run / "state.pt").is_file()  # the trainer's own files
    ckpt = read(run)
    assert ckpt.source == "sparsify" and ckpt.path == run / "layers.1"
    assert ckpt.metadata == {"hook_name": "layers.1"}
    theirs = trainer.saes["layers.1"]
    x = torch.randn(11, theirs.d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        enc = theirs.encode(x)
        dense = torch.zeros(x.shape[0], D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
        assert (dense != 0).any()
        torch.testing.assert_close(ckpt.sae.encode(x), dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt.sae.W_dec, theirs.W_dec)


def test_sparsify_trainer_run_with_several_hookpoints_lists_them(tmp_path, sparsify):
    from saes.safetensors_check import CheckpointError

    run, _ = _sparsify_run(sparsify, tmp_path, ["layers.0", "layers.2"])
    with pytest.raises(CheckpointError, match=r"holds SAEs for 2 sites \['layers.0', 'layers.2'\]; pass site="):
        read(run)
    assert read(run, site="layers.2").metadata["hook_name"] == "layers.2"


def test_sparsify_trainer_run_with_several_seeds_names_the_hookpoint(tmp_path, sparsify):
    from saes.safetensors_check import CheckpointError

    run, _ = _sparsify_run(sparsify, tmp_path, ["layers.1"], seeds=(0, 1))
    with pytest.raises(CheckpointError, match=r"\['layers.1/seed0', 'layers.1/seed1'\]"):
        read(run)
    assert read(run, site="layers.1/seed1").metadata["hook_name"] == "layers.1"
