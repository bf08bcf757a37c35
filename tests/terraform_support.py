"""Terraform providers for tests, from a filesystem mirror (no test downloads anything).

`SKYHEDGE_TEST_PROVIDER_MIRROR` names the mirror (`.ci/run` sets /opt/tf-plugins where it
exists); tests that need a cloud's provider skip when the mirror lacks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MIRROR_ENV = "SKYHEDGE_TEST_PROVIDER_MIRROR"
#: The provider each cloud's module needs, as the mirror lays it out.
PROVIDERS = {"aws": "hashicorp/aws", "gcp": "hashicorp/google"}


def mirror_holding(cloud: str) -> Path | None:
    """The mirror, if it holds `cloud`'s provider."""
    mirror = os.environ.get(MIRROR_ENV)
    if mirror and (Path(mirror) / "registry.terraform.io" / PROVIDERS[cloud]).is_dir():
        return Path(mirror)
    return None


def mirror_config(directory: Path, cloud: str) -> Path | None:
    """A Terraform CLI config reading providers from the mirror only, or None when it lacks
    `cloud`'s provider."""
    mirror = mirror_holding(cloud)
    if mirror is None:
        return None
    rc = directory / "mirror.tfrc"
    rc.write_text(
        "provider_installation {\n"
        f"  filesystem_mirror {{\n    path    = {json.dumps(str(mirror))}\n"
        '    include = ["registry.terraform.io/*/*"]\n  }\n'
        '  direct {\n    exclude = ["registry.terraform.io/*/*"]\n  }\n}\n'
    )
    return rc
