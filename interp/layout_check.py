"""Verify a layout on the model itself: the block algebra holds and writes reach the residual stream.

:func:`check_layout` runs a few forward passes over a handful of tokens (one clean, then one per
site kind with a random steer ``v`` written at that kind in every block) and reports which block
sites it could verify:

- **reads**: each site is reached once per forward pass with a ``[batch, seq, width]`` value (width
  ``d_model`` except for the MLP neurons), and the block algebra of :mod:`interp.layouts` holds to
  within a few float roundings relative to the magnitudes summed;
- **writes**: after ``value + v`` is written at a site, the site reads ``value + v``, the block
  algebra still holds downstream of it (so the residual stream carries ``v``), and the next block
  receives a written ``resid_post``; a write at the MLP neurons changes the block's output.

It also tells parallel blocks from sequential ones: with every block's input held at its clean value,
a steer written at attention's output changes the MLP's input in a sequential block and leaves it
untouched in a parallel one (**parallel**).

Every pass runs to the end of the forward pass (a block called again after the deepest site is seen),
with the model's low-precision floating parameters and buffers held as float32 (restored bitwise
afterwards), so a model accepts the same sites in bfloat16 as in float32; this needs memory for a
float32 copy of the weights for the duration of the check.

A discovered layout is trusted only where this check passes (:mod:`interp.sites` runs it once per
model); the test suite runs it on every listed family.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from interp.capture import as_batch, run_to_sites
from interp.errors import SiteError
from interp.layouts import KINDS, RESIDUAL_KINDS, Layout, find_blocks, submodule, unwrap
from interp.sites import Site, add_read_hook, add_write_hook, candidate_site, layout_of, refusal, remove_hooks

__all__ = ["LayoutCheck", "check_layout"]

_PRE, _ATTN, _MID, _NEURONS, _MLP, _POST = KINDS


@dataclass(frozen=True, kw_only=True)
class LayoutCheck:
    """Which block sites of a model were verified, and why the others were not."""

    accepted: tuple[str, ...]
    """Block sites whose reads satisfy the block algebra and whose writes reach the residual stream, in
    forward order."""
    refused: dict[str, str]
    """Block site -> one line saying why it is refused."""
    errors: dict[str, float]
    """Accepted site -> the largest relative difference seen in its checks (0.0: bitwise)."""
    parallel: bool | None = None
    """Whether attention and MLP read the same residual: a steer at attention's output leaves the MLP's
    input as it was (True) or changes it (False); None where that could not be tried or was unclear."""
    why_not_parallel: str = ""
    """Why :attr:`parallel` is None (empty otherwise)."""


Equation = tuple[str, tuple[str, ...], Callable[[dict[str, Tensor]], Tensor], tuple[str, ...]]
"""(left-hand kind, kinds on the right, the right-hand side, the kinds blamed when it fails)."""


def _equations(lay: Layout, block: nn.Module) -> list[Equation]:
    if lay.post_norms is not None:
        n1, n2 = (submodule(block, p) for p in lay.post_norms)
        return [(_MID, (_PRE, _ATTN), lambda v: n1(v[_PRE] + v[_ATTN]), (_ATTN, _MID)),
                (_POST, (_MID, _MLP), lambda v: n2(v[_MID] + v[_MLP]), (_MID, _MLP))]
    if lay.parallel is not False:  # also where not known: this holds for sequential blocks too
        return [(_POST, (_PRE, _ATTN, _MLP), lambda v: v[_PRE] + v[_ATTN] + v[_MLP], (_ATTN, _MLP))]
    return [(_MID, (_PRE, _ATTN), lambda v: v[_PRE] + v[_ATTN], (_ATTN, _MID)),
            (_POST, (_MID, _MLP), lambda v: v[_MID] + v[_MLP], (_MID, _MLP))]


def _rel(got: Tensor, want: Tensor, *terms: Tensor) -> float:
    """Largest difference, each element relative to the magnitudes that went into it (the bound on
    float rounding of a sum), so a small missing factor is not hidden by a large element elsewhere."""
    size = sum((t.float().abs() for t in (got, want, *terms)), torch.zeros_like(got, dtype=torch.float32))
    diff = (got.float() - want.float()).abs()
    return float((diff / size.clamp_min(torch.finfo(torch.float32).tiny)).max())


def _low(t: Tensor | None) -> bool:
    return t is not None and t.is_floating_point() and torch.finfo(t.dtype).eps > torch.finfo(torch.float32).eps


FLOAT32_CHECK_BYTES = 4 << 30
"""Most bytes the float32 copy of a low-precision model's weights may take during the check (:func:`_float32`);
a larger model (a 7B model in bf16 would need 28 GB more) is checked in its own dtype, at :func:`_tol`'s looser
tolerance."""


@contextmanager
def _float32(model: nn.Module):
    """Floating parameters and buffers below float32 precision (bfloat16, float16) held as float32 while
    checking; the original tensors are put back afterwards, so the model is left bitwise as it was. Above
    :data:`FLOAT32_CHECK_BYTES` of copies the model is checked as it is."""
    params = [(p, p.data) for p in model.parameters() if _low(p)]
    bufs, copies = [], {}
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if _low(b):
                bufs.append((mod, name, b))
    if 4 * (sum(p.numel() for p, _ in params) + sum(b.numel() for _, _, b in bufs)) > FLOAT32_CHECK_BYTES:
        params, bufs = [], []
    try:
        for p, data in params:
            p.data = data.float()
        for mod, name, b in bufs:
            mod._buffers[name] = copies.setdefault(id(b), b.float())
        yield
    finally:
        for p, data in params:
            p.data = data
        for mod, name, b in bufs:
            mod._buffers[name] = b


@contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off while checking; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _run(hf: nn.Module, batch: dict, sites: dict, write: dict | None = None):
    """One forward pass; returns (after-reads, before-reads, error). Before-reads are registered ahead
    of the write hooks, after-reads behind them; each keeps a copy of every call's value."""
    before: dict = {k: [] for k in sites}
    after: dict = {k: [] for k in sites}
    handles: list = []

    def keep(store, key):
        return lambda value: store[key].append(value.detach().clone())

    try:
        if write:
            for key, site in sites.items():
                handles += add_read_hook(site, keep(before, key))
            for key, fn in write.items():
                handles += add_write_hook(sites[key], fn)
        for key, site in sites.items():
            handles += add_read_hook(site, keep(after, key))
        run_to_sites(hf, batch, list(sites.values()), stop_early=False)
    except Exception as exc:  # a write that breaks the forward pass refuses its site, nothing more
        return after, before, f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        remove_hooks(handles)
    return after, before, None


