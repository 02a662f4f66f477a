"""Every case of the bad-input corpus (tests/bad_inputs.py): a command gives exactly one error line on
stderr and a non-zero exit, a library call raises the package's exception with a one-line message;
no traceback, every file that existed before is byte-identical after, and no temporary file is left."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DOCS, tiny_cache

from interp.cli import main
from interp.errors import InterpError
from interp.folders import TMP_PREFIX
from tests.bad_inputs import SITE, cases

CASES = cases()
_BAR = re.compile(r"\d+%\||\[\d+:\d+(<|,)|^\s*$")  # tqdm: "40%|####", "[00:01<00:02", "[00:00, ?"


@pytest.fixture(scope="session")
def env(tiny_dir, text_file, tmp_path_factory):
    cache = tiny_cache(tmp_path_factory.mktemp("bad-input-cache") / "cache", [SITE], 600, shard_tokens=200,
                       docs=DOCS[:40])
    return SimpleNamespace(model=Path(tiny_dir), cache=cache, text=Path(text_file))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def error_lines(err: str) -> list[str]:
    """Lines of stderr that are not progress bars (tqdm redraws with carriage returns)."""
    return [line for line in re.split(r"[\r\n]", err) if not _BAR.search(line)]


def test_the_corpus_is_large_and_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) and len(names) >= 60
    kinds = {n.split("-")[0] for n in names}
    assert {"capture", "sae", "spec", "cache", "tensor", "checkpoint"} <= kinds


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(case, env, tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    made = case.build(work, env)
    capsys.readouterr()  # what building the case printed
    before = snapshot(work)
    with case.during(work) if case.during else contextlib.nullcontext():
        if isinstance(made, list):
            code = main(made)
        else:
            with pytest.raises(InterpError) as raised:
                made()
    out, err = capsys.readouterr()
    if isinstance(made, list):
        lines = error_lines(err)
        assert code != 0, (out, err)
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("interp ") and ": error: " in lines[0], err
        assert re.search(case.expect, lines[0]), lines[0]
    else:
        message = str(raised.value)
        assert message and "\n" not in message.strip(), message
        assert re.search(case.expect, message), message
    after = snapshot(work)
    for name, data in before.items():
        assert after.get(name) == data, f"{name} changed"
    assert not [p for p in work.rglob(f"{TMP_PREFIX}*")], "temporary files left"
