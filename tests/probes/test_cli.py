"""`interp probe` through its register() hook, on a tiny random Llama saved to disk."""

import argparse
import json

import pytest

from interp.errors import DataError, InputError
from probes.cli import parse_layers, read_rows, register

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _parser():
    ap = argparse.ArgumentParser(prog="interp")
    register(ap.add_subparsers(dest="command"))
    return ap


def test_probe_command_writes_results(tiny_lm, tmp_path, capsys):
    _, _, folder = tiny_lm
    data = tmp_path / "data.jsonl"
    rows = [{"sentence": f"we meet on {DAYS[i % 7]} at noon", "kind": "day", "doc": i} for i in range(12)]
    rows += [{"sentence": "the cat sat on the mat " + "." * (i % 3 + 1), "kind": "cat", "doc": 100 + i} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = _parser().parse_args(["probe", str(data), "--text-col", "sentence", "--label-col", "kind",
                                 "--group-col", "doc", "--model", str(folder), "--layers", "0-2", "--ks", "1,2",
                                 "--test-size", "0.25", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "blocks.2.mlp.hook_post" in out and "best:" in out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["records"]) == 6 and (tmp_path / "out" / "f1_vs_k.png").is_file()


def test_probe_command_reports_bad_input(tiny_lm, tmp_path):
    _, _, folder = tiny_lm
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,1\nworld,0\n")
    args = _parser().parse_args(["probe", str(data), "--label-col", "y", "--model", str(folder)])
    with pytest.raises(DataError, match="no column 'y'"):
        args.func(args)
    args = _parser().parse_args(["probe", str(data), "--model", str(folder), "--layers", "7"])
    with pytest.raises(InputError, match="layers 0..2"):
        args.func(args)


def test_readers_and_layer_specs(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label,g\na b,1,x\nc d,0,y\n")
    assert read_rows(p, "text", "label", "g") == (["a b", "c d"], ["1", "0"], ["x", "y"])
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"\.csv, \.tsv"):
        read_rows(tmp_path / "d.parquet", "text", "label")
    assert parse_layers("0,3-5", 30) == [0, 3, 4, 5] and parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(InputError, match="0..29"):
        parse_layers("31", 30)
