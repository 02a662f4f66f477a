"""The declarative intervention runner and ``interp intervene SPEC`` (tiny random model, real tokenizer)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from interp.capture import tokenize
from interp.errors import DataError, InputError
from interp.intervene_spec import load_spec, spec_from_dict
from interp.runner import resolve_positions, run_spec, write_result
from interp.subspace import CircleMap, Subspace

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@pytest.fixture(scope="module")
def tok():
    from interp import load_model
    _, tokenizer = load_model("smollm2-135m")
    return tokenizer


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def circle_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    cm = CircleMap(torch.zeros(2), 3.0, {d: 2 * math.pi * i / 7 for i, d in enumerate(DAYS)})
    return Subspace(torch.randn(2, 32, generator=g), coord_map=cm).save(tmp_path / "circle")


def _rows(tmp_path):
    rows = [{"prompt": f"I will see you on {d}. To repeat, I will see you on", "day": d,
             "target": DAYS[(i + 2) % 7]} for i, d in enumerate(DAYS[:5])]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_spec_validation_names_the_problem(tmp_path):
    base = {"model": "m", "site": "blocks.0.hook_resid_post", "prompts": ["a"], "metric": {"type": "kl"},
            "edit": {"type": "project_out"}}
    with pytest.raises(InputError, match="unknown key 'sites'; it takes .*; did you mean 'site'"):
        spec_from_dict({**base, "sites": 1})
    with pytest.raises(InputError, match="type must be one of"):
        spec_from_dict({**base, "edit": {"type": "ablate_everything"}})
    with pytest.raises(InputError, match="metric.type"):
        spec_from_dict({**base, "metric": {"type": "accuracy"}})
    with pytest.raises(InputError, match="missing required key 'site'"):
        spec_from_dict({k: v for k, v in base.items() if k != "site"})
    with pytest.raises(InputError, match="batch_size"):
        spec_from_dict({**base, "batch_size": 0})
    with pytest.raises(DataError, match="text field"):
        spec_from_dict({**{k: v for k, v in base.items() if k != "prompts"},
                        "dataset": {"path": str(_rows(tmp_path)), "text_field": "question"}})


def test_runner_table_rows_and_exact_baseline(model, tok, tmp_path, circle_dir):
    spec = spec_from_dict({
        "model": "tiny", "site": "blocks.0.hook_resid_post", "subspace": str(circle_dir),
        "dataset": {"path": str(_rows(tmp_path)), "text_field": "prompt"},
        "positions": {"token": " {day}"}, "batch_size": 2,
        "edits": [{"name": "rot", "type": "rotate", "to": "{target}"},
                  {"name": "zero_steer", "type": "steer", "alpha": 0.0, "coords": [1.0, 1.0]},
                  {"name": "big_steer", "type": "steer", "alpha": 50.0, "coords": [1.0, 0.0], "positions": "last"},
                  {"name": "ablate", "type": "project_out"}],
        "metric": {"type": "logit_diff", "target": " {target}", "baseline": " {day}"}, "out": str(tmp_path / "o")})
    res = run_spec(spec, model, tok, progress=False)
    assert len(res.table) == 5 * 5
    by = {(r["row"], r["edit"]): r["logit_diff"] for r in res.table}
    for i in range(5):
        assert by[(i, "zero_steer")] == by[(i, "none")]
        assert by[(i, "big_steer")] != by[(i, "none")]
    # the 'none' column is the plain model's logit difference
    r0 = spec.rows[0]
    ids = torch.tensor([tok.encode(r0["text"])])
    with torch.no_grad():
        last = model(ids).logits[0, -1]
    t, b = tok.encode(" " + r0["target"])[0], tok.encode(" " + r0["day"])[0]
    assert by[(0, "none")] == pytest.approx(float(last[t] - last[b]), abs=1e-4)
    out = write_result(res, spec.out)
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 25
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean"]) == {"none", "rot", "zero_steer", "big_steer", "ablate"}


def test_cli_runs_a_yaml_spec(model, tok, tmp_path, circle_dir, monkeypatch):
    import interp.models
    import interp.runner
    monkeypatch.setattr(interp.models, "load_model", lambda name, device=None: (model, tok))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: tiny\nsite: blocks.1.hook_resid_post\nsubspace: circle\n"
        "prompts: ['Today is Monday. Yes, today is', 'Today is Friday. Yes, today is']\n"
        "edit: {type: set_coords, value: Wednesday}\npositions: last\nmetric: {type: kl}\n")
    import argparse

    from interp.cli.intervene import run
    rc = run(argparse.Namespace(spec=str(spec), out=str(tmp_path / "cli_out"), device=None, batch_size=None))
    assert rc == 0
    summary = json.loads((tmp_path / "cli_out" / "summary.json").read_text())
    assert summary["mean"]["none"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert summary["mean"]["set_coords"]["kl"] > 0
    assert load_spec(spec).subspace == str(tmp_path / "circle")


def test_positions_token_missing_is_an_error(model, tok):
    spec = spec_from_dict({"model": "tiny", "site": "blocks.0.hook_resid_post", "prompts": ["Today is Monday."],
                           "positions": {"token": " Friday"}, "edit": {"type": "steer", "vector": [0.0] * 32},
                           "metric": {"type": "top_token"}})
    with pytest.raises(InputError, match=r"row 0 \('Today is Monday\.'\) has no token whose text is exactly ' Friday'"):
        run_spec(spec, model, tok, progress=False)


def test_positions_resolve_through_the_grammar_on_a_bpe_tokenizer(tok):
    rows = [{"text": f"I will see you on {d}. To repeat, I will see you on", "day": d} for d in DAYS[:3]]
    batch = tokenize(tok, [r["text"] for r in rows])
    by_token = resolve_positions({"token": " {day}"}, rows, batch, tok)
    spans = [[r["text"].index(" " + r["day"]), r["text"].index(" " + r["day"]) + len(r["day"]) + 1] for r in rows]
    by_chars = resolve_positions({"chars": spans}, rows, batch, tok)
    for i, r in enumerate(rows):  # reference: where the id the tokenizer gives " {day}" sits
        tid = tok.encode(" " + r["day"], add_special_tokens=False)
        assert len(tid) == 1
        col = int((batch["input_ids"][i] == tid[0]).nonzero()[0, 0])
        assert by_token.value[i].tolist() == [col]
        assert by_chars.value[i].nonzero()[:, 0].tolist() == [col]
    assert resolve_positions("last", rows, batch, tok).kind == "last"


def test_bad_positions_fail_when_the_spec_is_read():
    base = {"model": "m", "site": "blocks.0.hook_resid_post", "prompts": ["a"], "metric": {"type": "kl"},
            "edit": {"type": "project_out"}}
    with pytest.raises(InputError, match=r"spec.positions: positions \{'chars': \[3\]\}"):
        spec_from_dict({**base, "positions": {"chars": [3]}})
    with pytest.raises(InputError, match="edit 'project_out': positions='first'"):
        spec_from_dict({**base, "edit": {"type": "project_out", "positions": "first"}})
