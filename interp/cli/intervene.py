"""``interp intervene SPEC``: run a declarative intervention experiment (:mod:`interp.runner`; the spec format:
:mod:`interp.intervene_spec`).

    interp intervene spec.yaml --out runs/friday     # writes results.csv + summary.json
"""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("intervene", help="run edits from a YAML/JSON spec and write a results table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="YAML or JSON spec file (model, prompts or dataset, site, subspace, edits, "
                                "positions, metric, out)")
    p.add_argument("--out", default=None, help="output folder (overrides the spec's 'out')")
    p.add_argument("--device", default=None, help="device for the model (overrides the spec)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (overrides the spec)")
    p.set_defaults(func=run)


def run(args) -> int:
    from interp.intervene_spec import load_spec
    from interp.runner import run_spec, write_result

    spec = load_spec(args.spec, out=args.out, device=args.device, batch_size=args.batch_size)
    result = run_spec(spec)
    out = write_result(result, spec.out)
    print(json.dumps(result.summary["mean"], indent=2))
    print(f"wrote {out / 'results.csv'} and {out / 'summary.json'}")
    return 0
