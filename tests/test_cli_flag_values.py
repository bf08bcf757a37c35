"""Flag values a script may pass by mistake: refused in one `error:` line naming the flag, exit 1,
before anything runs (never a traceback half-way through the command)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skyhedge.cli import main

SPEC = """\
name: flags
placement: {clouds: [local]}
run: {command: "true"}
"""


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_logs_follow_interval_must_be_a_finite_number(tmp_path, value):
    """`--interval nan` passed click's range check (nan compares false), printed the log, then
    died in `time.sleep` with a traceback; now it is refused as every other float flag is."""
    spec = tmp_path / "service.yaml"
    spec.write_text(SPEC, encoding="utf-8")
    result = CliRunner().invoke(
        main, ["logs", str(spec), "r-0001", "-f", "--interval", value], prog_name="skyhedge"
    )
    assert result.exit_code == 1, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: Invalid value for '--interval'") and "Traceback" not in result.output
