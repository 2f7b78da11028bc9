"""A non-editable wheel installs every module of the source tree under fxcompress (passes/ and models/ as
fxcompress.passes and fxcompress.models), and no generic top-level names."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    files = {f"fxcompress/{p.relative_to(ROOT / 'fxcompress')}" for p in (ROOT / "fxcompress").rglob("*.py")}
    for folder in ("passes", "models"):
        files |= {f"fxcompress/{folder}/{p.name}" for p in (ROOT / folder).glob("*.py")}
    return files


def test_wheel_installs_every_module_only_under_fxcompress(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools' build/ folder in the checkout could carry modules since deleted
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "fxcompress", "passes", "models"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("fxcompress-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"fxcompress"}
    missing = _source_modules() - names
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {sorted(missing)}"
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import fxcompress, fxcompress.passes.int8, fxcompress.models.zoo, fxcompress.checker.parity; "
        "from fxcompress.recipe.registry import available_passes; assert 'int8' in available_passes(); "
        "print(fxcompress.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site))