def check_layout(model: nn.Module, layout: Layout | None = None, *, batch: int = 2, seq: int = 5,
                 seed: int = 0) -> LayoutCheck:
    """Verify `layout` (default: the model's own) on `model` with ``batch`` x ``seq`` random tokens.

    The model's parameters, hooks, training flags and attention implementation are left as they were.
    """
    hf = unwrap(model)
    blocks = find_blocks(hf)
    lay = layout or layout_of(hf)
    n = len(blocks)
    name = lambda key: f"blocks.{key[0]}.{key[1]}"  # noqa: E731
    refused: dict[str, str] = {}
    errors: dict[str, float] = {}
    sites: dict[tuple[int, str], Site] = {}
    for layer in range(n):
        for kind in KINDS:
            try:
                sites[layer, kind] = candidate_site(hf, layer, kind, lay)
            except SiteError as exc:
                refused[name((layer, kind))] = str(exc)

    def refuse(key, why: str) -> None:
        sites.pop(key, None)
        refused.setdefault(name(key), str(refusal(hf, key[0], key[1], why, lay)))

    g = torch.Generator().manual_seed(seed)
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(hf, "config", None), "vocab_size", 2)
    data = as_batch(torch.randint(0, vocab, (batch, seq), generator=g))
    with _eval_mode(hf), _float32(hf), torch.no_grad():
        # where a resid_mid write reads resid_pre (a module the block's code calls with it)
        pre_in = {(layer, "pre_in"): s.pre_in for (layer, kind), s in sites.items() if s.pre_in is not None}
        clean, _, failed = _run(hf, data, {**sites, **pre_in})
        if failed:
            raise SiteError(f"the layout check could not run a forward pass of {type(hf).__name__}: {failed}")
        values: dict[tuple[int, str], Tensor] = {}
        for key in list(sites):
            calls = clean[key]
            pre = clean.get((key[0], _PRE)) or [None]
            width = pre[0].shape[-1] if key[1] in RESIDUAL_KINDS and pre[0] is not None else None
            if not calls:
                refuse(key, "the forward pass never reaches it")
            elif len(calls) > 1:
                refuse(key, f"the forward pass reaches it {len(calls)} times (a module used more than once per block)")
            elif calls[0].dim() != 3 or tuple(calls[0].shape[:2]) != (batch, seq):
                refuse(key, f"it holds shape {tuple(calls[0].shape)}, expected [batch, seq, width] = "
                            f"({batch}, {seq}, ...)")
            elif width is not None and calls[0].shape[-1] != width:
                refuse(key, f"it has width {calls[0].shape[-1]}, but the residual stream has width {width}")
            else:
                values[key] = calls[0]
        failures: list[tuple[tuple[int, str], str]] = []
        for layer in range(n):
            for lhs, rhs, fn, blame in _equations(lay, blocks[layer]):
                missing = [k for k in (lhs, *rhs) if (layer, k) not in values]
                if missing:
                    why = f"the block algebra cannot be checked without blocks.{layer}.{missing[0]}"
                    failures += [((layer, k), why) for k in blame]
                    continue
                v = {k: values[layer, k] for k in (lhs, *rhs)}
                err = _rel(v[lhs], fn(v), *v.values())
                if err > _tol(v[lhs]):
                    failures += [((layer, k), _algebra_failed(lhs, rhs, err, lay)) for k in blame]
                for k in blame:
                    errors[name((layer, k))] = max(errors.get(name((layer, k)), 0.0), err)
        for (layer, _), site in pre_in.items():
            calls, want = clean[layer, "pre_in"], values.get((layer, _PRE))
            where = ("it is written as resid_pre + attn_out with resid_pre read at the input of "
                     f"{type(site.module).__name__}")
            if want is None:
                continue
            if len(calls) != 1:
                failures.append(((layer, _MID), f"{where}, which the forward pass reaches {len(calls)} times"))
            elif calls[0].shape != want.shape or _rel(calls[0], want, want) > _tol(want):
                failures.append(((layer, _MID), f"{where}, which is not resid_pre"))
        for key, why in failures:
            refuse(key, why)
        for kind in KINDS:
            _check_writes(hf, data, blocks, lay, kind, sites, values, g, refuse, errors)
        parallel, unclear = _tell_parallel(hf, data, len(blocks), sites, values, g)
    if lay.parallel is None:  # no module known to read resid_mid: say what the block turned out to be
        for layer in range(n):
            if parallel:
                why = "attention and MLP both read resid_pre (a steer of attn_out leaves the MLP's input as it was)"
            elif parallel is False:
                why = (f"{lay.refused.get(_MID, 'no module is known to read it')}, and the block is sequential "
                       "(a steer of attn_out changes the MLP's input)")
            else:
                why = f"{lay.refused.get(_MID, 'no module is known to read it')}, and {unclear}"
            refused[name((layer, _MID))] = str(refusal(hf, layer, _MID, why, replace(lay, parallel=parallel)))
    accepted = tuple(name(k) for k in sorted(sites, key=lambda k: (k[0], KINDS.index(k[1]))))
    return LayoutCheck(accepted=accepted, refused=refused, errors={k: errors.get(k, 0.0) for k in accepted},
                       parallel=parallel, why_not_parallel=unclear if parallel is None else "")


