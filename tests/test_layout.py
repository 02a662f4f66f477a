"""The package layout the README describes: libraries below, one command layer above them."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("interp", "saes", "probes")


def _imports(path: Path) -> set[str]:
    """Every module name a file imports (absolute imports; relative ones are not used here)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _library_files():
    for pkg in LIBRARIES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if (ROOT / "interp" / "cli") not in path.parents:
                yield pkg, path


def test_no_library_module_imports_the_command_layer():
    offenders = [str(p.relative_to(ROOT)) for _, p in _library_files()
                 if any(n == "interp.cli" or n.startswith("interp.cli.") for n in _imports(p))]
    assert offenders == []


def test_interp_imports_neither_saes_nor_probes_outside_the_command_layer():
    offenders = [str(p.relative_to(ROOT)) for pkg, p in _library_files() if pkg == "interp"
                 and any(n.split(".")[0] in ("saes", "probes") for n in _imports(p))]
    assert offenders == []


def test_importing_the_libraries_does_not_load_the_command_layer():
    code = "import sys, interp, saes, probes; print(sorted(m for m in sys.modules if m.startswith('interp.cli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_every_command_module_is_registered_one_way():
    from interp.cli import COMMANDS

    helpers = {"__init__", "__main__", "options"}
    modules = {p.stem for p in (ROOT / "interp" / "cli").glob("*.py")} - helpers
    assert set(COMMANDS) == modules
    assert "entry-points" not in (ROOT / "pyproject.toml").read_text()


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_help_has_no_rst_markup_and_every_option_is_explained():
    from interp.cli import build_parser

    for p in _parsers(build_parser()):
        text = p.format_help()
        assert "``" not in text and not re.search(r":(class|func|mod|meth|attr):`", text), p.prog
        for action in p._actions:
            if action.option_strings and action.dest != "help" and not isinstance(action, argparse._VersionAction):
                assert action.help, f"{p.prog} {action.option_strings} has no help text"


def test_version(capsys):
    from interp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"interp \d+\.\d+", capsys.readouterr().out)


def test_sites_lists_every_site_with_its_width(tiny_dir, capsys):
    from interp.cli import main

    assert main(["sites", str(tiny_dir), "--json"]) == 0
    out = capsys.readouterr().out
    listed = __import__("json").loads(out[out.index("{"):])
    widths = listed["sites"]
    assert widths["blocks.0.hook_resid_post"] == 32 and widths["blocks.2.mlp.hook_post"] == 64
    assert len(widths) == 3 * 6 and listed["refused"] == {}


def test_sites_names_each_refused_site_with_its_reason(monkeypatch, capsys):
    """A parallel block has no resid_mid: the listing says so instead of leaving it out silently."""
    from conftest import tiny_model

    import interp.models
    from interp.cli import main

    model = tiny_model("gpt_neox")  # parallel residual
    monkeypatch.setattr(interp.models, "load_model", lambda *a, **k: (model, None))
    assert main(["sites", "tiny-gpt-neox", "--json"]) == 0
    listed = __import__("json").loads(capsys.readouterr().out)
    assert "blocks.0.hook_resid_mid" in listed["refused"] and "blocks.0.hook_resid_mid" not in listed["sites"]
    assert "parallel" in listed["refused"]["blocks.0.hook_resid_mid"]


PROCESS_WORDS = re.compile(r"\b[Ii]ssue #?\d+|\bthe issue'?s?\b|another issue|/work/|/root/|\bsession\b")


def test_the_product_speaks_of_itself_only():
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("interp", "saes", "probes", "experiments", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".toml", ".sh")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if PROCESS_WORDS.search(line)]
    assert hits == []
