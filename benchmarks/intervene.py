"""Overhead of an active subspace edit on a forward pass: interp vs the bare model, pyvene and nnsight.

The same edit everywhere: project a rank-r subspace out of ``blocks.L.hook_resid_post`` at every
position (``x - (x @ B.T) @ B``), on the embedded SmolLM2-135M. Each method's logits are checked
against interp's before timing. Rounds interleave the methods (order rotated each round) so that
load from other jobs hits them alike; we report the median time per forward and the median of the
per-round ratios to the bare forward. Three shapes by default: ``8x128`` (the forward dominates, so
all hooks look alike), ``1x128`` (in between) and ``1x16`` (a short call where per-call framework
overhead shows). "Faster than a peer" is decided per shape by a paired sign test over rounds
(interp's time vs the peer's in the same round): we report in how many rounds interp was faster and
the two-sided p-value.

    python benchmarks/intervene.py                   # writes benchmarks/results/intervene.json
    python benchmarks/intervene.py --quick --model DIR   # a tiny model, one shape, 3 rounds: the code path only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from interp import load_model
from interp.atomic import write_json
from interp.edits import ZeroAblate
from interp.intervene import intervene
from interp.stats import sign_test
from interp.subspace import Subspace


def make_methods(model, site_layer: int, basis: torch.Tensor):
    site = f"blocks.{site_layer}.hook_resid_post"
    sub = Subspace(basis, orthonormalize=False)
    methods = {}

    def bare(ids):
        return model(ids).logits

    def interp_ctx(ids):  # enter and leave the context on every call (hooks added and removed each time)
        with intervene(model, {site: ZeroAblate(sub)}):
            return model(ids).logits

    methods["bare"] = bare
    methods["interp"] = interp_ctx
    handle = intervene(model, {site: ZeroAblate(sub)})

    def interp_handle(ids):  # hooks attached before the timed call (see `time_shape`), not in it
        return model(ids).logits

    methods["interp (attached handle)"] = interp_handle
    try:
        import pyvene as pv

        class ProjectOut(pv.SourcelessIntervention):
            def __init__(self, b, **kw):
                super().__init__(**kw)
                self.register_buffer("B", b)

            def forward(self, base, source=None, subspaces=None, **kw):
                x = base.view(base.shape[0], -1, self.B.shape[1])  # pyvene flattens the positions
                return (x - (x @ self.B.T) @ self.B).view_as(base)

        cfg = pv.IntervenableConfig(representations=[{
            "layer": site_layer, "component": "block_output",
            "intervention": ProjectOut(basis.to(next(model.parameters())), embed_dim=basis.shape[1])}])
        pvm = pv.IntervenableModel(cfg, model)
        pvm.disable_model_gradients()

        def pyvene_run(ids):
            return pvm({"input_ids": ids}, unit_locations=None)[1].logits

        methods["pyvene " + pv.__version__ if hasattr(pv, "__version__") else "pyvene"] = pyvene_run
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        print(f"pyvene unavailable: {type(e).__name__}: {e}")
    try:
        import nnsight
        nm = nnsight.NNsight(model)
        b = basis.to(next(model.parameters()))

        def nnsight_run(ids):
            with nm.trace(ids):
                h = nm.model.layers[site_layer].output
                nm.model.layers[site_layer].output = h - (h @ b.T) @ b
                out = nm.output.logits.save()
            return out

        methods[f"nnsight {nnsight.__version__}"] = nnsight_run
    except Exception as e:  # noqa: BLE001
        print(f"nnsight unavailable: {type(e).__name__}: {e}")
    return methods, handle


def micro(model, layer: int, basis: torch.Tensor, batch: int, seq: int, reps: int = 50) -> dict:
    """Costs that do not depend on the forward pass, timed alone (min over `reps`, robust to load):
    the edit applied to one ``[batch, seq, d_model]`` activation, and attaching + removing the hooks."""
    site = f"blocks.{layer}.hook_resid_post"
    edit = ZeroAblate(Subspace(basis, orthonormalize=False))
    x = torch.randn(batch, seq, basis.shape[1], device=next(model.parameters()).device)
    from interp.edits import EditContext
    ctx = EditContext(torch.arange(batch)[:, None].expand(batch, seq), torch.arange(seq)[None].expand(batch, seq), None)

    def best(fn):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    iv = intervene(model, {site: edit})
    return {"edit_on_one_activation_s": best(lambda: edit(x, ctx)),
            "attach_and_remove_s": best(lambda: (iv.attach(), iv.remove())), "reps": reps}


def _hooks(model) -> int:
    """Forward hooks and pre-hooks on the model's modules (0 between calls: no method's edit left behind)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def time_shape(methods, ids, rounds: int, sync, model, handle) -> dict:
    """Interleaved rounds over every method for one input shape; per-method medians and ratios.

    ``handle`` (the attached-handle method's intervention) is attached just before that method's timed call and
    removed just after, outside the timing: left attached, it edited the bare model's (and the peers') forward
    in the rounds that came after it. Every call starts from a model with no hooks, checked."""

    def call(n):
        if n == "interp (attached handle)":
            handle.attach()
        try:
            return methods[n](ids)
        finally:
            if n == "interp (attached handle)":
                handle.remove()

    with torch.inference_mode():
        ref_logits = call("interp")
        max_diff = {n: float((call(n) - ref_logits).abs().max()) for n in methods}  # also warms up
        times: dict[str, list[float]] = {n: [] for n in methods}
        names = list(methods)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                if _hooks(model):
                    raise RuntimeError(f"round {r}: the model holds hooks before {n!r} runs")
                attached = n == "interp (attached handle)"
                if attached:
                    handle.attach()
                sync()
                t = time.perf_counter()
                methods[n](ids)
                sync()
                times[n].append(time.perf_counter() - t)
                if attached:
                    handle.remove()
            if rounds <= 30 or (r + 1) % 25 == 0:
                print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.1f}ms" for n in names),
                      flush=True)
    bare, ours = times["bare"], times["interp"]
    rows = []
    for n in names:
        ratios = [t / b for t, b in zip(times[n], bare)]
        row = {"method": n, "median_s": statistics.median(times[n]), "min_s": min(times[n]),
               "median_ratio_to_bare": statistics.median(ratios),
               "min_time_ratio_to_bare": min(times[n]) / min(bare),
               "tokens_per_s": ids.numel() / statistics.median(times[n]),
               "max_abs_logit_diff_vs_interp": max_diff[n], "times_s": times[n]}
        if n not in ("bare", "interp", "interp (attached handle)"):
            wins = sum(o < t for o, t in zip(ours, times[n]))
            row["interp_faster_rounds"] = wins
            row["sign_test_p"] = sign_test(wins, rounds)
            row["median_ratio_to_interp"] = statistics.median(t / o for t, o in zip(times[n], ours))
        rows.append(row)
    print(f"\n{'method':28s} {'median ms':>10s} {'ratio to bare':>14s} {'ratio to interp':>16s} "
          f"{'interp faster':>14s} {'sign p':>9s} {'max |dlogit|':>13s}")
    for r in rows:
        print(f"{r['method']:28s} {r['median_s'] * 1e3:10.2f} {r['median_ratio_to_bare']:14.3f} "
              f"{r.get('median_ratio_to_interp', float('nan')):16.3f} "
              f"""{str(r.get('interp_faster_rounds', ''))
                   + ('/' + str(rounds) if 'interp_faster_rounds' in r else ''):>14s} """
              f"{r.get('sign_test_p', float('nan')):9.2g} {r['max_abs_logit_diff_vs_interp']:13.2e}")
    return {"batch": ids.shape[0], "seq": ids.shape[1], "rounds": rounds, "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",")],
                    default=[(8, 128), (1, 128), (1, 16)], help="BATCHxSEQ[,BATCHxSEQ...]")
    ap.add_argument("--rounds", type=lambda s: [int(x) for x in s.split(",")], default=[21, 101, 201],
                    help="rounds per shape (one number, or one per shape)")
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--model", default="smollm2-135m", help="model name or folder")
    ap.add_argument("--quick", action="store_true", help="shape 1x16, 3 rounds, the last layer at most: the code "
                    "path only (with a tiny --model)")
    ap.add_argument("--out", default="benchmarks/results/intervene.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.rounds = [(1, 16)], [3]
    rounds = args.rounds * len(args.shapes) if len(args.rounds) == 1 else args.rounds
    if len(rounds) != len(args.shapes):
        ap.error(f"--rounds: give one number or one per shape ({len(args.shapes)}); got {args.rounds}")
    model, tok = load_model(args.model, device=args.device)
    if args.quick:
        args.layer = min(args.layer, model.config.num_hidden_layers - 1)
        args.rank = min(args.rank, model.config.hidden_size // 2)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, args.rank, generator=g))[0].T.contiguous()
    basis = basis.to(device)
    b0, s0 = args.shapes[0]
    with torch.inference_mode():
        mic = micro(model, args.layer, basis, b0, s0)
    print("micro:", mic)
    methods, handle = make_methods(model, args.layer, basis)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shapes = []
    for (batch, seq), n_rounds in zip(args.shapes, rounds):
        print(f"\nshape {batch}x{seq}, {n_rounds} rounds")
        ids = torch.randint(100, len(tok), (batch, seq), generator=g).to(device)
        shapes.append(time_shape(methods, ids, n_rounds, sync, model, handle))
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = {
        "benchmark": "intervene",
        "command": "python benchmarks/intervene.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "quick": args.quick, "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "site": f"blocks.{args.layer}.hook_resid_post", "rank": args.rank,
        "edit": "project out a rank-r subspace at every position",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "load_average_at_end": load, "shapes": shapes, "micro": mic,
        "note": "Rounds interleave the methods (rotated order) and ratios are per round. 'interp' enters and "
                "exits the context manager on every call; 'interp (attached handle)' keeps the hooks attached. "
                "interp_faster_rounds / sign_test_p: paired comparison of 'interp' with each peer over rounds.",
    }
    out = write_json(args.out, result, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
