"""The code is ruff-clean and ruff-formatted (``pyproject.toml`` holds the rules): CI runs this with the tests."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff") or str(Path(__import__("sys").executable).parent / "ruff")


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
    if not Path(RUFF).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]' (it is in the test extra)")
    proc = subprocess.run([RUFF, *command], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
