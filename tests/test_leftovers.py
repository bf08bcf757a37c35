"""Finding a cloud's leftovers check (`cloud_leftovers`)."""

from __future__ import annotations

import importlib

from skyhedge import leftovers


def test_a_cloud_without_a_leftovers_check_is_looked_for_once(monkeypatch):
    """A pass asks once per replica found gone, 1,000 times when a zone holding them all is
    preempted: a module that does not exist is searched for afresh at every import (0.1 ms)."""
    tried = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name: tried.append(name) or real(name))
    monkeypatch.setattr(leftovers, "_WITHOUT_LEFTOVERS", set(), raising=False)  # (none found yet)
    assert [leftovers.cloud_leftovers("local") for _ in range(100)] == [None] * 100
    assert tried == ["skyhedge.clouds.local.leftovers"]
    assert leftovers.cloud_leftovers("aws") is real("skyhedge.clouds.aws.leftovers")
