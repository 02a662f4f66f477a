"""The evaluation metrics against hand computations on small cases."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import saes
from saes.evaluate import downstream_metrics, evaluate, explained_variance, reconstruction_metrics, save_report


def relu_identity(d: int, signed: bool) -> saes.SAE:
    """W_enc = [I, -I], W_dec = [I; -I]: reconstructs x exactly (signed) or gives relu(x)."""
    m = 2 * d if signed else d
    sae = saes.build("relu", d_model=d, d_sae=m)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1) if signed else eye)
        sae.W_dec.copy_(torch.cat([eye, -eye], 0) if signed else eye)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_explained_variance_hand_cases():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, torch.tensor([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(0.5)


def test_reconstruction_metrics_by_hand_and_over_the_whole_set():
    sae = relu_identity(2, signed=False)
    x = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    r = reconstruction_metrics(sae, [x[:1], x[1:]], dense_threshold=0.6, progress=False)
    assert r["l0_mean"] == pytest.approx(1.5)
    assert r["l0_histogram"] == [0, 1, 1]
    assert r["mse"] == pytest.approx(1 / 4)
    assert r["cosine_similarity"] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert r["explained_variance"] == pytest.approx(1 - 1 / 8.5)  # mean over both batches, not each
    assert r["dead_fraction"] == 0.0 and r["dense_fraction"] == 0.5
    torch.testing.assert_close(r["latent_density"], torch.tensor([1.0, 0.5]))
    # predicting the mean of the set scores 0 even when batches are split
    sae2 = saes.build("relu", d_model=2, d_sae=2)
    with torch.no_grad():
        sae2.W_enc.zero_()
        sae2.b_enc.fill_(-1.0)  # codes all zero
        sae2.b_dec.copy_(x.mean(0))
    r2 = reconstruction_metrics(sae2, [{"s": x[:1]}, {"s": x[1:]}], site="s", progress=False)
    assert r2["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert r2["dead_fraction"] == 1.0 and r2["l0_mean"] == 0.0


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def test_downstream_perfect_sae_recovers_everything(tmp_path):
    model = _tiny_llama()
    windows = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    site = "blocks.0.hook_resid_post"
    perfect = relu_identity(16, signed=True)
    r = downstream_metrics(model, perfect, site, windows, batch_size=4, progress=False)
    assert r["ce_with_sae"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["kl_to_clean"] == pytest.approx(0.0, abs=1e-5)
    assert r["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5)
    assert r["ce_zero_ablation"] != pytest.approx(r["ce_clean"], abs=1e-3)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert r["n_predicted_tokens"] == 6 * 11
    # a hand check of the clean loss
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), windows[:, 1:].reshape(-1))
    assert r["ce_clean"] == pytest.approx(float(ce), rel=1e-5)
    # a zero SAE is zero ablation: 0 recovered; a half-spliced mask lies in between
    zero = relu_identity(16, signed=True)
    with torch.no_grad():
        zero.W_dec.zero_()
    r0 = downstream_metrics(model, zero, site, windows, progress=False)
    assert r0["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    mask = torch.zeros_like(windows, dtype=torch.bool)
    mask[:, 6:] = True
    rh = downstream_metrics(model, zero, site, windows, splice_mask=mask, progress=False)
    assert rh["ce_clean"] == pytest.approx(r0["ce_clean"])
    # the whole report, written to disk
    rep = evaluate(perfect, [torch.randn(20, 16)], model=model, site=site, windows=windows,
                   out_dir=tmp_path, progress=False)
    assert (tmp_path / "eval.json").exists() and (tmp_path / "latent_density.png").stat().st_size > 1000
    sp = load_file(str(tmp_path / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sp, torch.log10(rep["latent_density"] + 1e-10))


def test_evaluate_refuses_missing_inputs():
    sae = relu_identity(2, signed=False)
    with pytest.raises(saes.SAEError, match="site"):
        evaluate(sae, [torch.randn(3, 2)], model=_tiny_llama(), progress=False)
    with pytest.raises(saes.SAEError, match="yielded nothing"):
        reconstruction_metrics(sae, [], progress=False)


def test_feature_density_is_a_deprecated_alias_of_latent_density(tmp_path):
    sae = relu_identity(2, signed=False)
    report = reconstruction_metrics(sae, [torch.tensor([[1.0, -1.0], [2.0, 3.0]])], progress=False)
    assert "feature_density" not in report and "feature_density" not in list(report)  # stored once
    with pytest.warns(DeprecationWarning, match="'feature_density' is deprecated, use 'latent_density'"):
        old = report["feature_density"]
    assert old is report["latent_density"]
    with pytest.raises(KeyError):
        report["feature_densty"]  # a typo is still an error
    # a report from before the rename (plain dict, old key) is still written the same way
    legacy = {("feature_density" if k == "latent_density" else k): v for k, v in report.items()}
    save_report(report, tmp_path / "new")
    save_report(legacy, tmp_path / "old")
    for name in ("eval.json", "sparsity.safetensors"):
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()
    assert "density" not in (tmp_path / "old" / "eval.json").read_text()
    with pytest.raises(saes.SAEError, match="latent_density"):
        save_report({"l0_mean": 1.0}, tmp_path / "none")


def test_massive_rows_are_counted_apart_and_warned_about():
    """A few rows far above the median norm, reconstructed exactly, while typical rows are not: the FVU over
    every row looks good, ``fvu_typical`` (by hand, over the other rows about their own mean) does not, and
    the library says so."""
    from saes.evaluate import ReconstructionStats

    g = torch.Generator().manual_seed(0)
    typical = torch.randn(600, 8, generator=g) + 1.0
    massive = 300.0 * torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    x = torch.cat([typical[:300], massive, typical[300:]])
    noise = 0.5 * torch.randn(x.shape, generator=g)
    is_massive = torch.zeros(x.shape[0], dtype=torch.bool)
    is_massive[300:303] = True
    x_hat = torch.where(is_massive[:, None], x, x + noise)
    acc = ReconstructionStats(8, 1)
    for lo in range(0, x.shape[0], 200):  # massive rows in the second batch; the limit comes from the first
        acc.update(x[lo:lo + 200], x_hat[lo:lo + 200], torch.ones(len(x[lo:lo + 200]), 1))
    r = acc.result()
    x, x_hat = x.double(), x_hat.double()  # the hand sums in float64, as the library's
    t, t_hat = x[~is_massive], x_hat[~is_massive]
    fvu_t = ((t - t_hat).pow(2).sum() / (t - t.mean(0)).pow(2).sum()).item()
    share = ((x[is_massive] - x.mean(0)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert r["massive_rows"] == 3
    assert r["fvu_typical"] == pytest.approx(fvu_t, rel=1e-9)
    assert r["explained_variance_typical"] == pytest.approx(1 - fvu_t, rel=1e-9)
    assert r["massive_variance_share"] == pytest.approx(share, rel=1e-9)
    assert r["fvu"] < 0.1 * r["fvu_typical"]  # the all-row figure flatters
    sae = relu_identity(8, signed=True)  # exact everywhere: the counts still show, and the warning
    with pytest.warns(UserWarning, match=r"3 of 603 evaluated rows are massive.*fvu_typical"):
        w = reconstruction_metrics(sae, list(x.float().split(200)), progress=False)
    assert w["massive_rows"] == 3 and w["fvu_typical"] == pytest.approx(0.0, abs=1e-12)


def test_no_massive_rows_no_warning_and_typical_equals_all():
    import warnings

    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    sae = relu_identity(6, signed=False)  # relu(x): half the signal lost
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = reconstruction_metrics(sae, list(x.split(100)), progress=False)
    assert r["massive_rows"] == 0 and r["massive_variance_share"] == pytest.approx(0.0, abs=1e-12)
    assert r["fvu_typical"] == pytest.approx(r["fvu"], rel=1e-12)
    zeros = torch.zeros(4, 6)  # a median of 0: no row is massive, nothing divides by zero
    z = reconstruction_metrics(sae, [zeros, x[:4]], progress=False)
    assert z["massive_rows"] == 0 and math.isfinite(z["fvu_typical"])
