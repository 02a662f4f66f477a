"""Overhead of an active subspace edit on a forward pass: interp vs the bare model, pyvene and nnsight.

The same edit everywhere: project a rank-r subspace out of ``blocks.L.hook_resid_post`` at every
position (``x - (x @ B.T) @ B``), on the embedded SmolLM2-135M. Each method's logits are checked
against interp's before timing. Rounds interleave the methods (order rotated each round) so that
load from other jobs hits them alike; we report the median time per forward and the median of the
per-round ratios to the bare forward.

    python benchmarks/intervene.py                   # writes benchmarks/results/intervene.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from interp import load_model
from interp.edits import ZeroAblate
from interp.intervene import intervene
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

    def interp_handle(ids):  # hooks attached once, kept across calls
        handle.attach()
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results/intervene.json")
    ap.add_argument("--micro-only", action="store_true",
                    help="only time the edit and the hook attach/remove, and add them to an existing --out JSON")
    args = ap.parse_args(argv)
    model, tok = load_model("smollm2-135m", device=args.device)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, len(tok), (args.batch, args.seq), generator=g).to(device)
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, args.rank, generator=g))[0].T.contiguous()
    with torch.inference_mode():
        mic = micro(model, args.layer, basis, args.batch, args.seq)
    print("micro:", mic)
    if args.micro_only:
        out = Path(args.out)
        result = json.loads(out.read_text())
        bare_min = next(r["min_s"] for r in result["results"] if r["method"] == "bare")
        result["micro"] = {**mic, "command": "python benchmarks/intervene.py --micro-only",
                           "fraction_of_fastest_bare_forward": (mic["edit_on_one_activation_s"]
                                                                + mic["attach_and_remove_s"]) / bare_min}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
        print(f"updated {out}")
        return 0
    methods, handle = make_methods(model, args.layer, basis)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        ref_logits = methods["interp"](ids)
        max_diff = {n: float((f(ids) - ref_logits).abs().max()) for n, f in methods.items()}  # also warms up
        times: dict[str, list[float]] = {n: [] for n in methods}
        names = list(methods)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                sync()
                t = time.perf_counter()
                methods[n](ids)
                sync()
                times[n].append(time.perf_counter() - t)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
    handle.remove()
    bare = times["bare"]
    rows = []
    for n in names:
        ratios = [t / b for t, b in zip(times[n], bare)]
        rows.append({"method": n, "median_s": statistics.median(times[n]), "min_s": min(times[n]),
                     "median_ratio_to_bare": statistics.median(ratios),
                     "min_time_ratio_to_bare": min(times[n]) / min(bare),
                     "tokens_per_s": args.batch * args.seq / statistics.median(times[n]),
                     "max_abs_logit_diff_vs_interp": max_diff[n], "times_s": times[n]})
    print(f"\n{'method':28s} {'median s':>9s} {'min s':>8s} {'ratio (median of rounds)':>25s} {'ratio (min)':>12s} "
          f"{'max |dlogit|':>13s}")
    for r in rows:
        print(f"{r['method']:28s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['median_ratio_to_bare']:25.3f} "
              f"{r['min_time_ratio_to_bare']:12.3f} {r['max_abs_logit_diff_vs_interp']:13.2e}")
    result = {
        "benchmark": "intervene", "command": "python benchmarks/intervene.py " + " ".join(argv or []),
        "model": "smollm2-135m", "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "batch": args.batch, "seq": args.seq, "site": f"blocks.{args.layer}.hook_resid_post", "rank": args.rank,
        "edit": "project out a rank-r subspace at every position", "rounds": args.rounds,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "results": rows, "micro": mic,
        "note": "Other jobs shared this 2-core CPU machine during the run, so absolute times are noisy; rounds "
                "interleave the methods (rotated order) and ratios are per round. 'interp' enters and exits the "
                "context manager on every call; 'interp (attached handle)' keeps the hooks attached.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
