"""``interp probe``: sweep sparse probes over the layers of a model for a labelled csv/jsonl file.

    interp probe data.csv --text-col text --label-col label --layers 0-29 --n-neurons 1 2 4 8 16 --out runs/probe

Each row is one example (sequence-level label); activations are pooled over the row's tokens
(``--aggregate mean``, position 0 left out) or read at its last token (``--aggregate last``).
Writes ``results.json``, ``f1_vs_k.png`` and ``top_neurons.png`` to ``--out`` and prints the table.
``results.json`` is :meth:`probes.SweepResult.save`'s content plus ``run``: the model (``model_label``), the data
file's name and SHA-256, its columns, the site kind, layers, ``aggregate``, ``max_length``, ``limit`` and the rows
read, so that two runs that measured different things are told apart.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from interp.atomic import write_json
from interp.cli.options import add_options, dataclass_options, given, parse_layers
from interp.errors import DataError
from interp.models import EMBEDDED
from interp.provenance import file_sha256, model_label

SITE_KINDS = ("mlp.hook_post", "hook_resid_post", "hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "hook_attn_out")


def read_rows(path: str | Path, text_col: str, label_col: str,
              group_col: str | None = None) -> tuple[list, list, list | None]:
    """Texts, labels (and groups) from a .csv/.tsv or .jsonl/.json file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        try:
            lines = [line for line in text.splitlines() if line.strip()]
            rows = json.loads(text) if suffix == ".json" else [json.loads(line) for line in lines]
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON{' lines' if suffix == '.jsonl' else ''}: {e}") from e
    else:
        raise DataError(f"{path}: expected a .csv, .tsv, .jsonl or .json file; got {suffix or 'no suffix'}")
    if not rows:
        raise DataError(f"{path} holds no rows")
    cols = list(rows[0])
    for col in (text_col, label_col) + ((group_col,) if group_col else ()):
        if col not in cols:
            raise DataError(f"{path} has no column {col!r}; its columns are {cols}")
    texts = [str(r[text_col]) for r in rows]
    labels = [r[label_col] for r in rows]
    groups = [r[group_col] for r in rows] if group_col else None
    return texts, labels, groups


def register(subparsers) -> None:
    """Add the ``probe`` command."""
    from probes.sweep import SweepConfig

    p = subparsers.add_parser("probe", help="sweep k-sparse probes over layers for a labelled text file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a .csv/.tsv/.jsonl/.json file with one text and one label per row")
    p.add_argument("--text-col", default="text", help="column holding the text (default: text)")
    p.add_argument("--label-col", default="label", help="column holding the binary label (default: label)")
    p.add_argument("--group-col", default=None, help="column of group ids (document, entity) for the split")
    p.add_argument("--model", default=EMBEDDED, help=f"model name or path (default: {EMBEDDED})")
    p.add_argument("--site", default="mlp.hook_post", choices=SITE_KINDS,
                   help="site in each block (default: mlp.hook_post, the MLP neurons)")
    p.add_argument("--layers", default="all", help="'all', '5', '0,3,7', '2-10' or '0-29:3' (default: all)")
    p.add_argument("--aggregate", default="mean", choices=("mean", "last"), help="pool tokens per row (default: mean)")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens (default: 128)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    p.add_argument("--out", default=None, help="folder for results.json and the plots")
    add_options(p.add_argument_group("sweep options"), dataclass_options(SweepConfig))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``interp probe``; bad input raises an ``InterpError`` (printed as one line by ``interp``)."""
    import dataclasses

    import interp
    from interp.sites import find_blocks
    from probes.data import sequence_dataset
    from probes.sweep import SweepConfig, sweep

    texts, labels, groups = read_rows(args.data, args.text_col, args.label_col, args.group_col)
    if args.limit is not None:
        texts, labels = texts[: args.limit], labels[: args.limit]
        groups = groups[: args.limit] if groups is not None else None
    model, tok = interp.load_model(args.model, device=args.device)
    layers = parse_layers(args.layers, len(find_blocks(model)))
    sites = [f"blocks.{layer}.{args.site}" for layer in layers]
    ds = sequence_dataset(model, tok, texts, labels, sites, aggregate=args.aggregate, groups=groups,
                          max_length=args.max_length, batch_size=args.batch_size)
    split_groups = ds.groups if groups is not None else None
    config = SweepConfig(**given(args, [f.name for f in dataclasses.fields(SweepConfig)]))
    result = sweep(ds.acts, ds.labels, groups=split_groups, config=config)
    print(f"{len(texts)} rows, classes {result.classes} (positive: {result.classes[1]!r}), "
          f"{result.n_train} train / {result.n_test} test, method {result.config.method}; test F1:")
    print(result.table("f1"))
    best = result.best()
    print(f"best: {best['site']} n_neurons={best['n_neurons']} F1={best['f1']:.3f} neurons={best['neurons'][:8]}")
    if args.out:
        out = Path(args.out)
        run = {"model": model_label(model), "data": Path(args.data).name, "data_sha256": file_sha256(args.data),
               "text_col": args.text_col, "label_col": args.label_col, "group_col": args.group_col,
               "site": args.site, "layers": layers, "aggregate": args.aggregate, "max_length": args.max_length,
               "limit": args.limit, "n_rows": len(texts)}
        write_json(out / "results.json", {**result.to_dict(), "run": run}, default=str)
        result.plot_f1(out / "f1_vs_k.png")
        result.plot_top_neurons(out / "top_neurons.png")
        print(f"wrote {out / 'results.json'}, {out / 'f1_vs_k.png'}, {out / 'top_neurons.png'}")
    return 0
