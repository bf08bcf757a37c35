"""`skyhedge preempt` given the state dir of another service (a pasted `--state-dir`): refused
before it marks a zone or kills anything, as `plan`, `status`, `routing` and `destroy` refuse it."""

from __future__ import annotations

from click.testing import CliRunner
from controller_fakes import LOCAL_SPEC as LOCAL

from skyhedge.cli import main
from skyhedge.clouds.local import capacity, runtime_dir
from skyhedge.state import ServiceState, save_state


def test_preempt_refuses_the_state_dir_of_another_service(tmp_path, write_spec):
    """It used to go ahead: `skyhedge preempt b.yaml --state-dir .skyhedge/svc-a --zone local-c`
    killed svc-a's spot replicas in local-c and marked the zone out of capacity for svc-a."""
    spec = write_spec(LOCAL)  # service "svc"
    sdir = tmp_path / "other-state"
    save_state(sdir, ServiceState(service="other"))
    result = CliRunner().invoke(
        main, ["preempt", str(spec), "--state-dir", str(sdir), "--zone", "local-b", "--for", "60"]
    )
    assert result.exit_code == 1
    assert result.output == f"error: {sdir / 'state.json'}: holds service 'other', not 'svc'\n"
    assert not capacity.capacity_path(runtime_dir(sdir)).exists()
