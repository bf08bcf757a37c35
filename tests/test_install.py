"""An installed skyhedge (`pip install .`, not editable) must still find its templates, modules and
catalog data: checked on a freshly built wheel, and on the installed copy when there is one."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        cwd=build,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stderr[-2000:]}")
    return next(out.glob("skyhedge-*.whl"))


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[;\s]", r.strip().strip("\"'"))[0].lower() for r in requirements if r.strip()}


def test_the_test_extra_brings_the_build_backend_these_tests_build_with():
    """The wheel builds here run without build isolation, with the environment's own setuptools
    and wheel; a venv of Python 3.12 or newer has no setuptools, so after the README's
    `pip install '.[test]'` they failed (`No module named 'setuptools'`) unless the test extra
    brings every requirement of pyproject's `[build-system]`."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")
    extra = _names(cfg["options.extras_require"]["test"].splitlines())
    build = re.search(r"^requires\s*=\s*\[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.M | re.S)
    assert build is not None, "pyproject.toml: no [build-system] requires"
    backend = _names(build.group(1).split(","))
    assert backend and backend <= extra, f"the test extra lacks {sorted(backend - extra)}"


def test_wheel_carries_templates_modules_and_catalog(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for tracked in sorted(p for p in (REPO / "templates").rglob("*") if p.is_file()):
        assert f"skyhedge/_data/templates/{tracked.relative_to(REPO / 'templates')}" in names
    for tracked in sorted(p for p in (REPO / "modules").rglob("*.tf") if p.is_file()):
        assert f"skyhedge/_data/modules/{tracked.relative_to(REPO / 'modules')}" in names
    assert "skyhedge/catalog/data/local.json" in names
    assert "skyhedge/py.typed" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "skyhedge = skyhedge.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_installed_copy_finds_its_data_outside_the_checkout(tmp_path):
    code = (
        "import skyhedge, skyhedge._resources as r, pathlib;"
        "p = pathlib.Path(skyhedge.__file__).resolve();"
        f"print(p.parent.parent == pathlib.Path({str(REPO)!r}));"
        "print(r.templates_dir()); print(r.modules_dir())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    if proc.returncode != 0 and "No module named 'skyhedge'" in proc.stderr:
        pytest.skip("skyhedge is not installed (run `pip install .`)")
    assert proc.returncode == 0, proc.stderr
    from_checkout, templates, modules = proc.stdout.split("\n")[:3]
    if from_checkout == "True":
        pytest.skip("the installed skyhedge is an editable install of this checkout")
    assert "_data" in templates and Path(templates).is_dir() and any(Path(templates).rglob("*.j2"))
    assert Path(modules).is_dir() and any(Path(modules).rglob("*.tf"))


def test_a_wheel_built_from_the_sdist_carries_the_same_data(tmp_path, wheel):
    """`python -m build` (and `pip install skyhedge-*.tar.gz`, what an index serves without a
    wheel) builds the wheel from the sdist, not from the checkout. The sdist held no `templates/`
    nor `modules/`, so that build failed: `error: [Errno 2] No such file or directory: 'templates'`."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for name in ("skyhedge", "templates", "modules"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", ".terraform*"))
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    made = subprocess.run(
        [sys.executable, "-c", hook, str(tmp_path / "sdist")], capture_output=True, text=True, cwd=src
    )
    assert made.returncode == 0, made.stderr[-2000:]
    sdist = tmp_path / "sdist" / made.stdout.strip().splitlines()[-1]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(sdist)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (from_sdist,) = (tmp_path / "wheel").glob("skyhedge-*.whl")

    def data(path: Path) -> set[str]:
        return {n for n in zipfile.ZipFile(path).namelist() if n.startswith("skyhedge/_data/")}

    assert data(from_sdist) == data(wheel) and any(n.endswith("nginx.conf.j2") for n in data(wheel))
