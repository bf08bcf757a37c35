"""A watcher (or `up`) that outlives its install: `pip install -e .` over a wheel deletes the
wheel's copy, with the templates and modules the watcher renders from; a deleted checkout after a
wheel replaced its editable install does the same. Its next apply says what happened and what to
do, not "broken install?" of an install that works."""

from __future__ import annotations

import os

import pytest

from skyhedge import _resources
from skyhedge.errors import RenderError


def test_a_package_gone_since_the_process_started_asks_for_a_restart(tmp_path, monkeypatch):
    gone = tmp_path / "site-packages" / "skyhedge"  # what the wheel held, removed by pip
    monkeypatch.setattr(_resources, "_PACKAGE", gone)
    with pytest.raises(RenderError) as err:
        _resources.templates_dir()
    assert str(err.value) == (
        f"skyhedge is no longer installed in {gone}, where this process (pid {os.getpid()}) "
        "loaded it from: it was reinstalled elsewhere since it started; restart it"
    )


def test_an_install_without_its_data_is_still_called_broken(tmp_path, monkeypatch):
    pkg = tmp_path / "site-packages" / "skyhedge"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(_resources, "_PACKAGE", pkg)
    with pytest.raises(RenderError) as err:
        _resources.modules_dir()
    assert str(err.value) == "skyhedge data directory 'modules' not found (broken install?)"
