"""Build hook: ship the top-level `templates/` and `modules/` inside the package.

They live at the repository root (they are data a GitOps user reads), but an installed skyhedge
must still find them, so the build copies them to `skyhedge/_data/`. `skyhedge._resources`
looks in the checkout first and in `_data` second.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
DATA_DIRS = ("templates", "modules")


class BuildWithData(build_py):
    def run(self) -> None:
        # A build directory left by an earlier build (pip builds in place) would ship modules since
        # deleted from the source: start the package's build copy afresh.
        stale = Path(self.build_lib) / "skyhedge"
        if stale.exists():
            shutil.rmtree(stale)
        super().run()
        for name in DATA_DIRS:
            src = ROOT / name
            dst = Path(self.build_lib) / "skyhedge" / "_data" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".terraform*", "__pycache__"))


setup(cmdclass={"build_py": BuildWithData})
