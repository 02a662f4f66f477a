"""Distributed alignment search: a trainable orthonormal rotation learned through an edited forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from interp.capture import capture
from interp.das import CircleRotation, RotatedPatch, fit_das, fit_das_circle, interchange_accuracy
from interp.edits import EditContext
from interp.errors import InputError
from interp.intervene import intervene

V, D = 40, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _acc(model, das, base, labels, site):
    with torch.no_grad(), intervene(model, {site: das}, positions="last"):
        return float((model(**base).logits[:, -1].argmax(-1) == labels).float().mean())


def test_rotated_patch_stays_orthonormal_and_full_rank_is_a_full_patch():
    das = RotatedPatch(D, D)
    w = das.W.detach()
    torch.testing.assert_close(w @ w.T, torch.eye(D), atol=1e-5, rtol=0)
    x, src = torch.randn(3, D), torch.randn(3, D)
    out = das.set_source(src)(x, EditContext(torch.arange(3), torch.zeros(3, dtype=torch.long), None))
    torch.testing.assert_close(out, src, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="rank"):
        RotatedPatch(D, D + 1)


def test_fit_das_learns_a_subspace_that_carries_the_source_answer(model):
    site = "blocks.0.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    n = 32
    base = {"input_ids": torch.randint(0, V, (n, 6), generator=g)}
    base["attention_mask"] = torch.ones_like(base["input_ids"])
    source = {"input_ids": torch.randint(0, V, (n, 6), generator=g)}
    source["attention_mask"] = torch.ones_like(source["input_ids"])
    with torch.no_grad():
        labels = model(**source).logits[:, -1].argmax(-1)  # the answer of the source run
    untrained = RotatedPatch(D, 4, seed=0).set_source(
        __import__("interp").capture(model, source, site, positions="last")[site])
    before = _acc(model, untrained, base, labels, site)
    das = fit_das(model, site, base, source, labels, rank=4, steps=30, lr=0.05)
    after = _acc(model, das, base, labels, site)
    assert after >= before + 0.2, (before, after)
    assert all(p.requires_grad for p in model.parameters())  # model flags restored
    w = das.subspace().basis
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-4, rtol=0)


def test_interchange_accuracy_is_the_edited_runs_hit_rate_on_held_out_padded_pairs(model):
    """IIA counts the last real token of right-padded rows, in chunks, and leaves the edit's own source alone."""
    site = "blocks.0.hook_resid_post"
    g = torch.Generator().manual_seed(1)
    n = 20
    ones = torch.ones(n, 7, dtype=torch.long)
    base = {"input_ids": torch.randint(0, V, (n, 7), generator=g), "attention_mask": ones.clone()}
    base["attention_mask"][::3, 5:] = 0  # right padding on some rows
    source = {"input_ids": torch.randint(0, V, (n, 7), generator=g), "attention_mask": ones.clone()}
    source["attention_mask"][1::4, 4:] = 0
    das = RotatedPatch(D, 4, seed=3)
    mark = torch.full((1, D), 7.0)
    das.set_source(mark)
    with torch.no_grad():
        src = capture(model, source, site, positions="last")[site]
        with intervene(model, {site: RotatedPatch(D, 4, seed=3).set_source(src)}, positions="last"):
            logits = model(**base).logits
    last = base["attention_mask"].sum(1) - 1
    pred = logits[torch.arange(n), last].argmax(-1)
    labels = pred.clone()
    labels[:7] = (labels[:7] + 1) % V  # 13 of 20 right
    assert interchange_accuracy(model, site, das, base, source, labels, batch_size=6) == pytest.approx(13 / 20)
    assert torch.equal(das.source, mark)
    with pytest.raises(InputError, match="pair up"):
        interchange_accuracy(model, site, das, base, source, labels[:5])


