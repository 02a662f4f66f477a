"""sweep(): every layer and k in one call, fixed splits, tables, plots and agreement with single probes."""

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
    res = sweep(acts, y, ks=(1, 3, 16), method=method, progress=False)
    assert len(res.records) == 9
    best = res.best()
    assert best["layer"] == "blocks.1.mlp.hook_post"
    assert set(next(r for r in res.records if r["layer"] == best["layer"] and r["k"] == 3)["neurons"]) == {3, 400, 999}
    assert res.metric("blocks.1.mlp.hook_post", 3) > 0.9
    assert res.metric("blocks.0.mlp.hook_post", 3) < 0.75  # no signal there


def test_sweep_cell_equals_a_single_sparse_probe(layers):
    acts, y = layers
    res = sweep(acts, y, ks=(3,), method="f_stat", seed=4, progress=False, tol=1e-8)
    tr, te = train_test_split(len(y), 0.2, seed=4, stratify=y.float())
    x = acts["blocks.1.mlp.hook_post"]
    probe = SparseProbe(k=3, method="f_stat").fit(x[tr], y[tr])
    assert res.metric("blocks.1.mlp.hook_post", 3) == pytest.approx(probe.evaluate(x[te], y[te])["f1"], abs=1e-6)
    rec = res.records[1]  # (layer 1, k=3)
    assert rec["neurons"] == probe.support_.tolist()
    np.testing.assert_allclose(rec["coef"], probe.coef_.numpy(), atol=1e-3)


def test_layer_batches_and_tensor_input_agree(layers):
    acts, y = layers
    a = sweep(acts, y, ks=(1, 2), progress=False)
    b = sweep(torch.stack(list(acts.values())), y, ks=(1, 2), layer_batch=1, progress=False)
    assert [r["f1"] for r in a.records] == pytest.approx([r["f1"] for r in b.records], abs=1e-6)
    assert b.layers == ["0", "1", "2"]


def test_group_split_never_shares_a_group(layers):
    acts, y = layers
    groups = np.arange(len(y)) // 15  # 100 "documents"
    tr, te = train_test_split(len(y), 0.25, seed=1, groups=groups)
    assert not set(groups[tr.numpy()]) & set(groups[te.numpy()])
    res = sweep(acts, y, ks=(1,), groups=groups, test_size=0.25, seed=1, progress=False)
    assert res.n_test == len(te) and res.n_train == len(tr)


def test_undersampling_balances_training_rows(layers):
    acts, y = layers
    res = sweep(acts, y, ks=(1,), balance="undersample", progress=False)
    n_pos_train = int(y.sum() * 0.8 + 0.5)
    assert res.n_train in (2 * n_pos_train - 1, 2 * n_pos_train, 2 * n_pos_train + 1)


def test_outputs_table_frame_json_and_plots(layers, tmp_path):
    acts, y = layers
    res = sweep(acts, y, ks=(1, 2, 4), progress=False, top_n=4)
    assert "k=4" in res.table() and len(res.to_frame()) == 9
    assert len(res.top_neurons["blocks.1.mlp.hook_post"]) == 4
    assert res.top_neurons["blocks.1.mlp.hook_post"][0]["neuron"] in (3, 400, 999)
    saved = json.loads(res.save(tmp_path / "r.json").read_text())
    assert saved["config"]["ks"] == [1, 2, 4] and len(saved["records"]) == 9
    res.plot_f1(tmp_path / "f1.png")
    res.plot_top_neurons(tmp_path / "top.png")
    assert (tmp_path / "f1.png").stat().st_size > 1000 and (tmp_path / "top.png").stat().st_size > 1000


def test_k_above_width_is_skipped_and_config_is_validated(layers):
    acts, y = layers
    small = {"a": acts["blocks.1.mlp.hook_post"][:, :8]}
    res = sweep(small, y, ks=(4, 8, 16), progress=False)
    assert [r["k"] for r in res.records] == [4, 8]
    with pytest.raises(InputError, match="ks="):
        SweepConfig(ks=(0, 2))
    with pytest.raises(InputError, match="balance="):
        SweepConfig(balance="oversample")
    with pytest.raises(InputError, match="method="):
        SweepConfig(method="pca")
    with pytest.raises(InputError, match="same examples"):
        sweep({"a": torch.randn(10, 3), "b": torch.randn(11, 3)}, [0, 1] * 5)
    with pytest.raises(InputError, match="single class"):
        sweep({"a": torch.randn(10, 3)}, [0] * 9 + [1], progress=False)
