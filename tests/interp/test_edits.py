"""The edit math objects on plain tensors (and SAE splicing through a tiny model)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from interp.edits import (
    ROTATE_SCALE,
    Compose,
    EditContext,
    MeanAblate,
    Patch,
    ProjectOut,
    Replace,
    Rotate,
    SaeEdit,
    SetCoords,
    Steer,
    ZeroAblate,
)
from interp.errors import InputError
from interp.intervene import intervene
from interp.subspace import CircleMap, LinearMap, Subspace

D = 16


def _ctx(n):
    return EditContext(torch.arange(n), torch.zeros(n, dtype=torch.long), None)


def _sub(rank=2, seed=0, origin=False):
    g = torch.Generator().manual_seed(seed)
    return Subspace(torch.randn(rank, D, generator=g), torch.randn(D, generator=g) if origin else None)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 5), origin=st.booleans())
def test_project_out_is_idempotent_and_leaves_no_component(seed, rank, origin):
    sub = _sub(rank, seed, origin)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(seed + 1))
    once = ProjectOut(sub)(x, _ctx(6))
    twice = ProjectOut(sub)(once, _ctx(6))
    torch.testing.assert_close(once, twice, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub.project(once), torch.zeros(6, rank), atol=1e-5, rtol=0)
    z = ZeroAblate(sub)(x, _ctx(6))
    torch.testing.assert_close(z @ sub.basis.T, torch.zeros(6, rank), atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), angle=st.floats(-10, 10))
def test_rotation_preserves_norms_and_the_orthogonal_part(seed, angle):
    sub = _sub(3, seed)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(seed + 1))
    y = Rotate(sub, angle=angle)(x, _ctx(5))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub.remove(y), sub.remove(x), atol=1e-5, rtol=1e-5)
    c, cy = sub.project(x), sub.project(y)
    torch.testing.assert_close(cy[:, 2], c[:, 2], atol=1e-5, rtol=1e-5)  # third coordinate is outside the plane
    got = torch.atan2(cy[:, 1], cy[:, 0]) - torch.atan2(c[:, 1], c[:, 0])
    torch.testing.assert_close(torch.remainder(got - angle + math.pi, 2 * math.pi) - math.pi,
                               torch.zeros(5), atol=1e-4, rtol=0)


def test_rotate_to_a_class_on_a_circle_keeps_each_radius():
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    cm = CircleMap(torch.tensor([0.5, -0.2]), 2.0, {d: 2 * math.pi * i / 7 for i, d in enumerate(days)})
    sub = Subspace(torch.randn(2, D, generator=torch.Generator().manual_seed(3)), torch.randn(D), cm)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    y = Rotate(sub, to=["Fri", "Mon", "Sun", "Fri"], scale=1, radius=None)(x, _ctx(4))  # a pure rotation
    want = torch.tensor([cm.angles[d] for d in ["Fri", "Mon", "Sun", "Fri"]])
    got = cm.from_coords(sub.project(y))
    torch.testing.assert_close(torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi, torch.zeros(4),
                               atol=1e-4, rtol=0)
    r = lambda z: (sub.project(z) - cm.center).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(r(y), r(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="circle map"):
        Rotate(sub, to="Funday")


def test_rotate_with_radius_lands_on_the_target_point_and_does_not_compound():
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    cm = CircleMap(torch.tensor([0.5, -0.2]), 2.0, {d: 2 * math.pi * i / 7 for i, d in enumerate(days)})
    sub = Subspace(torch.randn(3, D, generator=torch.Generator().manual_seed(3)), torch.randn(D), cm)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    to = ["Fri", "Mon", "Sun", "Fri"]
    edit = Rotate(sub, to=to, radius=cm.radius, scale=1.5)
    y = edit(x, _ctx(4))
    want = torch.stack([cm.to_coords(d)[:2] for d in to])  # the target's point on the circle ...
    want = cm.center + 1.5 * (want - cm.center)  # ... at 1.5x the circle's radius
    torch.testing.assert_close(sub.project(y)[:, :2], want, atol=1e-4, rtol=0)
    torch.testing.assert_close(sub.project(y)[:, 2], sub.project(x)[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sub.remove(y), sub.remove(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(edit(y, _ctx(4)), y, atol=1e-4, rtol=0)  # again: no compounding
    # with angle=: turned by the angle, put at the given distance from the center
    z = Rotate(sub, angle=0.7, radius=3.0)(x, _ctx(4))
    d = sub.project(z)[:, :2] - cm.center
    torch.testing.assert_close(d.norm(dim=-1), torch.full((4,), 3.0), atol=1e-4, rtol=0)
    turned = cm.from_coords(sub.project(z)) - cm.from_coords(sub.project(x))
    torch.testing.assert_close(torch.remainder(turned - 0.7 + math.pi, 2 * math.pi) - math.pi, torch.zeros(4),
                               atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="radius must be > 0"):
        Rotate(sub, to="Mon", radius=0.0)


def test_set_coords_through_maps_and_per_row():
    sub = Subspace(torch.randn(1, D), coord_map=LinearMap(torch.tensor([1.0]), torch.tensor([0.5])))
    x = torch.randn(3, D)
    y = SetCoords(sub, value=[0.0, 2.0, 4.0])(x, _ctx(3))
    torch.testing.assert_close(sub.project(y)[:, 0], torch.tensor([1.0, 2.0, 3.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(sub.remove(y), sub.remove(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="exactly one"):
        SetCoords(sub)


def test_mean_ablate_fit_and_steer_per_row():
    sub = _sub(2, 1, origin=True)
    ref = torch.randn(50, D)
    x = torch.randn(4, D)
    y = MeanAblate.fit(sub, ref)(x, _ctx(4))
    torch.testing.assert_close(sub.project(y), sub.project(ref).mean(0).expand(4, -1), atol=1e-5, rtol=1e-5)
    v = torch.randn(D)
    s = Steer(v, torch.tensor([0.0, 1.0, 2.0, 3.0]))(x, _ctx(4))
    torch.testing.assert_close(s - x, torch.arange(4.0)[:, None] * v, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="d_model"):
        Steer(torch.randn(2, D))


def test_compose_applies_in_order_and_replace():
    x = torch.randn(2, D)
    out = Compose([Steer(torch.ones(D), 1.0), lambda x, ctx: x * 3])(x, _ctx(2))
    torch.testing.assert_close(out, (x + 1) * 3)
    torch.testing.assert_close(Replace(torch.ones(D))(x, _ctx(2)), torch.ones(2, D))


def test_patch_errors_say_what_to_do(unchecked):
    src = torch.randn(2, 4, D)
    ctx = EditContext(torch.tensor([0, 1]), torch.tensor([6, 6]), None)
    with pytest.raises(InputError, match="source_positions"):
        Patch(src)(torch.randn(2, D), ctx)
    with pytest.raises(InputError, match="explicit positions"):
        Patch(src, source_positions=[[1], [2]])(torch.randn(2, D), ctx)
    with unchecked(), pytest.raises(InputError, match="batch, seq, d_model"):
        Patch(torch.randn(D))
    with pytest.raises(InputError, match="not both"):
        Patch(src, _sub(), neurons=[1])
    with pytest.raises(InputError, match=r"neurons \[16\] do not exist .* width is 16"):
        Patch(src[:, 0], neurons=[3, 16])(torch.randn(2, D), _ctx(2))


def test_patch_neurons_copies_only_those_coordinates_bitwise():
    x, src = torch.randn(3, D), torch.randn(3, D)
    out = Patch(src, neurons=[2, 5])(x, _ctx(3))
    keep = torch.ones(D, dtype=torch.bool)
    keep[[2, 5]] = False
    assert torch.equal(out[:, ~keep], src[:, [2, 5]]) and torch.equal(out[:, keep], x[:, keep])
    per_row = Patch(src, neurons=[[0], [7], [15]])(x, _ctx(3))  # one neuron per row
    want = x.clone()
    want[[0, 1, 2], [0, 7, 15]] = src[[0, 1, 2], [0, 7, 15]]
    assert torch.equal(per_row, want)
    assert torch.equal(Patch(x, neurons=[1, 2])(x, _ctx(3)), x)  # source == base: the identity


class TinySAE(nn.Module):
    """Duck-typed SAE: encode/decode only (interp never imports saes)."""

    def __init__(self, d_model, d_sae):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W_enc = nn.Parameter(torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_model, generator=g) / d_sae ** 0.5)
        self.b_dec = nn.Parameter(torch.randn(d_model, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc)

    def decode(self, codes):
        return codes @ self.W_dec + self.b_dec


def test_sae_clamp_keeps_error_term_and_free_splice_is_exact():
    sae = TinySAE(D, 40)
    x = torch.randn(5, D) * 3
    same = SaeEdit(sae, latents=[])(x, _ctx(5))
    assert torch.equal(same, x)
    codes = sae.encode(x)
    live = int(codes[0].argmax())
    noop = SaeEdit(sae, latents=[live], mode="scale", value=1.0)(x, _ctx(5))
    assert torch.equal(noop, x)
    y = SaeEdit(sae, latents=[3, 7], value=5.0)(x, _ctx(5))
    # error term kept: y - decode(edited codes) == x - decode(codes)
    edited = codes.clone()
    edited[:, [3, 7]] = 5.0
    torch.testing.assert_close(y - sae.decode(edited), x - sae.decode(codes), atol=1e-5, rtol=1e-5)
    abl = SaeEdit(sae, latents=[live], mode="ablate")(x, _ctx(5))
    torch.testing.assert_close(abl, x - codes[:, [live]] * sae.W_dec[live], atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="encode"):
        SaeEdit(object(), [1])


def test_sae_splice_in_a_model_is_exact_without_edits():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=D, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 50, (2, 5))
    base = model(ids).logits
    sae = TinySAE(D, 40)
    with intervene(model, {"blocks.0.hook_resid_post": SaeEdit(sae, latents=list(range(40)), mode="scale", value=1.0)}):
        assert torch.equal(model(ids).logits, base)
    with intervene(model, {"blocks.0.hook_resid_post": SaeEdit(sae, latents=[0, 1], value=20.0)}):
        assert not torch.allclose(model(ids).logits, base)


def test_rotate_to_a_class_defaults_to_four_times_the_circle_radius():
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    cm = CircleMap(torch.tensor([0.5, -0.2]), 2.0, {d: 2 * math.pi * i / 7 for i, d in enumerate(days)})
    sub = Subspace(torch.randn(2, D, generator=torch.Generator().manual_seed(3)), torch.randn(D), cm)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    edit = Rotate(sub, to="Wed")
    assert (edit.scale, edit.radius) == (ROTATE_SCALE, cm.radius) == (4.0, 2.0)
    y = edit(x, _ctx(4))
    want = cm.center + ROTATE_SCALE * (cm.to_coords("Wed") - cm.center)
    torch.testing.assert_close(sub.project(y), want.expand(4, 2), atol=1e-4, rtol=0)
    # turning by an angle, or a plane without a circle map, stays a pure rotation by default
    assert (Rotate(sub, angle=0.3).scale, Rotate(sub, angle=0.3).radius) == (1.0, None)
    assert Rotate(Subspace(sub.basis), to=0.3).radius is None


def test_rotate_on_an_elliptical_circle_map_moves_what_the_map_reads():
    """A probe's circle is an ellipse in the plane (axes != identity): turning to a class sets the angle
    the map reads, at the given radius on the map's own axes."""
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    axes = torch.tensor([[2.0, 0.7], [-0.3, 0.5]])
    cm = CircleMap(torch.tensor([0.4, 0.1]), 1.5, {d: 2 * math.pi * i / 7 for i, d in enumerate(days)}, axes=axes)
    sub = Subspace(torch.randn(2, D, generator=torch.Generator().manual_seed(8)), torch.randn(D), cm)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(9))
    to = ["Fri", "Mon", "Sun", "Fri", "Tue", "Thu"]
    y = Rotate(sub, to=to, scale=2.0)(x, _ctx(6))
    want = torch.tensor([cm.angles[d] for d in to])
    got = sub.predict(y)
    torch.testing.assert_close(torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi, torch.zeros(6),
                               atol=1e-4, rtol=0)
    on_axes = cm.to_circle(sub.project(y))
    torch.testing.assert_close(on_axes.norm(dim=-1), torch.full((6,), 3.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(sub.remove(y), sub.remove(x), atol=1e-5, rtol=1e-5)
    # a pure rotation keeps each row's radius on the map's axes (not in the plane)
    z = Rotate(sub, angle=1.1)(x, _ctx(6))
    torch.testing.assert_close(cm.to_circle(sub.project(z)).norm(dim=-1), cm.to_circle(sub.project(x)).norm(dim=-1),
                               atol=1e-4, rtol=1e-4)
    assert abs(math.remainder(float(cm.from_coords(cm.to_coords("Sat"))) - cm.angles["Sat"], 2 * math.pi)) < 1e-5
    with pytest.raises(InputError, match="invertible"):
        CircleMap(torch.zeros(2), 1.0, axes=torch.zeros(2, 2))


def test_wrong_widths_and_latents_are_one_line():
    x = torch.randn(3, D)
    wide = Subspace(torch.randn(2, D + 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(InputError, match="ZeroAblate: the subspace has 20 values"):
        ZeroAblate(wide)(x, _ctx(3))
    with pytest.raises(InputError, match="Patch: the subspace has 20 values"):
        Patch(torch.randn(3, D), wide)(x, _ctx(3))
    with pytest.raises(InputError, match="Patch: the source has 12 values"):
        Patch(torch.randn(3, 12))(x, _ctx(3))

    class Sae(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(D, 8))

        def encode(self, x):
            return torch.relu(x @ self.w)

        def decode(self, c):
            return c @ self.w.T

    for bad in ([8], [-1]):
        with pytest.raises(InputError, match=rf"latents \[{bad[0]}\] do not exist in an SAE of 8 latents"):
            SaeEdit(Sae(), bad, 1.0)(x, _ctx(3))


def test_mean_ablate_fit_leaves_padding_out_of_the_mean():
    sub = _sub(2, seed=3)
    acts = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    acts[1, 2:] = 100.0  # padding: must not move the mean
    fitted = MeanAblate.fit(sub, acts, attention_mask=mask)
    torch.testing.assert_close(fitted.mean_coords, sub.project(acts[mask.bool()]).mean(0))
    with pytest.raises(InputError, match="attention_mask="):
        MeanAblate.fit(sub, acts)