def _tell_parallel(hf, data, n, sites, values, g) -> tuple[bool | None, str]:
    """Hold every block's input at its clean value, add a steer to attention's output, and read the MLP's input
    (its neurons, else its output): unchanged in a parallel block, changed in a sequential one."""
    readers = {layer: next((k for k in (_NEURONS, _MLP) if (layer, k) in sites), None) for layer in range(n)}
    layers = [layer for layer in range(n) if readers[layer] and (layer, _PRE) in sites and (layer, _ATTN) in sites]
    if not layers:
        return None, ("the check has no verified attn_out and MLP site in any block to tell whether attention "
                      "feeds the MLP")
    write = {}
    for layer in layers:
        ref = values[layer, _ATTN]
        rms = float(ref.float().pow(2).mean().sqrt()) or 1.0
        v = (torch.randn(ref.shape, generator=g) * rms).to(device=ref.device, dtype=ref.dtype)
        write[layer, _ATTN] = lambda x, v=v: x + v
        write[layer, _PRE] = lambda x, c=values[layer, _PRE]: c.clone()
    after, _, failed = _run(hf, data, {k: sites[k] for k in sites if k[0] in layers}, write)
    if failed:
        return None, f"steering attn_out to tell whether attention feeds the MLP breaks the forward pass ({failed})"
    verdicts = {}
    for layer in layers:
        key = (layer, readers[layer])
        if not after[key]:
            verdicts[layer] = None
            continue
        got, clean = after[key][0], values[key]
        change = _rel(got, clean, clean)
        verdicts[layer] = True if change <= _tol(clean) else False if change > 1e-3 else None
    if len(set(verdicts.values())) == 1 and None not in verdicts.values():
        return verdicts[layers[0]], ""
    return None, ("a steer of attn_out changed the MLP's input in blocks "
                  f"{[k for k, v in verdicts.items() if v is False]} and left it in blocks "
                  f"{[k for k, v in verdicts.items() if v]}, so whether attention feeds the MLP is unclear")