def test_rotated_patch_within_a_span_starts_at_init_and_stays_there():
    g = torch.Generator().manual_seed(1)
    within = torch.randn(5, D, generator=g)
    init = within[:2] + 0.5 * within[2:4]
    das = RotatedPatch(D, 2, within=within, init=init)
    w = das.W.detach()
    q = torch.linalg.qr(init.T)[0].T  # the orthonormalised start (init lies in the span)
    torch.testing.assert_close(w @ w.T, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.T @ w, q.T @ q, atol=1e-5, rtol=0)  # the same plane
    basis = torch.linalg.qr(within.T)[0].T
    torch.testing.assert_close(w - (w @ basis.T) @ basis, torch.zeros_like(w), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="span"):
        RotatedPatch(D, 6, within=within)


def test_circle_rotation_is_the_rotate_edit_of_its_subspace():
    from interp.edits import Rotate

    g = torch.Generator().manual_seed(2)
    classes = ["a", "b", "c", "d", "e"]
    ang = torch.tensor([0.0, 1.0, 2.5, 3.9, 5.0])  # unevenly spaced, in a random plane, off-center
    plane = torch.linalg.qr(torch.randn(D, 2, generator=g))[0].T
    means = (torch.stack([ang.cos(), ang.sin()], 1) * 3 + 1.0) @ plane + 0.1 * torch.randn(5, D, generator=g)
    rot = CircleRotation(means, classes, scale=3.0, within=None, seed=4)
    target = torch.tensor([1, 4, 0, 2, 3, 3])
    x = torch.randn(6, D, generator=g)
    ctx = EditContext(torch.arange(6), torch.zeros(6, dtype=torch.long), None)
    got = rot.set_target(target)(x, ctx)
    sub = rot.subspace(order=classes)
    want = Rotate(sub, to=[classes[t] for t in target], scale=3.0)(x, ctx)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the edited points sit on the target's angle at 3 x the circle's radius
    cm = sub.coord_map
    d = sub.project(got) - cm.center
    torch.testing.assert_close(d.norm(dim=-1), torch.full((6,), 3.0 * cm.radius), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.atan2(d[:, 1], d[:, 0]), torch.tensor([cm.angles[classes[t]] for t in target]),
                               atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="set_target"):
        CircleRotation(means, classes)(x, ctx)


N_CLS = 5


