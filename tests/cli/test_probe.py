"""`interp probe` through the command line, on a tiny random Llama saved to disk."""

import json

import pytest
from cli_util import one_error_line

from interp.cli import main
from interp.cli.options import parse_layers
from interp.cli.probe import read_rows
from interp.errors import DataError, InputError

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def test_probe_command_writes_results(tiny_dir, tmp_path, capsys):
    folder = tiny_dir
    data = tmp_path / "data.jsonl"
    rows = [{"sentence": f"we meet on {DAYS[i % 7]} at noon", "kind": "day", "doc": i} for i in range(12)]
    rows += [{"sentence": "the cat sat on the mat " + "." * (i % 3 + 1), "kind": "cat", "doc": 100 + i}
             for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["probe", str(data), "--text-col", "sentence", "--label-col", "kind", "--group-col", "doc",
                 "--model", str(folder), "--layers", "0-2", "--n-neurons", "1", "2", "--test-size", "0.25",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "blocks.2.mlp.hook_post" in out and "best:" in out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["records"]) == 6 and (tmp_path / "out" / "f1_vs_k.png").is_file()
    import hashlib  # what was measured is recorded: two runs with other data or pooling are told apart

    run = saved["run"]
    assert run == {"model": str(folder), "data": "data.jsonl",
                   "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "text_col": "sentence",
                   "label_col": "kind", "group_col": "doc", "site": "mlp.hook_post", "layers": [0, 1, 2],
                   "aggregate": "mean", "max_length": 128, "limit": None, "n_rows": 24}


def test_probe_command_reports_bad_input_in_one_line(tiny_dir, tmp_path, capsys):
    folder = tiny_dir
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,1\nworld,0\n")
    assert main(["probe", str(data), "--label-col", "y", "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "no column 'y'" in err and one_error_line(err)
    assert main(["probe", str(data), "--model", str(folder), "--layers", "7"]) == 1
    err = capsys.readouterr().err
    assert "layers 0..2" in err and one_error_line(err)


def test_readers_and_layer_specs(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label,g\na b,1,x\nc d,0,y\n")
    assert read_rows(p, "text", "label", "g") == (["a b", "c d"], ["1", "0"], ["x", "y"])
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"\.csv, \.tsv"):
        read_rows(tmp_path / "d.parquet", "text", "label")
    assert parse_layers("0,3-5", 30) == [0, 3, 4, 5] and parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0-9:3") == [0, 3, 6, 9]
    with pytest.raises(InputError, match="0..29"):
        parse_layers("31", 30)
    with pytest.raises(InputError, match="expected 'all'"):
        parse_layers("4 to 20")


def test_a_renamed_flag_is_refused_with_its_new_name(tmp_path, capsys):
    """The README promised the old flags still worked; argparse refused them without a word about the rename."""
    with pytest.raises(SystemExit):
        main(["probe", str(tmp_path / "d.csv"), "--ks", "4"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --ks 4 (renamed: --ks is now --n-neurons)" in err and one_error_line(err)
