"""A user without a home directory (HOME unset and a uid with no passwd entry: a container run
with an arbitrary `--user`, a systemd unit with `DynamicUser=`) still plans, applies and shows
catalogs: there is no user catalog nor ~/.terraformrc to read then, and only the commands that
must write into the home directory say so, in one line."""

from __future__ import annotations

import pwd

import pytest
from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC

from skyhedge.catalog import loader
from skyhedge.cli import main
from skyhedge.engine import CLI_CONFIG_NAME, Terraform


@pytest.fixture
def no_home(monkeypatch):
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("SKYHEDGE_CATALOG_DIR", raising=False)
    monkeypatch.delenv("TF_CLI_CONFIG_FILE", raising=False)

    def unknown_uid(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", unknown_uid)
    loader.clear_cache()
    yield
    loader.clear_cache()


def test_plan_reads_the_bundled_catalog_without_a_home_directory(no_home, write_spec, tmp_path):
    """It used to end in a traceback: `RuntimeError: Could not determine home directory.`"""
    spec = write_spec(LOCAL_SPEC)
    result = CliRunner().invoke(main, ["plan", str(spec), "--state-dir", str(tmp_path / "st")])
    assert result.exit_code == 0, result.output
    assert "Plan: 3 to create" in result.output


def test_catalog_show_without_a_home_directory_shows_the_bundled_catalog(no_home):
    result = CliRunner().invoke(main, ["catalog", "show", "--cloud", "local"])
    assert result.exit_code == 0, result.output
    assert str(loader.bundled_path("local")) in result.output.replace("\n", "")


def test_catalog_refresh_without_a_home_directory_says_where_to_write_in_one_line(no_home):
    result = CliRunner().invoke(main, ["catalog", "refresh", "--cloud", "aws"])
    assert result.exit_code == 1
    assert result.output.startswith("error: no home directory for the user catalog (HOME is unset")
    assert result.output.rstrip("\n").endswith("set HOME or $SKYHEDGE_CATALOG_DIR")
    assert result.output.count("\n") == 1


def test_terraform_gets_skyhedges_empty_cli_config_without_a_home_directory(no_home, tmp_path):
    """`apply` used to stop at `error: local/local: RuntimeError: Could not determine home directory.`"""
    env = Terraform(home=tmp_path / "tf").environment()
    assert env["TF_CLI_CONFIG_FILE"] == str(tmp_path / "tf" / CLI_CONFIG_NAME)


@pytest.mark.parametrize(
    ("edit", "field", "value"),
    [
        (
            lambda t: t.replace("service: {", "service: {tls: {certfile: ~/c.pem, keyfile: k.pem}, "),
            "service.tls.certfile",
            "~/c.pem",
        ),
        (
            lambda t: t + "terraform: {backend: local, config: {path: ~/tfstate}}\n",
            "terraform.config.path",
            "~/tfstate",
        ),
        (
            lambda t: t.replace('run: {command: "true"}', 'run: {command: "true", workdir: ~/srv}'),
            "run.workdir",
            "~/srv",
        ),
    ],
    ids=["tls", "backend-path", "workdir"],
)
def test_a_tilde_path_in_the_spec_without_a_home_directory_is_one_line(
    no_home, write_spec, edit, field, value
):
    """The spec's paths (`service.tls`'s files, a local backend's `terraform.config.path`,
    `run.workdir`) expand `~`: without a home directory that ended in a traceback
    (`RuntimeError: Could not determine home directory.`) instead of a line naming the field."""
    spec = write_spec(edit(LOCAL_SPEC))
    result = CliRunner().invoke(main, ["plan", str(spec)])
    assert result.exit_code == 1
    assert result.output == (
        f"error: {spec}: {field}: '{value}' starts with '~' but there is no home directory "
        "(HOME is unset): give a full path\n"
    )
