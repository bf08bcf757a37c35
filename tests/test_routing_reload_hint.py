"""`routing reload` with no router running names the command that starts one, as a hint that works
when pasted: the spec path shell-quoted and the `--state-dir` it was given (it said
`skyhedge routing up`, which fails for want of SPEC, and looked in the default state dir)."""

from __future__ import annotations

import shlex

from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC

from skyhedge.cli import main


def test_routing_reload_without_a_router_gives_a_pasteable_routing_up(tmp_path, write_spec):
    spec = write_spec(LOCAL_SPEC, name="my service.yaml")
    sdir = tmp_path / "state dir"
    result = CliRunner().invoke(main, ["routing", "reload", str(spec), "--state-dir", str(sdir)])
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: the router of svc is not running (start it with `")
    hint = line.split("`")[1]
    assert shlex.split(hint) == ["skyhedge", "routing", "up", str(spec), "--state-dir", str(sdir)]
    assert not sdir.exists()  # refused before anything was written
