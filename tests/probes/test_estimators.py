"""LinearProbe, SparseProbe and RidgeProbe against scikit-learn, and their errors."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV

from interp.errors import InputError
from probes import LinearProbe, RidgeProbe, SparseProbe


def _classification(n=1200, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * (0.3 + 2 * torch.rand(d, generator=g)) + torch.randn(d, generator=g)
    logit = x[:, :4] @ torch.tensor([1.0, -1.5, 0.7, 0.4]) + torch.randn(n, generator=g)
    return x, (logit > 0.8).numpy()


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_linear_probe_matches_sklearn_accuracy(class_weight):
    """Oracle: same data, same C, same class weights -> the same test accuracy (within 0.01)."""
    x, y = _classification()
    tr, te = slice(0, 800), slice(800, None)
    ours = LinearProbe(C=0.5, standardize=False, class_weight=class_weight).fit(x[tr], y[tr])
    ref = LogisticRegression(C=0.5, class_weight=class_weight, max_iter=5000).fit(x[tr].numpy(), y[tr])
    assert abs(ours.score(x[te], y[te]) - ref.score(x[te].numpy(), y[te])) <= 0.01
    np.testing.assert_allclose(ours.coef_.numpy(), ref.coef_[0], atol=5e-3 * (1 + np.abs(ref.coef_).max()))
    ours_std = LinearProbe(C=0.5).fit(x[tr], y[tr])  # standardised inputs: compare with a scaled sklearn fit
    mu, sd = x[tr].mean(0), x[tr].std(0, correction=0)
    ref_std = LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000).fit(((x[tr] - mu) / sd).numpy(), y[tr])
    assert abs(ours_std.score(x[te], y[te]) - ref_std.score(((x[te] - mu) / sd).numpy(), y[te])) <= 0.01


def test_linear_probe_cross_validates_C():
    x, y = _classification(n=600, d=200)
    probe = LinearProbe(Cs=(1e-4, 1e-2, 1.0, 100.0), cv=3).fit(x, y)
    assert probe.C_ in (1e-4, 1e-2, 1.0, 100.0) and set(probe.cv_scores_) == {1e-4, 1e-2, 1.0, 100.0}
    assert probe.cv_scores_[probe.C_] == min(probe.cv_scores_.values())
    assert probe.C_ != 1e-4 and probe.cv_scores_[1e-4] > probe.cv_scores_[probe.C_]  # over-regularised loses


def test_probe_api_and_labels():
    x, y = _classification()
    labels = np.where(y, "yes", "no")
    probe = SparseProbe(n_neurons=2, method="mean_diff").fit(x, labels)
    assert probe.classes_ == ["no", "yes"] and probe is probe.fit(x, labels)
    assert set(probe.predict(x[:5])) <= {"no", "yes"}
    proba = probe.predict_proba(x[:5])
    torch.testing.assert_close(proba.sum(1), torch.ones(5))
    report = probe.evaluate(x, labels)
    assert set(report) == {"accuracy", "precision", "recall", "f1", "auc"} and report["auc"] > 0.7
    assert probe.support_.tolist() == probe.ranking_[:2].tolist() and probe.coef_.shape == (2,)


def test_sparse_probe_on_sae_latents_like_features():
    """Any [n, d] features work: non-negative sparse codes with a planted latent."""
    g = torch.Generator().manual_seed(3)
    codes = torch.relu(torch.randn(1000, 3000, generator=g) - 2.0)
    y = (codes[:, 1234] > 0).numpy()
    probe = SparseProbe(n_neurons=1, method="f_stat").fit(codes, y)
    assert probe.support_.tolist() == [1234] and probe.score(codes, y) > 0.99


def test_errors_say_what_to_do(unchecked):
    x, y = _classification(n=100, d=5)
    with pytest.raises(InputError, match="not fitted"):
        SparseProbe().predict(x)
    with pytest.raises(InputError, match=r"valid n_neurons is 1\.\.5"):
        SparseProbe(n_neurons=6).fit(x, y)
    with pytest.raises(InputError, match="exactly 2 classes"):
        LinearProbe(C=1.0).fit(x, np.arange(100) % 3)
    with pytest.raises(InputError, match="exactly 2 classes; got 1"):
        SparseProbe(n_neurons=1).fit(x, np.zeros(100))
    with unchecked(), pytest.raises(InputError, match="n_examples, n_features"):
        SparseProbe(n_neurons=1).fit(x[None], y)
    with pytest.raises(InputError, match="method"):
        SparseProbe(n_neurons=1, method="magic").fit(x, y)
    probe = SparseProbe(n_neurons=1).fit(x, y)
    with pytest.raises(InputError, match="fitted on 5"):
        probe.predict(x[:, :3])


def test_k_is_a_deprecated_alias_of_n_neurons():
    x, y = _classification(n=300, d=12)
    new = SparseProbe(n_neurons=3, method="f_stat").fit(x, y)
    with pytest.warns(DeprecationWarning, match="'k' is deprecated, use 'n_neurons'") as caught:
        old = SparseProbe(k=3, method="f_stat")
    assert caught[0].filename == __file__  # the warning points at the caller's line
    old.fit(x, y)
    assert old.n_neurons == 3 and old.support_.tolist() == new.support_.tolist()
    torch.testing.assert_close(old.coef_, new.coef_, atol=0, rtol=0)
    with pytest.warns(DeprecationWarning, match="use 'n_neurons'"):
        assert old.k == 3
    with pytest.raises(InputError, match="both k= and n_neurons="):
        SparseProbe(k=3, n_neurons=3)
    with pytest.raises(InputError, match="both k= and n_neurons="):
        SparseProbe(3, k=3)


def test_ridge_probe_matches_sklearn_ridgecv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 60, generator=g)
    t = x[:, :3] @ torch.tensor([1.0, 2.0, -1.0]) + 2 * torch.randn(400, generator=g) + 1950
    alphas = (0.1, 1.0, 10.0, 100.0, 1000.0)
    ours = RidgeProbe(alphas=alphas, standardize=False).fit(x, t)
    ref = RidgeCV(alphas=alphas).fit(x.numpy(), t.numpy())
    assert ours.alpha_ == ref.alpha_
    np.testing.assert_allclose(ours.coef_.numpy(), ref.coef_, atol=1e-6)
    assert abs(ours.score(x, t) - ref.score(x.numpy(), t.numpy())) < 1e-6
    rep = ours.evaluate(x, t)
    assert set(rep) == {"r2", "spearman"} and rep["spearman"] > 0.5


def test_ridge_group_cv_holds_out_entities():
    g = torch.Generator().manual_seed(1)
    entity = torch.arange(300) // 10  # 30 entities, 10 prompts each
    target = torch.randn(30, generator=g)[entity]
    x = torch.randn(30, 50, generator=g)[entity] + 0.1 * torch.randn(300, 50, generator=g)  # memorisable
    loo = RidgeProbe().fit(x, target)
    grouped = RidgeProbe(cv=5).fit(x, target, groups=entity)
    assert grouped.cv_errors_[grouped.alpha_] > loo.cv_errors_[loo.alpha_]  # LOO leaks across prompts
    with pytest.raises(InputError, match="cv=5"):
        RidgeProbe().fit(x, target, groups=entity)


def test_linear_probe_folds_are_stratified_and_a_one_class_training_part_is_refused():
    """With 2 positives in 40 rows and 3 folds, plain random folds left a training part without a positive in a
    third of draws (its held-out log-loss then chose C); folds are now dealt per class, as StratifiedKFold."""
    from probes.split import fold_ids

    y = torch.zeros(40)
    y[[5, 31]] = 1
    for seed in range(30):
        folds = fold_ids(40, 3, seed, y=y)
        assert sorted(torch.bincount(folds, minlength=3).tolist()) == [13, 13, 14]
        assert len(set(folds[y == 1].tolist())) == 2  # the two positives in two folds: every training part has one
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)) + y[:, None]
    probe = LinearProbe(cv=3).fit(x, y)
    assert all(np.isfinite(v) and v < 2 for v in probe.cv_scores_.values())
    y1 = torch.zeros(40)
    y1[7] = 1
    with pytest.raises(InputError, match="fold .* single class .* rarer class has 1 examples"):
        LinearProbe(cv=3).fit(x, y1)
    LinearProbe(C=1.0).fit(x, y1)  # a fixed C needs no folds
