"""The README's two commands are what a newcomer runs first: keep them and CI in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(python3 -m venv[^\n]*)\n```", text)


def test_readme_has_the_demo_and_test_commands():
    cmds = readme_commands()
    assert any(c.rstrip().endswith("interp demo") for c in cmds), cmds
    assert any("pytest" in c for c in cmds), cmds


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
    assert "exit 5" in ci or '"$rc" -eq 5' in ci  # pytest's "no tests ran" must not pass silently