def _class_task(n, seed=0):
    """Prompts of 5 random tokens with a class token (ids 1..N_CLS) at column 1; the answer is that token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(N_CLS + 1, V, (n, 5), generator=g)
    y = torch.arange(n) % N_CLS
    ids[:, 1] = y + 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, y


@pytest.fixture(scope="module")
def copy_model():
    """A tiny Llama trained to repeat the class token, whose class embeddings are planted on a circle in
    coordinates 0 and 1 (the same elsewhere), so only that plane tells the classes apart at the embedding."""
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    emb = m.get_input_embeddings().weight
    ang = torch.arange(N_CLS) * 2 * torch.pi / N_CLS
    with torch.no_grad():
        shared = torch.randn(D)
        shared[:2] = 0
        emb[1:N_CLS + 1] = shared / shared.norm()
        emb[1:N_CLS + 1, 0], emb[1:N_CLS + 1, 1] = ang.cos(), ang.sin()
    frozen = torch.ones(V, 1)
    frozen[1:N_CLS + 1] = 0
    emb.register_hook(lambda grad: grad * frozen)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(60):
        batch, y = _class_task(32, seed=100 + step)
        loss = nn.functional.cross_entropy(m(**batch).logits[:, -1], y + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval().requires_grad_(True)


def test_fit_das_circle_finds_a_planted_circle_plane_from_a_random_start(copy_model):
    from interp.edits import Rotate

    site = "blocks.0.hook_resid_pre"  # the embedding: the classes differ only in the planted plane
    order = ["a", "b", "c", "d", "e"]
    tokens = torch.arange(1, N_CLS + 1)
    batch, y = _class_task(60)
    labels = [order[i] for i in y]
    n = len(y)
    target = (y + 1 + torch.arange(n) % 4) % N_CLS  # every row, a class other than its own
    with torch.no_grad():
        assert bool((copy_model(**batch).logits[:, -1, tokens].argmax(-1) == y).all())  # the model copies

    def success(sub):
        with torch.no_grad(), intervene(copy_model, {site: Rotate(sub, to=[order[t] for t in target], scale=1.0)},
                                        positions=[[1]] * n):
            top = copy_model(**batch).logits[:, -1, tokens].argmax(-1)
        return float((top == target).float().mean())

    kw = dict(order=order, positions=torch.full((n,), 1), scale=1.0, within=None, init="random", lr=0.05,
              batch_size=20, seed=0)
    start = fit_das_circle(copy_model, site, batch, labels, tokens, steps=1, **kw)[site]
    sub = fit_das_circle(copy_model, [site], batch, labels, tokens, steps=30, **kw)[site]
    before, after = success(start), success(sub)
    assert before < 0.5 and after >= 0.9, (before, after)
    # cosines of the principal angles to the planted plane: the learned plane turned towards it
    cos_start, cos_end = (torch.linalg.svdvals(s.basis[:, :2]) for s in (start, sub))
    assert float(cos_end.min()) > 0.7 > 0.5 > float(cos_start.min()), (cos_start, cos_end)
    assert sub.meta["finder"] == "das_circle" and len(sub.meta["losses"]) == 30
    assert sub.meta["order_matches"] and sorted(sub.coord_map.angles) == order
    assert all(p.requires_grad for p in copy_model.parameters())  # the model's flags restored
    torch.testing.assert_close(sub.basis @ sub.basis.T, torch.eye(2), atol=1e-4, rtol=0)


def test_fit_das_circle_rejects_bad_input(model):
    batch, y = _class_task(10)
    labels = [["a", "b", "c", "d", "e"][i] for i in y]
    site = "blocks.0.hook_resid_post"
    args = (model, site, batch, labels, torch.arange(1, 6))
    with pytest.raises(InputError, match="unknown classes"):
        fit_das_circle(*args, order=["a", "b", "c", "d"], positions=torch.full((10,), 2))
    with pytest.raises(InputError, match="positions"):
        fit_das_circle(*args, order=list("abcde"), positions=torch.full((3,), 2))
    with pytest.raises(InputError, match="within"):
        fit_das_circle(*args, order=list("abcde"), positions=torch.full((10,), 2), within="pca")
    with pytest.raises(InputError, match="no training rows"):
        fit_das_circle(*args, order=list("abcde"), positions=torch.full((10,), 2),
                       train_rows=torch.zeros(10, dtype=torch.bool))


def test_fit_das_circle_within_class_means_stays_in_their_centred_span(copy_model):
    """``within="class_means"``: the plane lies in the span of the class means minus their mean, which has
    n_classes - 1 directions (the float32 rounding of the centred means is not a direction)."""
    site = "blocks.1.hook_resid_pre"
    order = ["a", "b", "c", "d", "e"]
    batch, y = _class_task(40)
    labels = [order[i] for i in y]
    acts = capture(copy_model, batch, [site], positions=torch.full((len(y), 1), 1))[site][:, 0].float()
    means = torch.stack([acts[y == k].mean(0) for k in range(N_CLS)])
    span = torch.linalg.svd((means - means.mean(0)).double(), full_matrices=False)[2][: N_CLS - 1]
    sub = fit_das_circle(copy_model, site, batch, labels, torch.arange(1, N_CLS + 1), order=order,
                         positions=torch.full((len(y),), 1), acts={site: acts}, init="random", steps=5, lr=0.2,
                         batch_size=20, seed=1)[site]
    inside = (sub.basis.double() @ span.T).pow(2).sum(1)  # squared norm of each basis row inside the span
    torch.testing.assert_close(inside, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
