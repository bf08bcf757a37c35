"""A watcher's spec file moved, renamed or deleted under it: the watcher runs on with the spec it
read, and says so once (and once more when the file is back)."""

from __future__ import annotations

from controller_fakes import LOCAL_SPEC as LOCAL

from skyhedge.controller.runner import Watcher
from skyhedge.spec import load_spec


def test_a_spec_file_moved_away_under_the_watcher_is_said_once_and_its_return_too(tmp_path, write_spec):
    """`git mv service.yaml prod.yaml` under a running watcher: it ran on the spec it had read and
    never took an edit of prod.yaml, without a word in its log or on the dashboard."""
    spec_file = write_spec(LOCAL)
    moved = spec_file.with_name("prod.yaml")
    with Watcher(load_spec(spec_file), tmp_path / "state", spec_path=spec_file, route=False) as w:
        assert w.controller is not None
        w._check_spec()
        spec_file.rename(moved)
        w._check_spec()  # once: an editor between unlink and rename looks the same
        assert list(w.controller.notes) == []
        w._check_spec()
        w._check_spec()
        (gone,) = [n.text for n in w.controller.notes]
        assert gone.startswith(f"spec file {spec_file} is gone (moved, renamed or deleted): running on")
        assert "restart the watcher on the new path" in gone and "\n" not in gone
        moved.rename(spec_file)
        w._check_spec()
        assert [n.text for n in w.controller.notes][1:] == [f"spec file {spec_file} is back"]


def test_a_watcher_that_does_not_reread_its_spec_says_nothing_of_the_file(tmp_path, write_spec):
    spec_file = write_spec(LOCAL)
    with Watcher(
        load_spec(spec_file),
        tmp_path / "state",
        spec_path=spec_file,
        route=False,
        reload_on_change=False,
        reload_on_request=False,
    ) as w:
        assert w.controller is not None
        spec_file.unlink()
        for _ in range(3):
            w._check_spec()
        assert list(w.controller.notes) == []
