"""sweep(): every site and probe size in one call, fixed splits, tables, plots and agreement with single probes."""

import json

import numpy as np
import pytest
import torch

from interp.errors import InputError
from probes import SparseProbe, SweepConfig, sweep
from probes.split import train_test_split


@pytest.fixture(scope="module")
def layers(planted):
    x, y = planted(n=1500, d=1000, neurons=(3, 400, 999), n_layers=3, signal_layer=1)
    return {f"blocks.{i}.mlp.hook_post": x[i] for i in range(3)}, y


@pytest.mark.parametrize("method", ["f_stat", "mean_diff", "mutual_info", "l1", "adaptive"])
def test_sweep_finds_signal_layer_and_neurons(layers, method):
    acts, y = layers
    res = sweep(acts, y, n_neurons=(1, 3, 16), method=method, progress=False)
    assert len(res.records) == 9
    best = res.best()
    assert best["site"] == "blocks.1.mlp.hook_post"
    cell = next(r for r in res.records if r["site"] == best["site"] and r["n_neurons"] == 3)
    assert set(cell["neurons"]) == {3, 400, 999}
    assert res.metric("blocks.1.mlp.hook_post", 3) > 0.9
    assert res.metric("blocks.0.mlp.hook_post", 3) < 0.75  # no signal there


def test_sweep_cell_equals_a_single_sparse_probe(layers):
    acts, y = layers
    res = sweep(acts, y, n_neurons=(3,), method="f_stat", seed=4, progress=False, tol=1e-8)
    tr, te = train_test_split(len(y), 0.2, seed=4, stratify=y.float())
    x = acts["blocks.1.mlp.hook_post"]
    probe = SparseProbe(n_neurons=3, method="f_stat").fit(x[tr], y[tr])
    assert res.metric("blocks.1.mlp.hook_post", 3) == pytest.approx(probe.evaluate(x[te], y[te])["f1"], abs=1e-6)
    rec = res.records[1]  # (site blocks.1, n_neurons=3)
    assert rec["neurons"] == probe.support_.tolist()
    np.testing.assert_allclose(rec["coef"], probe.coef_.numpy(), atol=1e-3)


def test_layer_batches_and_tensor_input_agree(layers):
    acts, y = layers
    a = sweep(acts, y, n_neurons=(1, 2), progress=False)
    b = sweep(torch.stack(list(acts.values())), y, n_neurons=(1, 2), layer_batch=1, progress=False)
    assert [r["f1"] for r in a.records] == pytest.approx([r["f1"] for r in b.records], abs=1e-6)
    assert b.sites == ["0", "1", "2"]


def test_group_split_never_shares_a_group(layers):
    acts, y = layers
    groups = np.arange(len(y)) // 15  # 100 "documents"
    tr, te = train_test_split(len(y), 0.25, seed=1, groups=groups)
    assert not set(groups[tr.numpy()]) & set(groups[te.numpy()])
    res = sweep(acts, y, n_neurons=(1,), groups=groups, test_size=0.25, seed=1, progress=False)
    assert res.n_test == len(te) and res.n_train == len(tr)


def test_undersampling_balances_training_rows(layers):
    acts, y = layers
    res = sweep(acts, y, n_neurons=(1,), balance="undersample", progress=False)
    n_pos_train = int(y.sum() * 0.8 + 0.5)
    assert res.n_train in (2 * n_pos_train - 1, 2 * n_pos_train, 2 * n_pos_train + 1)


def test_outputs_table_frame_json_and_plots(layers, tmp_path):
    acts, y = layers
    res = sweep(acts, y, n_neurons=(1, 2, 4), progress=False, top_n=4)
    header = res.table().splitlines()[0]
    assert header.startswith("site \\ n_neurons") and header.split()[-3:] == ["1", "2", "4"]
    assert len(res.to_frame()) == 9
    assert len(res.top_neurons["blocks.1.mlp.hook_post"]) == 4
    assert res.top_neurons["blocks.1.mlp.hook_post"][0]["neuron"] in (3, 400, 999)
    saved = json.loads(res.save(tmp_path / "r.json").read_text())
    assert saved["config"]["n_neurons"] == [1, 2, 4] and len(saved["records"]) == 9
    assert saved["sites"] == list(acts) and set(saved["records"][0]) >= {"site", "n_neurons"}
    res.plot_f1(tmp_path / "f1.png")
    res.plot_top_neurons(tmp_path / "top.png")
    assert (tmp_path / "f1.png").stat().st_size > 1000 and (tmp_path / "top.png").stat().st_size > 1000


def test_n_neurons_above_width_is_skipped_and_config_is_validated(layers):
    acts, y = layers
    small = {"a": acts["blocks.1.mlp.hook_post"][:, :8]}
    res = sweep(small, y, n_neurons=(4, 8, 16), progress=False)
    assert [r["n_neurons"] for r in res.records] == [4, 8]
    with pytest.raises(InputError, match="n_neurons="):
        SweepConfig(n_neurons=(0, 2))
    with pytest.raises(InputError, match="balance="):
        SweepConfig(balance="oversample")
    with pytest.raises(InputError, match="method="):
        SweepConfig(method="pca")
    with pytest.raises(InputError, match="same examples"):
        sweep({"a": torch.randn(10, 3), "b": torch.randn(11, 3)}, [0, 1] * 5)
    with pytest.raises(InputError, match="single class"):
        sweep({"a": torch.randn(10, 3)}, [0] * 9 + [1], progress=False)


