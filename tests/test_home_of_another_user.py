"""A user whose HOME, XDG_CACHE_HOME or TF_CLI_CONFIG_FILE still names a place it cannot look into
(root's home, kept by `sudo -E -u USER` or `su -m USER`): skyhedge cannot tell whether a user
catalog or a Terraform CLI config is there. Every command that plans used to end in a
`PermissionError` traceback (the catalog), and every apply in a bare `[Errno 13] Permission denied:
'/root/.terraformrc'` naming no variable. Each now says in one line which path it could not look
at and which variable led there.

Where the test runs as root, a directory without permissions stops nobody: the path that cannot be
looked at is then one the kernel refuses to anyone (a name longer than NAME_MAX), which takes the
same way through the code as EACCES does for a user."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC

from skyhedge.catalog import loader
from skyhedge.cli import main
from skyhedge.engine import Terraform
from skyhedge.errors import EngineError

CAUSES = [
    pytest.param("unsearchable", id="unsearchable-dir"),
    pytest.param("too-long", id="name-too-long"),
]


@pytest.fixture(params=CAUSES)
def unlookable(request, tmp_path: Path) -> Iterator[Path]:
    """A directory path whose contents this process cannot stat."""
    if request.param == "too-long":
        yield tmp_path / ("x" * 300)
        return
    if os.geteuid() == 0:
        pytest.skip("root searches a mode-000 directory anyway (the name-too-long case stands in)")
    locked = tmp_path / "root-home"
    locked.mkdir()
    locked.chmod(0o000)
    request.addfinalizer(lambda: locked.chmod(0o700))
    yield locked


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ("SKYHEDGE_CATALOG_DIR", "XDG_CACHE_HOME", "TF_CLI_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    loader.clear_cache()
    yield monkeypatch
    loader.clear_cache()


def one_line(text: str) -> str:
    assert text.count("\n") == 1, text
    return text.rstrip("\n")


@pytest.mark.parametrize("variable", ["HOME", "XDG_CACHE_HOME"])
def test_plan_names_a_catalog_folder_it_cannot_look_into(
    clean_env, unlookable, write_spec, tmp_path, variable
):
    clean_env.setenv(variable, str(unlookable))
    spec = write_spec(LOCAL_SPEC)
    result = CliRunner().invoke(main, ["plan", str(spec), "--state-dir", str(tmp_path / "st")])
    assert result.exit_code == 1, result.output
    line = one_line(result.output)
    assert line.startswith(f"error: {unlookable}/")
    assert "cannot look for a user catalog there" in line
    assert "HOME" in line and "SKYHEDGE_CATALOG_DIR" in line


def test_terraform_names_a_cli_config_variable_it_cannot_read(clean_env, unlookable, tmp_path):
    rc = unlookable / "terraformrc"
    clean_env.setenv("TF_CLI_CONFIG_FILE", str(rc))
    with pytest.raises(EngineError) as err:
        Terraform(home=tmp_path / "tf").environment()
    message = str(err.value)
    assert message.startswith(f"TF_CLI_CONFIG_FILE={rc}: cannot read this Terraform CLI config (")
    assert message.endswith("make it readable or unset the variable")
    assert "\n" not in message


def test_terraform_names_a_terraformrc_in_a_home_it_cannot_read(clean_env, unlookable, tmp_path):
    clean_env.setenv("HOME", str(unlookable))
    with pytest.raises(EngineError) as err:
        Terraform(home=tmp_path / "tf").environment()
    message = str(err.value)
    assert message.startswith(f"{unlookable}/.terraformrc: cannot read this Terraform CLI config (")
    assert "is HOME your home directory?" in message and "\n" not in message


def test_a_missing_cli_config_is_still_no_config(clean_env, tmp_path):
    """What stays: a TF_CLI_CONFIG_FILE naming nothing gets skyhedge's empty config, silently."""
    clean_env.setenv("TF_CLI_CONFIG_FILE", str(tmp_path / "missing.tfrc"))
    clean_env.setenv("HOME", str(tmp_path / "home"))
    env = Terraform(home=tmp_path / "tf").environment()
    assert Path(env["TF_CLI_CONFIG_FILE"]).parent == tmp_path / "tf"