def _tol(t: Tensor) -> float:
    """A few roundings of the values' dtype: 16 eps in float32 or wider (where every check of a model of up to
    :data:`FLOAT32_CHECK_BYTES` runs, :func:`_float32`); 8 eps (0.0625) for a larger model checked in bfloat16,
    which still refuses a residual scaled by 0.95 (0.10) and accepts the correct layouts (0.007 at most)."""
    if not t.is_floating_point():
        return 0.0
    eps = torch.finfo(t.dtype).eps
    return (16 if eps <= torch.finfo(torch.float32).eps else 8) * eps


def _algebra_failed(lhs: str, rhs: tuple[str, ...], err: float, lay: Layout) -> str:
    sum_ = " + ".join(rhs)
    how = "layout discovered from child names" if lay.discovered else "layout"
    return (f"{lhs} differs from {'norm(' + sum_ + ')' if lay.post_norms else sum_} by {err:.1e} (relative), so "
            f"the {how} does not match what this block computes")


def _check_writes(hf, data, blocks, lay, kind, sites, values, g, refuse, errors) -> None:
    """Write value + v at `kind` in every block that still has it; verify what the stream carries."""
    targets = [layer for layer in range(len(blocks)) if (layer, kind) in sites]
    if not targets:
        return
    vs = {}
    for layer in targets:
        ref = values[layer, kind]
        rms = float(ref.float().pow(2).mean().sqrt()) or 1.0
        vs[layer] = (torch.randn(ref.shape, generator=g) * rms).to(device=ref.device, dtype=ref.dtype)
    write = {(layer, kind): (lambda x, v=vs[layer]: x + v) for layer in targets}
    after, before, failed = _run(hf, data, dict(sites), write)
    for layer in targets:
        key = (layer, kind)
        if failed:
            refuse(key, f"writing there breaks the forward pass ({failed})")
            continue
        got = {k: after[layer, k][0] for k in KINDS if (layer, k) in sites and after[layer, k]}
        had = {k: before[layer, k][0] for k in KINDS if (layer, k) in sites and before[layer, k]}
        site = sites[key]
        if site.via is not None:
            natural = had[_PRE] + had[_ATTN] if _PRE in had and _ATTN in had else None
        else:
            natural = had.get(kind)
        v = vs[layer]
        worst = 0.0
        if natural is None or kind not in got:
            refuse(key, "a write there is not seen by the forward pass")
            continue
        err = _rel(got[kind], natural + v, natural, v)
        if err > _tol(v):
            refuse(key, f"value + v written there reads back off by {err:.1e} (relative)")
            continue
        worst = max(worst, err)
        checks = [(lhs, rhs, fn) for lhs, rhs, fn, _ in _equations(lay, blocks[layer])
                  if KINDS.index(lhs) > KINDS.index(kind)]
        why = None
        for lhs, rhs, fn in checks:
            if not all(k in got for k in (lhs, *rhs)):
                continue
            err = _rel(got[lhs], fn(got), *(got[k] for k in (lhs, *rhs)))
            worst = max(worst, err)
            if err > _tol(v):
                why = (f"a steer v written there does not reach the residual stream as written: afterwards {lhs} "
                       f"differs from {' + '.join(rhs)} by {err:.1e} (relative)")
                break
        if why is None and kind == _POST and after.get((layer + 1, _PRE)):
            err = _rel(after[layer + 1, _PRE][0], natural + v, natural, v)
            worst = max(worst, err)
            if err > _tol(v):
                why = f"the next block does not receive a resid_post written there (off by {err:.1e})"
        if why is None and kind == _NEURONS and torch.equal(got.get(_POST, v), values.get((layer, _POST), v)):
            why = "a write there does not change the block's output"
        if why is not None:
            refuse(key, why)
        else:
            errors[f"blocks.{layer}.{kind}"] = max(errors.get(f"blocks.{layer}.{kind}", 0.0), worst)
