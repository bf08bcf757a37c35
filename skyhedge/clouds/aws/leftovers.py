"""EC2 instances tagged for a service that no Terraform state holds (`skyhedge.leftovers` finds
this file per cloud: `instances_left`).

An apply killed between EC2's create call and Terraform saving its state leaves such an
instance: Terraform's state lacks it, skyhedge's records the replica as never created. The next
apply launched the replica again, `destroy` said it was "never created", and the instance billed
on, unseen (only a watcher warned, after 10 minutes).

What skyhedge's own state launched carries that state's ID (`skyhedge:deployment`, set by the
apply that renders the root): such an instance is terminated, named in one line. Anything else
tagged for the service (a GitOps apply, another state dir of the same service name, an instance
from before the tag) may be someone's live replica: skyhedge names it, with the command that
terminates it, and leaves the choice to the user.

The replicas looked for are those an earlier run recorded and never read back, and those an
apply re-created under their ID (`skyhedge.leftovers.recreated_replicas`: Terraform replaces a
replica whose instance EC2 terminated; an earlier apply killed while doing so left its instance
behind, and the replica, recording the terminated instance, was not "unsaved"), and those a
watcher's event sources found gone (`skyhedge.leftovers.lost_replicas`: a watcher started after such
a run records the replica gone and replaces it under a new ID, re-creating nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skyhedge.clouds.aws.events import Running, running_instances, terminate_instances

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec


def _named(instances: Sequence[tuple[str, str | None]]) -> str:
    return ", ".join(f"{iid} ({rid or 'no replica tag'})" for iid, rid in instances)


@dataclass(frozen=True)
class InstancesLeft:
    """Instances tagged for the service that run in `region` though no live replica owns them
    (`instances`: instance ID and replica tag), or why the region could not be listed (`error`)."""

    region: str
    instances: tuple[tuple[str, str | None], ...] = ()
    error: str | None = None

    def warning(self, service: str, what: str = "", *, unread: bool = False) -> str:
        if self.error is not None:
            return f"aws {self.region}: could not look for instances of {service} left running ({self.error})"
        ids = [iid for iid, _ in self.instances]
        if unread:
            return (
                f"aws {self.region}: {len(ids)} instance(s) tagged for {service} still run that no replica "
                f"owns: {_named(self.instances)}; not terminated: the apply failed there before reading "
                "Terraform's state back, and that state may hold them; the next apply reads back those "
                "it holds, the others bill until terminated: aws ec2 terminate-instances --region "
                f"{self.region} --instance-ids {' '.join(ids)}"
            )
        return (
            f"aws {self.region}: {len(ids)} instance(s) tagged for {service} still run, in no Terraform "
            f"state (an apply killed before Terraform saved them?): {_named(self.instances)}; {what}they "
            f"bill until terminated: aws ec2 terminate-instances --region {self.region} --instance-ids "
            f"{' '.join(ids)}"
        )

    def recorded(self, service: str) -> str:
        """Instances skyhedge read back for replicas (`spare`) that no Terraform state holds now."""
        ids = [iid for iid, _ in self.instances]
        return (
            f"aws {self.region}: {len(ids)} instance(s) of {service} that skyhedge recorded for its replicas "
            f"still run, but Terraform's state no longer holds them (lost, or restored from an older "
            f"copy?) and it launched others in their place: {_named(self.instances)}; not terminated "
            "(they may still serve): once the new replicas are READY, they bill until terminated: aws ec2 "
            f"terminate-instances --region {self.region} --instance-ids {' '.join(ids)}"
        )

    def terminated(self, service: str) -> str:
        return (
            f"aws {self.region}: terminated {len(self.instances)} instance(s) of {service} that an "
            f"interrupted run of this state launched and Terraform never saved: {_named(self.instances)}"
        )


def instances_left(
    service: str,
    regions: Iterable[str],
    *,
    replicas: Iterable[str] | None = None,
    owned: Iterable[str] = (),
    again: str = "",
    deployment: str | None = None,
    unread: bool = False,
    spec: ServiceSpec | None = None,
    spare: Iterable[str] = (),
) -> list[str]:
    """`warning:` lines, one per region holding running instances tagged for `service`
    (`replicas`: only those tagged for these replica IDs) that no live replica owns (`owned`:
    instance IDs live replicas do own, left out).

    Those tagged with `deployment` (this state's ID) were launched by an interrupted run of this
    very state: they are terminated, and the line says so. The others are named with the command
    that terminates them; `again` is said of them before it. A region that cannot be listed or
    refuses the termination (no credentials, no endpoint) is a warning too, never the command's
    failure. `unread`: the regions' Terraform state was not read back (their apply failed), so
    an instance there may be one Terraform saved, that no replica owns yet: nothing is
    terminated, and the line says why. `spare`: instance IDs skyhedge read back for a replica
    (an interrupted run's never were): never terminated, named in their own line (Terraform's
    state lost, its replica launched anew: the old instance may still serve). (`spec`: unused;
    EC2 needs the region only, where GCP needs the spec's project.)"""
    mine = None if replicas is None else set(replicas)
    skip = set(owned)
    kept = set(spare)
    out: list[str] = []
    for region in sorted(set(regions)):
        try:
            found = running_instances(service, region)
        except Exception as exc:  # noqa: BLE001 - any failure to list is a warning, never the command's
            out.append(InstancesLeft(region, error=f"{exc.__class__.__name__}: {exc}").warning(service))
            continue
        left = [r for r in found if (mine is None or r.replica in mine) and r.instance_id not in skip]
        if unread:
            if left:
                out.append(InstancesLeft(region, _pairs(left)).warning(service, unread=True))
            continue
        recorded = _pairs(r for r in left if r.instance_id in kept)
        left = [r for r in left if r.instance_id not in kept]
        ours = _pairs(r for r in left if deployment is not None and r.deployment == deployment)
        others = _pairs(r for r in left if deployment is None or r.deployment != deployment)
        if recorded:
            out.append(InstancesLeft(region, recorded).recorded(service))
        if ours:
            try:
                terminate_instances(region, [iid for iid, _ in ours])
            except Exception as exc:  # noqa: BLE001 - as a listing failure: named, with the command
                why = f"terminating them failed ({exc.__class__.__name__}: {exc}); "
                out.append(InstancesLeft(region, ours).warning(service, why))
            else:
                out.append(InstancesLeft(region, ours).terminated(service))
        if others:
            out.append(InstancesLeft(region, others).warning(service, again))
    return out


def _pairs(instances: Iterable[Running]) -> tuple[tuple[str, str | None], ...]:
    return tuple((r.instance_id, r.replica) for r in instances)
