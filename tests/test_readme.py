"""The README is a guide that cannot drift: its Python snippets run as written, its targets table is the registry's,
and it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fxcompress.export.targets import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_is_a_short_guide():
    assert len(README.read_text().splitlines()) <= 200


def test_the_targets_table_is_generated_from_the_registry():
    text = README.read_text()
    table = text.split("<!-- targets table: begin -->\n")[1].split("<!-- targets table: end -->")[0]
    assert table.strip() == markdown_table().strip(), (
        "regenerate it: python -c 'from fxcompress.export.targets import markdown_table; print(markdown_table())'"
    )


@pytest.mark.slow
def test_the_python_snippets_run_in_order(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "True CPUExecutionProvider" in out and "of the fp32 bytes" in out
