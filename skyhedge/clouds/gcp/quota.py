"""Compute Engine's quota refusals: which launch errors are a project's quota used up (in a region,
or across all regions) rather than a zone out of capacity, and the one line to raise it.

Compute answers an instance insert over quota with code `QUOTA_EXCEEDED` and "Quota
'PREEMPTIBLE_NVIDIA_L4_GPUS' exceeded. Limit: 0.0 in region us-central1." (a regional metric),
or "... Limit: 0.0 globally." for a project-wide one (`GPUS_ALL_REGIONS`). A new project often
has 0. It holds until a person raises it on the console's IAM & Admin > Quotas page. The API's
rate limit, worded alike ("Quota exceeded for quota metric 'Queries'"), never reaches here: the
engine does not count it a refusal.
"""

from __future__ import annotations

import re

from skyhedge.clouds import QuotaRefusal

_NAMED = re.compile(
    r"Quota '(?P<metric>[A-Za-z0-9_]+)' exceeded\.?\s*Limit:\s*(?P<limit>[0-9.]+)"
    r"(?:\s+in region (?P<region>[a-z0-9-]+)|\s+(?P<globally>globally))?"
)
_CODE = re.compile(r"\bQUOTA_EXCEEDED\b")
#: Where a quota is raised (the console's IAM & Admin > Quotas page, filtered by metric).
QUOTAS_PAGE = "console.cloud.google.com/iam-admin/quotas"


def refusal(text: str, *, region: str, market: str, instance_type: str | None = None) -> QuotaRefusal | None:
    """The quota a refused launch's error `text` names (None: no quota)."""
    found = _NAMED.search(text)
    if found is None:
        if _CODE.search(text) is None:
            return None
        return QuotaRefusal(f"gcp: a quota used up in {region} (QUOTA_EXCEEDED): raise it at {QUOTAS_PAGE}")
    metric, limit = found.group("metric"), found.group("limit")
    if found.group("globally"):
        return QuotaRefusal(
            f"gcp: quota {metric} used up in every region (limit {limit} for the project): raise it at "
            f"{QUOTAS_PAGE} (metric {metric})",
            scope="cloud",
        )
    where = found.group("region") or region
    return QuotaRefusal(
        f"gcp: quota {metric} used up in {where} (limit {limit}): raise it at {QUOTAS_PAGE} "
        f"(metric {metric}, region {where})"
    )
