"""Every command that reads an SAE refuses every checkpoint that `saes.read` refuses: one line on
stderr, exit code 1, no traceback, and no file of the checkpoint changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_util import one_error_line

from interp.cli import main
from tests.saes.sae_testdata import BAD_CHECKPOINT_MESSAGES, BAD_CHECKPOINTS

COMMANDS = {
    "sae eval": lambda sae, tmp: ["sae", "eval", str(sae), "--model", str(tmp / "no-model"), "--windows", "0"],
    "sae publish": lambda sae, tmp: ["sae", "publish", str(sae), "me/x", "--dry-run"],
    "features clusters": lambda sae, tmp: ["features", "clusters", "--sae", str(sae), "--cache", str(tmp / "none"),
                                           "--out", str(tmp / "out")],
    "dashboard sae": lambda sae, tmp: ["dashboard", "sae", str(sae), "--model", str(tmp / "no-model"),
                                       "--out", str(tmp / "dash")],
}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name,build", BAD_CHECKPOINTS, ids=[n for n, _ in BAD_CHECKPOINTS])
def test_every_sae_command_refuses_a_bad_checkpoint(name, build, command, tmp_path, capsys):
    root = tmp_path / "ckpt"
    root.mkdir()
    sae = build(root)
    before = _snapshot(root)
    assert main(COMMANDS[command](sae, tmp_path)) == 1
    err = capsys.readouterr().err
    assert one_error_line(err), err
    assert re.search(BAD_CHECKPOINT_MESSAGES[name], err), (name, err)
    assert _snapshot(root) == before
