"""The wheel carries the built-in studies and search spaces (package data), so a plain
`pip install autoprune` (not `-e`) can run `autoprune search` from any folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import autoprune
from autoprune.cli import main
from autoprune.paths import SPACES_DIR, STUDIES_DIR

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(autoprune.__file__).resolve().parent


def test_builtin_files_are_inside_the_package():
    assert STUDIES_DIR.is_relative_to(PACKAGE) and SPACES_DIR.is_relative_to(PACKAGE)
    assert (STUDIES_DIR / "digits-lenet.yaml").is_file()
    assert (SPACES_DIR / "default.yaml").is_file()


def test_wheel_contains_every_study_and_space(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "autoprune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("autoprune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"autoprune/{p.relative_to(PACKAGE).as_posix()}"
                for folder in (STUDIES_DIR, SPACES_DIR) for p in folder.glob("*.yaml")}
    assert len(expected) >= 10 and expected <= names, sorted(expected - names)


def test_studies_show_prints_one_study_as_written(capsys):
    assert main(["studies", "--show", "digits-lenet"]) == 0
    assert capsys.readouterr().out == (STUDIES_DIR / "digits-lenet.yaml").read_text()
    assert main(["studies", "--show", "no-such-study"]) == 2
    err = capsys.readouterr().err
    assert "unknown study" in err and len(err.strip().splitlines()) == 1
