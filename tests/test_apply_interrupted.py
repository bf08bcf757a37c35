"""A Ctrl-C during `apply` or `destroy`: the terminal sends it to Terraform too, which stops where
it was, and the state keeps what was done. The command says so in one line, with the command
that finishes the job, and exits 130 (as a shell reports a Ctrl-C'd command)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC as LOCAL

import skyhedge.cli.apply as cli_apply
from skyhedge.cli import main


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("verb", "target", "finish"),
    [
        (
            "apply",
            "apply_service",
            "what it launched is recorded): `skyhedge apply {spec} --state-dir {sdir}` finishes it, "
            "`skyhedge destroy {spec} --state-dir {sdir}` removes it.",
        ),
        (
            "destroy",
            "destroy_service",
            "what it destroyed is recorded): `skyhedge destroy {spec} --state-dir {sdir}` finishes it.",
        ),
    ],
)
def test_a_ctrl_c_says_what_finishes_the_job_and_exits_130(
    tmp_path, write_spec, monkeypatch, verb, target, finish
):
    """Before, a Ctrl-C mid-apply printed each replica's "create failed" (read as a Terraform
    failure), then click's bare "Aborted!", exit 1; mid-destroy, "Aborted!" only."""
    spec = write_spec(LOCAL)
    sdir = tmp_path / "state"
    monkeypatch.setattr(cli_apply, target, _interrupt)
    result = CliRunner().invoke(main, [verb, str(spec), "--state-dir", str(sdir), "--auto-approve"])
    assert result.exit_code == 130, result.output
    (line,) = result.output.splitlines()
    assert line == (
        f"error: {verb} interrupted by Ctrl-C (Terraform stopped where it was; "
        + finish.format(spec=spec, sdir=sdir)
    )
