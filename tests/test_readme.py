"""The README's Python example runs as written, on a small synthetic set in place of the demo's."""

import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(after: str) -> str:
    text = README.read_text()
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(synth_data, tmp_path, monkeypatch, capsys):
    code = python_block("<!-- the block below runs as a test")
    shutil.copytree(synth_data, tmp_path / "smse-demo" / "data")  # the demo's data, smaller
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "patient-level accuracy" in out
    ranks = [line.split()[0] for line in out.splitlines()[1:]]
    assert ranks == ["1", "2", "3", "4", "5"]
    assert (tmp_path / "runs" / "notebook" / "best.safetensors").exists()
