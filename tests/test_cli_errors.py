"""Bad command lines and unwritable outputs: one `error:` line, exit 1, nothing half-written.

Also: what the README shows of `plan --json` is what `plan --json` prints, and tables written to a
pipe are not cut to 80 columns.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.cli import main

REPO = Path(__file__).resolve().parents[1]
MULTICLOUD = REPO / "examples/llm-multicloud/service.yaml"


def run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="skyhedge")


@pytest.fixture
def trace_csv(tmp_path: Path) -> Path:
    """Two always-available zones for 30 h: enough for one default window."""
    path = tmp_path / "calm.csv"
    rows = ["seconds,us-east-1a,us-east-1b"] + [f"{i * 300},1,1" for i in range(360)]
    path.write_text("\n".join(rows) + "\n")
    return path


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["bogus"], ["No such command 'bogus'", "'skyhedge --help'"]),
        (["--bogus"], ["No such option '--bogus'"]),
        (["routing", "up"], ["Missing argument 'SPEC'", "'skyhedge routing up --help'"]),
        (
            ["catalog", "show", "--cloud"],
            ["'--cloud' requires an argument", "'skyhedge catalog show --help'"],
        ),
        (["simulate", "--trace", "x", "--repeats", "0"], ["'--repeats'", "'skyhedge simulate --help'"]),
        (["render", str(MULTICLOUD), "--out"], ["'--out' requires an argument"]),
        (["up", str(MULTICLOUD), "--speedup", "5"], ["--speedup paces a --market-trace replay"]),
        (["up", str(MULTICLOUD), "--market-start", "12h"], ["--market-start places a --market-trace replay"]),
        (["up", str(MULTICLOUD), "--market-instance-type", "v100_1"], ["--market-instance-type picks a"]),
        (
            ["up", str(MULTICLOUD), "--market-start", "12x"],
            ["'--market-start'", "with s, m, h or d", "'12x'"],
        ),
        (["up", str(MULTICLOUD), "--market-start", "-1h"], ["'--market-start'", "a time of 0 or more"]),
        (["up", str(MULTICLOUD), "--market-start", "nan"], ["'--market-start'", "a time of 0 or more"]),
        (["preempt", str(MULTICLOUD), "--zone", "local-a", "--for", "1e12"], ["'--for'", "0<x<=31622400"]),
        (
            ["preempt", str(MULTICLOUD), "--zone", "local-a", "--clear", "--for", "5"],
            ["--clear gives the capacity back now; it takes no --for", "'skyhedge preempt --help'"],
        ),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, needles):
    """Not click's usage block and exit 2: 2 is `plan --detailed-exitcode`'s "changes present"."""
    one_error_line(run(*args), *needles)


@pytest.mark.parametrize("group", [(), ("catalog",), ("routing",), ("aws",)])
def test_a_bare_group_shows_its_help_and_exits_0(group):
    """Help asked for by giving no command is not an error; and 2 is `plan --detailed-exitcode`'s."""
    result = run(*group)
    assert result.exit_code == 0
    assert "Commands:" in result.stdout


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--seed", "-1", "'--seed': -1 is not in the range"),
        ("--seed", str(2**32), "'--seed'"),
        ("--cold-start", "nan", "'--cold-start': expected a finite number"),
        ("--cold-start", "inf", "'--cold-start': expected a finite number"),
        ("--ondemand-cost-ratio", "inf", "'--ondemand-cost-ratio': expected a finite number"),
        ("--availability-target", "nan", "'--availability-target': expected a finite number"),
        ("--availability-target", "0.3", "'--availability-target': 0.3 is not in the range 0.5<=x<=1"),
    ],
)
def test_simulate_refuses_numbers_it_cannot_use(trace_csv, flag, value, needle):
    one_error_line(run("simulate", "--trace", str(trace_csv), "--repeats", "1", flag, value), needle)


def test_a_plot_that_cannot_be_written_fails_before_simulating(trace_csv, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run("simulate", "--trace", str(trace_csv), "--repeats", "1", "--plot", str(blocker / "p.png"))
    one_error_line(result, f"{blocker / 'p.png'}: cannot write the plot", "is not a directory")


@pytest.mark.parametrize("link_to", ["loop", "missing"])
def test_a_plot_under_a_symlink_to_nowhere_fails_before_simulating(trace_csv, tmp_path, link_to):
    link = tmp_path / "link"
    link.symlink_to(link if link_to == "loop" else tmp_path / "missing")
    result = run("simulate", "--trace", str(trace_csv), "--repeats", "1", "--plot", str(link / "p.png"))
    nowhere = f"{link} is a symbolic link to nowhere"
    one_error_line(result, f"{link / 'p.png'}: cannot write the plot", nowhere)


def test_a_plot_into_an_unwritable_directory_is_refused(trace_csv, tmp_path, monkeypatch):
    """Checked with os.access, which the test fakes: CI runs as root, for whom every dir is writable."""
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    result = run("simulate", "--trace", str(trace_csv), "--repeats", "1", "--plot", str(locked / "p.png"))
    one_error_line(result, "cannot write the plot", f"{locked} is not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_plot_where_even_root_cannot_create_a_file_fails_before_simulating(trace_csv, monkeypatch):
    """/proc passes access() for root (CI runs as root) but refuses any new file: the check
    creates one to know, so the run fails before the simulation, not after it. access() is made
    to pass for /proc as it does for root, so the test means the same run by any user (for whom
    access() alone refuses it: `/proc is not writable`)."""
    import skyhedge.cli.simulate as sim_cli

    ran = []
    monkeypatch.setattr(sim_cli, "run_simulation", lambda *a, **k: ran.append(1) or [])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) == Path("/proc") or real_access(p, mode))
    result = run("simulate", "--trace", str(trace_csv), "--repeats", "1", "--plot", "/proc/p.png")
    one_error_line(result, "/proc/p.png: cannot write the plot: /proc: ")
    assert ran == []