def test_old_names_warn_and_give_the_same_sweep(layers, tmp_path):
    import probes

    acts, y = layers
    new = sweep(acts, y, n_neurons=(1, 3), progress=False)
    with pytest.warns(DeprecationWarning, match="'ks' is deprecated, use 'n_neurons'") as caught:
        old = sweep(acts, y, ks=(1, 3), progress=False)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    assert old.records == new.records and old.config == new.config
    with pytest.raises(InputError, match="both ks= and n_neurons="):
        sweep(acts, y, ks=(1,), n_neurons=(1,), progress=False)
    with pytest.raises(InputError, match="both ks= and n_neurons="):
        sweep(acts, y, (1,), ks=(1,), progress=False)
    with pytest.warns(DeprecationWarning, match="'activations_by_layer' is deprecated"):
        assert sweep(activations_by_layer=acts, labels=y, n_neurons=(1, 3), progress=False).records == new.records
    # the config
    with pytest.warns(DeprecationWarning, match="use 'n_neurons'"):
        assert SweepConfig(ks=(3, 1)) == SweepConfig(n_neurons=(1, 3))
    with pytest.warns(DeprecationWarning, match="use 'n_neurons'"):
        assert new.config.ks == (1, 3)
    with pytest.raises(InputError, match="both ks= and n_neurons="):
        SweepConfig(ks=(1,), n_neurons=(1,))
    # records: the old keys read the new ones; nothing is stored twice
    rec = new.best()
    with pytest.warns(DeprecationWarning, match="'layer' is deprecated, use 'site'"):
        assert rec["layer"] == rec["site"] == "blocks.1.mlp.hook_post"
    with pytest.warns(DeprecationWarning, match="'k' is deprecated, use 'n_neurons'"):
        assert rec["k"] == rec["n_neurons"]
    assert "k" not in rec and "layer" not in rec and rec.get("k") is None
    with pytest.raises(KeyError):
        rec["neuron"]  # a typo is still an error
    # the result's methods
    with pytest.warns(DeprecationWarning, match="use 'sites'"):
        assert new.layers == new.sites
    with pytest.warns(DeprecationWarning):
        assert new.metric(layer="blocks.1.mlp.hook_post", k=3) == new.metric("blocks.1.mlp.hook_post", 3)
    with pytest.warns(DeprecationWarning, match="use 'n_neurons'"):
        assert new.best(k=1) == new.best(n_neurons=1)
    with pytest.raises(InputError, match="both k= and n_neurons="):
        new.best(1, k=1)
    # module-level names
    with pytest.warns(DeprecationWarning, match="'DEFAULT_KS' is deprecated, use 'DEFAULT_N_NEURONS'"):
        assert probes.DEFAULT_KS == probes.DEFAULT_N_NEURONS
    with pytest.warns(DeprecationWarning, match="'DEFAULT_KS' is deprecated"):
        from probes.sweep import DEFAULT_KS
    assert DEFAULT_KS == probes.DEFAULT_N_NEURONS
    with pytest.raises(AttributeError, match="DEFAULT_K"):
        probes.DEFAULT_K  # noqa: B018
    with pytest.warns(DeprecationWarning, match="use 'plot_metric_vs_n_neurons'"):
        probes.plot_metric_vs_k(new, tmp_path / "old.png")
    probes.plot_metric_vs_n_neurons(new, tmp_path / "new.png")
    assert (tmp_path / "old.png").read_bytes() == (tmp_path / "new.png").read_bytes()


def test_plots_of_a_regression_sweep_and_of_labels_other_than_0_1(tmp_path):
    """plot_f1 on a regression sweep raised AttributeError (its config has no method); the activation histogram
    of labels 1/2 or -1/1 counted every row positive (n=0 negatives) and refused string labels."""
    pytest.importorskip("matplotlib")
    import probes
    from probes.plots import plot_neuron_activations

    g = torch.Generator().manual_seed(0)
    y = torch.randn(120, generator=g)
    x = torch.randn(120, 6, generator=g) + y[:, None] * torch.tensor([2.0, 0, 0, 0, 0, 0])
    fig = probes.sweep_regression({"a": x}, y, n_neurons=(1, 2), progress=False).plot_f1(tmp_path / "r2.png")
    assert (tmp_path / "r2.png").is_file() and "r2" in fig.axes[0].get_title()
    v = torch.randn(200, generator=g)
    lab = (torch.rand(200, generator=g) < 0.45).long()
    n_pos = int(lab.sum())
    for labels, names in [(lab, ("negative", "positive")), (lab + 1, ("1", "2")), (2 * lab - 1, ("-1", "1")),
                          (["b" if t else "a" for t in lab.tolist()], ("a", "b"))]:
        legend = [t.get_text() for t in plot_neuron_activations(v, labels).axes[0].get_legend().get_texts()]
        assert legend == [f"{names[0]} (n={200 - n_pos})", f"{names[1]} (n={n_pos})"]
