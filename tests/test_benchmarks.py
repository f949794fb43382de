"""Every benchmark script still imports what it uses and parses its arguments: a refactor that breaks one fails here.

The scripts themselves take minutes to hours (their figures are in BENCHMARKS.md); these checks take seconds.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def test_there_are_benchmarks_to_check():
    """Catches: the folder moved or renamed, which would make the checks below pass on nothing."""
    assert {p.stem for p in SCRIPTS} >= {"real_sample", "similarity", "speed", "wsi", "cache", "serve"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_a_benchmark_imports_every_name_it_uses(script, monkeypatch):
    """Catches: a function a benchmark imports from smse renamed, moved or made private."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the module's top level only: main() runs under __main__
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_a_benchmark_parses_its_arguments(script, tmp_path):
    """Catches: a script that fails before its first measurement (bad argument set-up, import at main)."""
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "--help" in done.stdout


def test_benchmarks_use_only_the_stated_surface():
    """Catches: a benchmark importing an internal (a name outside its module's ``__all__``), which a refactor may
    rename without a word."""
    import ast

    outside = []
    for script in [*SCRIPTS, BENCHMARKS / "_common.py"]:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "smse":
                stated = set(importlib.import_module(node.module).__all__)
                outside += [f"{script.name}: {node.module}.{a.name}" for a in node.names if a.name not in stated]
    assert not outside, outside