def test_the_plot_has_ordinary_permissions(trace_csv, tmp_path):
    png = tmp_path / "p.png"
    result = run(
        "simulate", "--trace", str(trace_csv), "--repeats", "1", "--policy", "spothedge", "--plot", str(png)
    )
    assert result.exit_code == 0, result.output
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(png.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


def test_render_into_a_path_under_a_file_is_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run("render", str(MULTICLOUD), "--out", str(blocker / "tree"))
    one_error_line(result, "cannot write the rendered tree", "is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_rendered_tree_has_ordinary_permissions(tmp_path):
    out = tmp_path / "tree"
    assert run("render", str(MULTICLOUD), "--out", str(out)).exit_code == 0
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700


def test_tables_in_a_pipe_are_not_cut(monkeypatch):
    """CliRunner's output is not a terminal, as a pipe is: rich would assume 80 columns."""
    import skyhedge.cli._app as app
    import skyhedge.cli.catalog as catalog

    monkeypatch.delenv("COLUMNS", raising=False)
    wide = app._console()
    assert wide.width == app.PIPE_WIDTH
    monkeypatch.setattr(catalog, "console", wide)  # the module's own name for it
    result = run("catalog", "show", "--cloud", "aws", "--instance-type", "g6.xlarge")
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert "g6.xlarge" in result.output and "eu-central-1" in result.output


def test_the_readme_plan_json_example_is_real_output():
    """README.md shows two of the replicas and the whole summary of this very command."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"### `plan --json`.*?```json\n(.*?)```", readme, re.S)
    assert block is not None
    shown = json.loads(block.group(1))
    result = run("plan", str(MULTICLOUD), "--json", "--state-dir", "/nonexistent/never-created")
    assert result.exit_code == 0, result.output
    real = json.loads(result.output)
    assert {k: real[k] for k in ("service", "target", "policy", "summary")} == {
        k: shown[k] for k in ("service", "target", "policy", "summary")
    }
    assert shown["replicas"] == [real["replicas"][0], real["replicas"][-1]]


def test_a_destroy_failing_in_one_root_still_says_what_the_others_destroyed(tmp_path, monkeypatch):
    import skyhedge.cli.apply as apply_cli
    from skyhedge.apply import DestroyReport
    from skyhedge.errors import EngineError

    spec = tmp_path / "s.yaml"
    spec.write_text("name: two\nplacement: {clouds: [local]}\nrun: {command: 'true'}\n")
    report = DestroyReport(
        roots=["aws/eu-central-1", "aws/us-west-2"],
        destroyed=["r-0001", "r-0002"],
        errors=[EngineError("terraform destroy failed in aws/us-west-2: Invalid index")],
    )
    monkeypatch.setattr(apply_cli, "destroy_service", lambda *a, **k: report)
    result = run("destroy", str(spec), "--auto-approve", "--state-dir", str(tmp_path / "st"))
    assert result.exit_code == 1
    assert "Destroyed 2 replica(s): r-0001, r-0002." in result.stdout
    assert result.stderr.startswith("error: terraform destroy failed in aws/us-west-2")


def test_what_an_error_quotes_reaches_the_terminal_without_its_escape_sequences(capsys):
    """An error quotes what a cloud or a replica said (an API's error text, an instance's tags,
    Terraform's diagnostics): escape sequences in it would retitle, clear or recolour the
    operator's terminal. They are shown escaped; the detail's own line breaks stay."""
    from skyhedge.cli._app import report_error
    from skyhedge.errors import EngineError

    report_error(EngineError("gcp: HTTP 403: \x1b]0;OWNED\x07denied", stderr="first\n\x1b[2Jsecond\n"))
    err = capsys.readouterr().err
    assert err == "error: gcp: HTTP 403: \\x1b]0;OWNED\\x07denied\nfirst\n\\x1b[2Jsecond\n"


@pytest.mark.parametrize("columns", [None, "80"], ids=["pipe", "COLUMNS=80"])
def test_a_message_off_a_terminal_stays_one_line_however_long(capsys, monkeypatch, columns):
    """`up`'s last words name a command to paste (`skyhedge destroy <spec> --state-dir <dir>
    --auto-approve`): written to a log file or a pipe, rich cut it in two at 240 columns (at 80
    under CI's COLUMNS=80), half a command per line for grep, a log pipeline or a test."""
    from skyhedge.cli._app import _console

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    text = (
        "destroy interrupted by Ctrl-C; `skyhedge destroy "
        + "/a-long-folder" * 30
        + " --auto-approve` finishes it."
    )
    _console().print(text, markup=False, highlight=False)
    assert capsys.readouterr().out == text + "\n"
