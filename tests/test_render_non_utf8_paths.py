"""Linux file names are bytes: a state dir or working directory may hold bytes outside UTF-8.
Terraform reads its inputs as UTF-8, so such a path cannot reach a local root: `render` and
`apply` say so in one `error:` line naming the root and the input (they died with a
UnicodeEncodeError traceback), and write nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from local_support import free_base_port, spec_dict

from skyhedge.cli import main

LATIN1 = os.fsdecode(b"caf\xe9")  # 'caf\udce9': undecodable byte kept as a surrogate escape


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "service.yaml"
    data = spec_dict("bytes", free_base_port(4), replicas=1, command="sleep 60")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: local/local: ")
    for needle in needles:
        assert needle in line, line
    return line


def run(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="skyhedge")


def test_render_with_a_state_dir_not_in_utf8_names_it(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state, out = tmp_path / f"state-{LATIN1}", tmp_path / "tree"
    result = run("render", str(spec), "--state-dir", str(state), "--out", str(out))
    one_error_line(result, "runtime_dir", "b'", "\\xe9", "not UTF-8")
    assert not out.exists() and not state.exists()


def test_apply_with_a_state_dir_not_in_utf8_launches_nothing(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / f"state-{LATIN1}"
    result = run("apply", str(spec), "--state-dir", str(state), "--no-routing", "--auto-approve")
    one_error_line(result, "runtime_dir", "not UTF-8")
    assert not (state / "state.json").exists()


def test_render_from_a_working_directory_not_in_utf8_names_it(spec, tmp_path, monkeypatch):
    cwd = tmp_path / LATIN1
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = run("render", str(spec), "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "t"))
    one_error_line(result, "run.workdir", "not UTF-8")
