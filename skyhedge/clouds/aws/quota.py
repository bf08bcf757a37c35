"""EC2's quota refusals: which of the launch errors are an account quota used up in a region (not
a zone out of capacity), and the one line a person needs to raise it.

EC2 answers RunInstances with `MaxSpotInstanceCountExceeded` when the region's spot quota of the
instance's family is used up ("All G and VT Spot Instance Requests", counted in vCPUs; a new
account often has 0 or a few), and with `VcpuLimitExceeded` (`InstanceLimitExceeded` on accounts
still counted in instances) for the on-demand one ("Running On-Demand G and VT instances").
Either holds for every zone of the region until a person raises it in the Service Quotas console,
where the quota has exactly these names (docs.aws.amazon.com/ec2/latest/instancetypes/
ec2-instance-quotas.html). The P family's spot quota is split by generation ("All P4, P3 and P2
Spot Instance Requests", "All P5 Spot Instance Requests"; there is no "All P Spot Instance
Requests"), its on-demand one is not.
"""

from __future__ import annotations

import re

from skyhedge.clouds import QuotaRefusal

#: EC2's error codes for a quota used up, and the market whose quota each is.
_CODES = re.compile(r"\b(MaxSpotInstanceCountExceeded|VcpuLimitExceeded|InstanceLimitExceeded)\b")

#: An instance type's letters (before its generation's digit) -> its family's name in EC2's vCPU
#: quotas. Others (mac, u-, hpc: no spot, quotas of their own) are named generically.
_STANDARD = "Standard (A, C, D, H, I, M, R, T, Z)"
_FAMILIES = {
    **dict.fromkeys(("a", "c", "d", "h", "i", "im", "is", "m", "r", "t", "z"), _STANDARD),
    **dict.fromkeys(("g", "vt"), "G and VT"),
    **{"p": "P", "f": "F", "inf": "Inf", "x": "X", "dl": "DL", "trn": "Trn"},
}


#: The P family's spot quotas are split by generation where its on-demand one is not ("Running
#: On-Demand P instances" for all): a generation -> its spot quota's family name. A P generation
#: not listed (a newer one) is named generically rather than by a quota that may not hold it.
_P_SPOT = {"2": "P4, P3 and P2", "3": "P4, P3 and P2", "4": "P4, P3 and P2", "5": "P5"}


def quota_name(market: str, instance_type: str | None) -> str | None:
    """The Service Quotas name of the EC2 quota a launch of `instance_type` on `market` counts
    against (None: a type whose family this does not know)."""
    letters = re.match(r"([a-z]+)([0-9])", (instance_type or "").lower())
    family = _FAMILIES.get(letters.group(1)) if letters else None
    if family is None or letters is None:
        return None
    if market == "spot":
        if family == "P":
            family = _P_SPOT.get(letters.group(2))
            if family is None:
                return None
        return f"All {family} Spot Instance Requests"
    return f"Running On-Demand {family} instances"


def refusal(text: str, *, region: str, market: str, instance_type: str | None = None) -> QuotaRefusal | None:
    """The quota a refused launch's error `text` names, for the whole `region` (None: no quota)."""
    found = _CODES.search(text)
    if found is None:
        return None
    name = quota_name(market, instance_type)
    quota = f"'{name}'" if name else f"the EC2 {'spot' if market == 'spot' else 'on-demand'} vCPU quota"
    return QuotaRefusal(
        f"aws: quota {quota} used up in {region} ({found.group(1)}): raise it in the Service Quotas "
        f"console, Amazon EC2, region {region}"
    )
