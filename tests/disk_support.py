"""A small file system to fill, for tests of what skyhedge does when the disk is full.

A tmpfs needs `mount`, which only root may run (and not in every sandbox): where it is refused
the test is skipped, saying why. Every mount is undone by its fixture's finalizer, also when
the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"
PAGE = 4096


@contextlib.contextmanager
def small_fs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (made if missing) for the block's duration; skips
    the test where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(where: Path, leave: int = 0) -> Path:
    """Fill the file system of `where` with one file, then give `leave` bytes (whole pages) back;
    returns the file (remove it to free the space)."""
    filler = where / FILLER
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):  # ENOSPC: full
        while True:
            fh.write(b"\0" * PAGE)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler
