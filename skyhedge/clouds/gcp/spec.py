"""The spec's `gcp:` section (`GcpConfig`), which the GCP cloud owns: its fields, their checks,
which regions `gcp.subnetworks` confines replicas to, what of it makes up a replica's machine, and
the network running replicas keep (skyhedge.clouds.CloudSpecSection)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skyhedge.clouds import CloudConfig, CloudSpecSection
from skyhedge.errors import SpecError
from skyhedge.spec_fields import SpecContext, boolean, cidr_check, matching, private_only, str_list, str_map

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ServiceState

#: A GCP project ID (6-30 of a-z, 0-9, '-', a letter first), optionally domain-scoped
#: (`example.com:my-project`): it goes into API paths, so nothing else may pass.
GCP_PROJECT_RE = re.compile(r"^(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
#: A GCE resource name (RFC 1035), or a path to one (`projects/P/global/networks/N`,
#: `projects/P/regions/R/subnetworks/S`, optionally as a full https self link).
_GCE_NAME = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"
_GCE_PROJECT = r"(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]"
_GCE_LINK = r"(?:https://www\.googleapis\.com/compute/v1/)?projects/" + _GCE_PROJECT
GCP_NETWORK_RE = re.compile(rf"^(?:{_GCE_NAME}|{_GCE_LINK}/global/networks/{_GCE_NAME})$")
GCP_SUBNETWORK_RE = re.compile(
    rf"^(?:{_GCE_NAME}|{_GCE_LINK}/regions/[a-z]+-[a-z]+[0-9]+/subnetworks/{_GCE_NAME})$"
)
GCP_REGION_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")


def network_name(network: str) -> str:
    """A network's name, from a name or any form of its link (the API answers with full links)."""
    return network.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class GcpConfig(CloudConfig):
    """`gcp:`: the project, and where GCP replicas live on the network.

    `network` (default: the project's `default` network) holds the replicas and their firewall
    rule; `subnetworks` (region -> subnetwork) launches into those subnetworks, and only into their
    regions: a custom-mode network (an organisation without the default network) needs both.
    `ingress_cidrs` may reach the model server port (the router must be among them).
    `external_ip: false` gives replicas no external IP (organisations whose policy forbids them);
    they then need Cloud NAT for boot-time downloads, and the router reaches them at their
    internal IPs, from inside the network."""

    project: str | None = None
    network: str | None = None
    subnetworks: tuple[tuple[str, str], ...] = ()
    ingress_cidrs: tuple[str, ...] = ("0.0.0.0/0",)
    external_ip: bool = True

    @property
    def private_endpoint(self) -> bool:
        """Whether the router reaches GCP replicas at their internal IPs (see `private_only`)."""
        return not self.external_ip or private_only(self.ingress_cidrs)

    def subnetwork_of(self, region: str) -> str | None:
        return dict(self.subnetworks).get(region)

    def confines(self, region: str, zone: str) -> bool:
        """Whether GCP replicas may go to `region`: with `subnetworks`, only to the regions they list."""
        return not self.subnetworks or region in dict(self.subnetworks)

    @property
    def confined(self) -> bool:
        return bool(self.subnetworks)

    #: What `confines` keeps replicas to, for errors that say why no zone is left.
    confinement = "GCP regions are those of gcp.subnetworks"
    #: The field naming them, what its keys are, and the catalog's list they must be in.
    confining_field, confining_kind, confining_level = "gcp.subnetworks", "GCP region", "regions"

    def confining_keys(self) -> tuple[str, ...]:
        return tuple(region for region, _ in self.subnetworks)

    def revision(self, cloud: str | None) -> dict[str, object]:
        """No external IP means new GCP machines (GCE would change running VMs in place); an
        external IP, the default, leaves the digest as before the field existed."""
        return {"gcp_external_ip": False} if not self.external_ip and cloud in (None, "gcp") else {}

    def check_state(self, spec: ServiceSpec, state: ServiceState, *, destroying: bool) -> None:
        """GCP replicas keep the network they were launched in, but the firewall rule opening their
        port belongs to one network: a new `gcp.network` would move the rule away from the running
        replicas (the router could no longer reach them). Refused before a plan, with the order that
        works (not at destroy: destroying needs no firewall rule)."""
        if destroying:
            return
        wanted = network_name(self.network or "default")
        elsewhere = sorted(
            rec.id
            for rec in state.live()
            if rec.cloud == SECTION.key
            and isinstance(rec.outputs.get("network"), str)
            and network_name(rec.outputs["network"]) != wanted
        )
        if elsewhere:
            had = network_name(state.replicas[elsewhere[0]].outputs["network"])
            raise SpecError(
                f"{', '.join(elsewhere)} run in network {had}, not {wanted}: a new network takes the "
                f"firewall rule away from them; keep gcp.network {had} until they are gone (remove gcp "
                "from placement.clouds and apply, or destroy), then change it",
                file=spec.source,
                path="gcp.network",
            )


class GcpSection(CloudSpecSection):
    key = "gcp"
    config = GcpConfig

    def parse(self, ctx: SpecContext, d: dict[str, Any]) -> GcpConfig:
        subnetworks = str_map(ctx, "gcp.subnetworks", d.get("subnetworks"), numbers=False)
        for region, subnetwork in subnetworks.items():
            if not GCP_REGION_RE.fullmatch(region):
                raise ctx.fail(f"gcp.subnetworks.{region}", "expected a GCP region such as 'us-central1'")
            matching(
                ctx,
                f"gcp.subnetworks.{region}",
                subnetwork,
                GCP_SUBNETWORK_RE,
                "a subnetwork name or 'projects/P/regions/R/subnetworks/S'",
            )
            link_region = re.search(r"/regions/([^/]+)/", subnetwork)
            if link_region and link_region.group(1) != region:  # a subnetwork lies in one region
                raise ctx.fail(
                    f"gcp.subnetworks.{region}", f"{subnetwork} is in {link_region.group(1)}, not {region}"
                )
        network = matching(
            ctx,
            "gcp.network",
            d.get("network"),
            GCP_NETWORK_RE,
            "a network name or 'projects/P/global/networks/N'",
        )
        if subnetworks and network is None:
            # the firewall rule belongs to a network: it would open the port on `default` instead
            raise ctx.fail("gcp.subnetworks", "needs gcp.network too: the network the subnetworks belong to")
        net_project = re.match(r"projects/([^/]+)/", network or "")
        for region, subnetwork in sorted(subnetworks.items()):
            sub_project = re.match(r"projects/([^/]+)/", subnetwork)
            if net_project and sub_project and sub_project.group(1) != net_project.group(1):
                # a subnetwork lies in its network's project (a shared VPC's host project)
                raise ctx.fail(
                    f"gcp.subnetworks.{region}",
                    f"{subnetwork} is in project {sub_project.group(1)}, but gcp.network is in "
                    f"{net_project.group(1)}; a subnetwork belongs to its network's project",
                )
        cidrs = str_list(ctx, "gcp.ingress_cidrs", d.get("ingress_cidrs", ["0.0.0.0/0"]), cidr_check(ctx))
        if not cidrs:
            raise ctx.fail(
                "gcp.ingress_cidrs", "expected at least one CIDR block (the router must reach the replicas)"
            )
        return GcpConfig(
            project=matching(ctx, "gcp.project", d.get("project"), GCP_PROJECT_RE, "a GCP project ID"),
            network=network,
            subnetworks=tuple(sorted((str(r), str(s)) for r, s in subnetworks.items())),
            ingress_cidrs=cidrs,
            external_ip=boolean(ctx, "gcp.external_ip", d.get("external_ip", True)),
        )


SECTION = GcpSection()
