"""A YAML scalar PyYAML matches but cannot build is one `invalid YAML` line, not a traceback.

YAML 1.1 reads `2001-13-45` as a timestamp, and PyYAML then raises a bare ValueError; a wrong
explicit tag (`!!int abc`, `!!bool maybe`) raises ValueError, KeyError or AttributeError; Python
refuses to turn an integer of more than 4300 digits into text (also one written in hex, which
parses, and then crashed the error message); and a lone UTF-16 surrogate (`"\\ud800"`) loads but
crashed `render` writing the tree as UTF-8. Found by an input audit (fuzzing the spec's text).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.errors import SpecError
from skyhedge.spec import load_spec, service_name_in

SPEC = """\
name: echo
placement: {{clouds: [local]}}
run: {{command: "python3 server.py"}}
replica_policy: {{min_replicas: {value}}}
"""


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("2001-13-45", "cannot read '2001-13-45' as !!timestamp (month must be in 1..12)"),
        ("2001-01-01 25:00:00", "as !!timestamp (hour must be in 0..23)"),
        ("!!timestamp soon", "cannot read 'soon' as !!timestamp"),
        ("!!int abc", "cannot read 'abc' as !!int"),
        ("!!float abc", "cannot read 'abc' as !!float"),
        ("!!bool maybe", "cannot read 'maybe' as !!bool"),
        ("9" * 5000, "as !!int (Exceeds the limit (4300"),
        ("0x" + "f" * 5000, "as !!int (Exceeds the limit (4300"),
        ('"\\ud800"', "cannot read '\\ud800' as !!str (a lone UTF-16 surrogate, not UTF-8 text)"),
    ],
)
def test_a_scalar_yaml_cannot_build_is_one_line_naming_its_line(write_spec, value, needle):
    path = write_spec(SPEC.format(value=value))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(f"{path}: invalid YAML: line 4, column 32: "), message
    assert needle in message
    assert "\n" not in message and len(message) < 400
    message.encode("utf-8")  # printable as it is
    assert service_name_in(path) == "echo"  # `status` still finds the service


@pytest.mark.parametrize("command", ["plan", "render", "status"])
def test_the_commands_print_it_in_one_line_and_write_nothing(write_spec, tmp_path, command):
    path = write_spec(SPEC.format(value="2001-13-45"))
    out = tmp_path / "tree"
    args = [command, str(path), "--state-dir", str(tmp_path / "state")]
    result = CliRunner().invoke(main, args + (["--out", str(out)] if command == "render" else []))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(("error: ", "warning: ")) and "2001-13-45" in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "state").exists()


def test_a_valid_date_and_a_surrogate_pair_still_load(write_spec):
    """The guard refuses only what cannot be built: a real date reaches the field check, an
    escaped emoji (a surrogate pair) is one character."""
    with pytest.raises(SpecError, match=r"min_replicas: expected an integer .* got datetime.date"):
        load_spec(write_spec(SPEC.format(value="2001-01-02")))
    spec = load_spec(
        write_spec('name: echo\nplacement: {clouds: [local]}\nrun: {command: "echo \\U0001F600"}\n')
    )
    assert spec.run.command == "echo \U0001f600"
