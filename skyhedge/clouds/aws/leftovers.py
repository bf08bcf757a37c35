"""EC2 instances tagged for a service that no Terraform state holds (`skyhedge.apply` finds
this file per cloud: `instances_left`).

An apply killed between EC2's create call and Terraform saving its state leaves such an
instance: Terraform's state lacks it, skyhedge's records the replica as never created. The next
apply launched the replica again, `destroy` said it was "never created", and the instance billed
on, unseen (only a watcher warned, after 10 minutes). skyhedge does not terminate what it never
recorded: it names them, with the command that does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from skyhedge.clouds.aws.events import running_instances


@dataclass(frozen=True)
class InstancesLeft:
    """Instances tagged for the service that run in `region` though no live replica owns them
    (`instances`: instance ID and replica tag), or why the region could not be listed (`error`)."""

    region: str
    instances: tuple[tuple[str, str | None], ...] = ()
    error: str | None = None

    def warning(self, service: str, what: str = "") -> str:
        if self.error is not None:
            return f"aws {self.region}: could not look for instances of {service} left running ({self.error})"
        ids = [iid for iid, _ in self.instances]
        named = ", ".join(f"{iid} ({rid or 'no replica tag'})" for iid, rid in self.instances)
        return (
            f"aws {self.region}: {len(ids)} instance(s) tagged for {service} still run, in no Terraform "
            f"state (an apply killed before Terraform saved them?): {named}; {what}they bill until "
            f"terminated: aws ec2 terminate-instances --region {self.region} --instance-ids {' '.join(ids)}"
        )


def instances_left(
    service: str,
    regions: Iterable[str],
    *,
    replicas: Iterable[str] | None = None,
    owned: Iterable[str] = (),
    again: str = "",
) -> list[str]:
    """`warning:` lines, one per region holding running instances tagged for `service`
    (`replicas`: only those tagged for these replica IDs) that no live replica owns (`owned`:
    instance IDs live replicas do own, left out); `again` is said of them before the command
    that terminates them. A region that cannot be listed (no credentials, no endpoint) is a
    warning too, never the command's failure."""
    mine = None if replicas is None else set(replicas)
    skip = set(owned)
    out: list[str] = []
    for region in sorted(set(regions)):
        try:
            found = running_instances(service, region)
        except Exception as exc:  # noqa: BLE001 - any failure to list is a warning, never the command's
            out.append(InstancesLeft(region, error=f"{exc.__class__.__name__}: {exc}").warning(service))
            continue
        left = tuple((iid, rid) for iid, rid in found if (mine is None or rid in mine) and iid not in skip)
        if left:
            out.append(InstancesLeft(region, left).warning(service, again))
    return out
