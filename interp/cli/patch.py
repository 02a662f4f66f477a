"""``interp patch SPEC``: activation and attribution patching sweeps from a spec (see interp.patching.spec).

    interp patch spec.yaml                          # writes exact.csv/.json/.png + summary.json
    interp patch spec.yaml --method both --out runs/days

Options below override the spec's keys of the same name (their defaults are the spec's defaults).
"""

from __future__ import annotations

import argparse

from interp.cli import options as opt

_FLAGS = ("method", "direction", "layers", "batch_size", "device", "out")


def _options() -> list[opt.Option]:
    from interp.patching.spec import PatchSpec

    return [o for o in opt.dataclass_options(PatchSpec) if o.name in _FLAGS]


def register(subparsers) -> None:
    p = subparsers.add_parser("patch", help="activation / attribution patching over sites x positions from a spec",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="YAML or JSON spec file (model, clean and corrupted prompts or pairs or dataset, "
                                "metric, sites, layers, positions, method, out)")
    opt.add_options(p, _options())
    p.set_defaults(func=run)


def run(args) -> int:
    from interp.patching.spec import load_spec, run_spec, write_results

    spec = load_spec(args.spec, **opt.given(args, _FLAGS))
    results = run_spec(spec)
    summary = write_results(results, spec)
    print(f"clean metric {summary['clean_metric']:.4g}, corrupted metric {summary['corrupted_metric']:.4g}")
    for method, rows in summary["top"].items():
        cells = ", ".join(f"{r['row']} @ {r['position']}:{r['token']!r} {r['normalized']:+.2f}" for r in rows[:3])
        print(f"{method} ({summary['seconds'][method]:.1f} s), largest cells (fraction of the gap): {cells}")
    if "agreement" in summary:
        a = summary["agreement"]
        print(f"attribution vs exact: Spearman {a['spearman']:.3f}, Pearson {a['pearson']:.3f} over "
              f"{a['n_cells']} cells")
    names = [f"{m}.csv, {m}.json, {m}.png" for m in results]
    print(f"wrote {', '.join(names)} and summary.json to {spec.out}")
    return 0
