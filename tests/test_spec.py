"""The spec contract: good specs load with SkyServe's defaults; every bad one gets one exact line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from skyhedge.cli import main
from skyhedge.clouds.local.render import replica_port
from skyhedge.errors import SpecError
from skyhedge.service import compute_plan, resolve_placement
from skyhedge.spec import RouterOptions, load_spec
from skyhedge.state import ServiceState

GOOD = """
name: echo
placement:
  clouds: [local]
run:
  command: python3 server.py
"""


def test_minimal_spec_gets_skyserve_defaults(write_spec):
    spec = load_spec(write_spec(GOOD))
    rp = spec.replica_policy
    assert (rp.min_replicas, rp.num_overprovision, rp.base_ondemand_fallback_replicas) == (1, 1, 0)
    assert rp.dynamic_ondemand_fallback is True
    assert rp.policy == "skyhedge"
    assert spec.readiness_probe.path == "/health"
    assert (spec.service.host, spec.service.port) == ("127.0.0.1", 8080)
    assert spec.terraform.backend == "local"
    assert spec.placement.clouds == ("local",)


def test_the_downscale_tolerance_reaches_the_autoscaler(write_spec):
    """`replica_policy.downscale_tolerance` (optional, 0.1 by default: the band that was a constant)."""
    from skyhedge.autoscaler import DOWNSCALE_TOLERANCE, AutoscalerConfig

    scaled = "replica_policy: {max_replicas: 3, target_qps_per_replica: 2}\n"
    assert AutoscalerConfig.from_spec(load_spec(write_spec(GOOD + scaled))).downscale_tolerance == 0.1
    assert DOWNSCALE_TOLERANCE == 0.1
    wide = scaled.replace("}", ", downscale_tolerance: 0.25}")
    assert AutoscalerConfig.from_spec(load_spec(write_spec(GOOD + wide))).downscale_tolerance == 0.25


def test_examples_load():
    root = Path(__file__).resolve().parents[1] / "examples"
    for path in sorted(root.glob("*/service.yaml")):
        spec = load_spec(path)
        assert spec.name


def test_probe_shorthand_and_post_data(write_spec):
    spec = load_spec(
        write_spec(
            GOOD
            + """
readiness_probe:
  path: /v1/completions
  post_data: {prompt: hi, max_tokens: 1}
  headers: {Authorization: Bearer x}
"""
        )
    )
    assert spec.readiness_probe.post_data == {"prompt": "hi", "max_tokens": 1}
    # plain JSON types, not the loader's numbers that remember their text (json, YAML dumpers)
    assert type(spec.readiness_probe.post_data["max_tokens"]) is int
    assert spec.readiness_probe.headers == {"Authorization": "Bearer x"}


def _with(extra: str, base: str = GOOD) -> str:
    return base + textwrap.dedent(extra)


# (spec text, the exact error line after "service.yaml: ")
BAD_SPECS: list[tuple[str, str]] = [
    ("", "empty file, expected a service spec"),
    ("- a\n- b\n", "expected a mapping at the top level, got list"),
    ("name: [unclosed\n", "invalid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("placement: {clouds: [local]}\nrun: {command: x}\n", "name: required"),
    (
        "name: Echo\nplacement: {clouds: [local]}\nrun: {command: x}\n",
        "name: expected lowercase letters, digits and '-', starting with a letter and not ending with '-' "
        "(at most 40 characters), got 'Echo'",
    ),
    ("name: 42\nplacement: {clouds: [local]}\nrun: {command: x}\n", "name: expected a string, got 42"),
    ("name: echo\nrun: {command: x}\n", "placement: required (at least placement.clouds)"),
    (
        "name: echo\nplacement: {clouds: []}\nrun: {command: x}\n",
        "placement.clouds: expected at least one of aws, gcp, local",
    ),
    (
        "name: echo\nplacement: {clouds: [azure]}\nrun: {command: x}\n",
        "placement.clouds[0]: expected one of aws, gcp, local, got 'azure'",
    ),
    (
        "name: echo\nplacement: {clouds: [aws, aws]}\nrun: {command: x}\n",
        "placement.clouds[1]: duplicate entry 'aws'",
    ),
    (
        "name: echo\nplacement: {clouds: [local], zone: [local-a]}\nrun: {command: x}\n",
        "placement.zone: unknown field (did you mean 'zones'?)",
    ),
    (
        "name: echo\nplacement: {clouds: [local], zones: [Local A]}\nrun: {command: x}\n",
        "placement.zones[0]: expected a zone like 'use1-az1' (AWS zone ID) or 'us-central1-a', got 'Local A'",
    ),
    (
        "name: echo\nplacement: {clouds: [local], regions: [Local]}\nrun: {command: x}\n",
        "placement.regions[0]: expected a region like 'us-east-1' or 'us-central1', got 'Local'",
    ),
    # AWS zones are zone IDs: a zone *name* gets that hint, not a bare "unknown zone".
    (
        "name: echo\nplacement: {clouds: [aws], zones: [us-east-1a]}\nrun: {command: x}\n",
        "placement.zones[0]: 'us-east-1a' is an AWS zone name; AWS zones are given as zone IDs such as 'use1-az1' (the name-to-ID mapping differs per account: 'aws ec2 describe-availability-zones')",
    ),
    (
        "name: echo\nplacement: {clouds: [gcp, aws], exclude_zones: [us-central1-a, eu-west-1b]}\nrun: {command: x}\n",
        "placement.exclude_zones[1]: 'eu-west-1b' is an AWS zone name; AWS zones are given as zone IDs such as 'use1-az1' (the name-to-ID mapping differs per account: 'aws ec2 describe-availability-zones')",
    ),
    ("name: echo\nplacement: {clouds: [local]}\n", "run: required: a mapping with 'command' or 'image'"),
    ("name: echo\nplacement: {clouds: [local]}\nrun: {env: {A: b}}\n", "run: expected 'command' or 'image'"),
    (
        "name: echo\nplacement: {clouds: [local]}\nrun: python3 server.py\n",
        "run: expected a mapping, got 'python3 server.py'",
    ),
    (
        _with("replica_policy: {min_replicas: three}\n"),
        "replica_policy.min_replicas: expected an integer in [0, 10000], got 'three'",
    ),
    (
        _with("replica_policy: {min_replicas: -1}\n"),
        "replica_policy.min_replicas: expected an integer in [0, 10000], got -1",
    ),
    (
        _with("replica_policy: {min_replicas: 1.5}\n"),
        "replica_policy.min_replicas: expected an integer in [0, 10000], got 1.5",
    ),
    (
        _with("replica_policy: {min_replicas: true}\n"),
        "replica_policy.min_replicas: expected an integer in [0, 10000], got true",
    ),
    (
        _with("replica_policy: {min_replicas: 3, max_replicas: 2, target_qps_per_replica: 1}\n"),
        "replica_policy.max_replicas: expected an integer >= min_replicas (3), got 2",
    ),
    (
        _with("replica_policy: {min_replicas: 1, max_replicas: 4}\n"),
        "replica_policy.target_qps_per_replica: required when max_replicas differs from min_replicas",
    ),
    # Without max_replicas the autoscaler's target was unbounded: 120 req/s at 0.5 per replica
    # asked for 240 replicas.
    (
        _with("replica_policy: {min_replicas: 1, target_qps_per_replica: 0.5}\n"),
        "replica_policy.max_replicas: required when target_qps_per_replica is set (the autoscaler's upper bound)",
    ),
    (
        _with("replica_policy: {target_qps_per_replica: 0}\n"),
        "replica_policy.target_qps_per_replica: expected a number > 0, got 0",
    ),
    # Non-finite numbers: .inf passed the lower-only bound of target_qps_per_replica.
    (
        _with("replica_policy: {target_qps_per_replica: .inf}\n"),
        "replica_policy.target_qps_per_replica: expected a finite number > 0, got inf",
    ),
    (
        _with("replica_policy: {target_qps_per_replica: .nan}\n"),
        "replica_policy.target_qps_per_replica: expected a finite number > 0, got nan",
    ),
    (
        _with("replica_policy: {target_qps_per_replica: 1" + "0" * 400 + "}\n"),
        "replica_policy.target_qps_per_replica: expected a finite number > 0, got 1" + "0" * 400,
    ),
    (
        _with("replica_policy: {availability_target: -.inf}\n"),
        "replica_policy.availability_target: expected a finite number in [0.5, 1.0], got -inf",
    ),
    (
        _with("replica_policy: {target_qps_per_replica: fast}\n"),
        "replica_policy.target_qps_per_replica: expected a number > 0, got 'fast'",
    ),
    # Policy names are checked at load time (plug-ins `module:Class` only for shape).
    (
        _with("replica_policy: {policy: nosuch}\n"),
        "replica_policy.policy: unknown policy 'nosuch' (available: even, ondemand, rr, single-region, skyhedge, skyserve, spothedge or 'module:Class')",
    ),
    (
        _with("replica_policy: {policy: spothedg}\n"),
        "replica_policy.policy: unknown policy 'spothedg' (did you mean 'spothedge'?)",
    ),
    (
        _with("replica_policy: {policy: 'mypkg:policies:Greedy'}\n"),
        "replica_policy.policy: expected 'module:Class' (e.g. 'mypkg.policies:Greedy'), got 'mypkg:policies:Greedy'",
    ),
    # Duplicate keys, at any depth, in block or flow style.
    (
        "name: echo\nname: other\nplacement: {clouds: [local]}\nrun: {command: x}\n",
        "invalid YAML: line 2, column 1: duplicate key 'name' (first on line 1)",
    ),
    (
        _with("replica_policy:\n  min_replicas: 1\n  num_overprovision: 0\n  min_replicas: 2\n"),
        "invalid YAML: line 9, column 3: duplicate key 'min_replicas' (first on line 7)",
    ),
    (
        "name: echo\nplacement: {clouds: [local], clouds: [aws]}\nrun: {command: x}\n",
        "invalid YAML: line 2, column 30: duplicate key 'clouds' (first on line 2)",
    ),
    # Local replica r-000N listens on local_base_port + N; a fresh plan reaches N = 2 x R + overprovision.
    (
        _with("resources: {local_base_port: 60000}\nreplica_policy: {min_replicas: 9000}\n"),
        "resources.local_base_port: replicas would listen on ports up to 78001 (> 65535): 60000 + 2 x 9000 replicas (spot and on-demand stand-ins) + 1 num_overprovision; lower local_base_port or the replica counts",
    ),
    (
        _with(
            "replica_policy: {min_replicas: 1, max_replicas: 10000, target_qps_per_replica: 5}\nresources: {local_base_port: 50000}\n"
        ),
        "resources.local_base_port: replicas would listen on ports up to 70001 (> 65535): 50000 + 2 x 10000 replicas (spot and on-demand stand-ins) + 1 num_overprovision; lower local_base_port or the replica counts",
    ),
    (
        _with(
            "resources: {local_base_port: 60000}\nreplica_policy: {min_replicas: 2767, num_overprovision: 2}\n"
        ),
        "resources.local_base_port: replicas would listen on ports up to 65536 (> 65535): 60000 + 2 x 2767 replicas (spot and on-demand stand-ins) + 2 num_overprovision; lower local_base_port or the replica counts",
    ),
    (
        _with("replica_policy: {num_overprovison: 2}\n"),
        "replica_policy.num_overprovison: unknown field (did you mean 'num_overprovision'?)",
    ),
    (
        _with("replica_policy: {dynamic_ondemand_fallback: 'yes'}\n"),
        "replica_policy.dynamic_ondemand_fallback: expected true or false, got 'yes'",
    ),
    (
        _with("replica_policy: {min_replicas: 2, base_ondemand_fallback_replicas: 3}\n"),
        "replica_policy.base_ondemand_fallback_replicas: expected an integer <= the replica count (2), got 3",
    ),
    (
        _with("replica_policy: {availability_target: 1.5}\n"),
        "replica_policy.availability_target: expected a number in [0.5, 1.0], got 1.5",
    ),
    (
        _with("replica_policy: {upscale_delay_seconds: -5}\n"),
        "replica_policy.upscale_delay_seconds: expected an integer >= 0, got -5",
    ),
    (  # 1 or more: no rate would ever be low enough to release a replica
        _with("replica_policy: {downscale_tolerance: 1}\n"),
        "replica_policy.downscale_tolerance: expected a number in [0, 0.9], got 1",
    ),
    (
        _with("replica_policy: {downscale_tolerance: -0.1}\n"),
        "replica_policy.downscale_tolerance: expected a number in [0, 0.9], got -0.1",
    ),
    (  # a share, not a percentage
        _with("replica_policy: {downscale_tolerance: 10%}\n"),
        "replica_policy.downscale_tolerance: expected a number in [0, 0.9], got '10%'",
    ),
    (
        _with("readiness_probe: {path: health}\n"),
        "readiness_probe.path: expected an absolute URL path like '/health', starting with '/'",
    ),
    (  # where, not the value: a probe path may carry a token
        _with("readiness_probe: {path: '/health?token=s3cret x'}\n"),
        "readiness_probe.path: expected an absolute URL path like '/health', got a space at character 21",
    ),
    (  # never sendable (http.client refuses it): every probe failed, its error quoting the token
        _with('readiness_probe: {path: "/health?token=s3cret\\e[2J"}\n'),
        "readiness_probe.path: expected an absolute URL path of printable ASCII characters, got '\\x1b' at character 21",
    ),
    (
        _with("readiness_probe: {path: '/health?name=caf\u00e9'}\n"),
        "readiness_probe.path: expected an absolute URL path of printable ASCII characters, got '\u00e9' at character 17 (percent-encode it: %C3%A9)",
    ),
    (
        _with("readiness_probe: {timeout_seconds: 0}\n"),
        "readiness_probe.timeout_seconds: expected an integer in [1, 3600], got 0",
    ),
    (
        _with("readiness_probe: {post_data: [1, 2]}\n"),
        "readiness_probe.post_data: expected a mapping (sent as JSON) or a string, got list",
    ),
    (  # sent as JSON at every probe: a YAML date would crash apply after the launch
        _with("readiness_probe: {post_data: {since: 2024-01-01}}\n"),
        "readiness_probe.post_data.since: expected a JSON value (a string, finite number, boolean, null, list or mapping), got a date (quote dates and times)",
    ),
    (
        _with("readiness_probe: {post_data: {t: .nan}}\n"),
        "readiness_probe.post_data.t: expected a JSON value (a string, finite number, boolean, null, list or mapping), got a number that is not finite (.nan or .inf)",
    ),
    (  # the field inside the body is named, also in a list
        _with("readiness_probe: {post_data: {a: {b: [1, 2024-01-01]}}}\n"),
        "readiness_probe.post_data.a.b[1]: expected a JSON value (a string, finite number, boolean, null, list or mapping), got a date (quote dates and times)",
    ),
    (  # a key JSON cannot hold is named too (it was 'a NoneType')
        _with("readiness_probe: {post_data: {2024-01-01: x}}\n"),
        "readiness_probe.post_data: expected a JSON value (a string, finite number, boolean, null, list or mapping), got a date as a key (quote dates and times)",
    ),
    (
        _with("readiness_probe: {headers: {X-Token: [a]}}\n"),
        "readiness_probe.headers.X-Token: expected a string, got list",
    ),
    # Probe headers are strings only (run.env still takes numbers as text).
    (
        _with("readiness_probe: {headers: {X: 1}}\n"),
        "readiness_probe.headers.X: expected a string, got an integer (quote it)",
    ),
    (
        _with("readiness_probe: {headers: {X-Ratio: 0.5}}\n"),
        "readiness_probe.headers.X-Ratio: expected a string, got a number (quote it)",
    ),
    (
        _with("readiness_probe: {headers: {'X Token': a}}\n"),
        "readiness_probe.headers.'X Token': expected an HTTP header name, a token like 'X-Api-Key'",
    ),
    (_with("service: {port: 70000}\n"), "service.port: expected an integer in [1, 65535], got 70000"),
    (
        _with("service: {load_balancing_policy: random}\n"),
        "service.load_balancing_policy: expected one of round_robin, least_load, got 'random'",
    ),
    (
        _with("service: {load_balancing_policy: least_loaded}\n"),
        "service.load_balancing_policy: expected one of round_robin, least_load, got 'least_loaded' "
        "(did you mean 'least_load'?)",
    ),
    (
        _with("service: {host: 'bad host; rm -rf /'}\n"),
        "service.host: expected an IP address or host name, got 'bad host; rm -rf /'",
    ),
    (  # what the router's listen directive refuses is refused when the file is read
        _with("service: {host: '-x-'}\n"),
        "service.host: expected an IP address or host name, got '-x-'",
    ),
    (  # nginx has no syntax for an IPv6 zone index ("invalid IPv6 address" at routing up)
        _with("service: {host: 'fe80::1%eth0'}\n"),
        "service.host: expected an IP address or host name, got 'fe80::1%eth0'",
    ),
    (
        _with("resources: {accelerators: 'A100 x 8'}\n"),
        "resources.accelerators: expected NAME or NAME:COUNT (e.g. 'A10G:1'), got 'A100 x 8'",
    ),
    (
        _with("resources: {instance_type: g5.xlarge}\n"),
        "resources.instance_type: expected a mapping of cloud to value (e.g. {aws: ...}), got 'g5.xlarge'",
    ),
    (
        _with("resources: {instance_type: {azure: x}}\n"),
        "resources.instance_type.azure: unknown field (allowed: aws, gcp, local)",
    ),
    (_with("resources: {disk_size: 5}\n"), "resources.disk_size: expected an integer in [10, 65536], got 5"),
    (_with('gcp: {project: "a/b?c=d"}\n'), "gcp.project: expected a GCP project ID, got 'a/b?c=d'"),
    (_with("gcp: {project: My-Project}\n"), "gcp.project: expected a GCP project ID, got 'My-Project'"),
    (_with("aws: {events_queue: q/1}\n"), "aws.events_queue: expected an SQS queue name, got 'q/1'"),
    (_with("aws: {public_ip: 0}\n"), "aws.public_ip: expected true or false, got 0"),
    (
        _with("aws: {subnets: {us-east-1a: subnet-0123abcd}}\n"),
        "aws.subnets.us-east-1a: expected an availability zone ID such as 'use1-az1'",
    ),
    (
        _with('aws: {subnets: {use1-az1: "subnet-1\\"}"}}\n'),
        "aws.subnets.use1-az1: expected a subnet ID such as 'subnet-0123abcd', got 'subnet-1\"}'",
    ),
    (
        _with("aws: {ingress_cidrs: [10.0.0.1]}\n"),
        "aws.ingress_cidrs[0]: expected an IPv4 CIDR block (its network address) such as '10.0.0.0/8', got '10.0.0.1'",
    ),
    (  # the AWS provider refuses a host address with a prefix, and IPv6 in cidr_blocks
        _with("aws: {ingress_cidrs: [10.0.0.0/8, 10.0.0.1/8]}\n"),
        "aws.ingress_cidrs[1]: expected an IPv4 CIDR block (its network address) such as '10.0.0.0/8', got '10.0.0.1/8'",
    ),
    (
        _with("aws: {ingress_cidrs: ['::/0']}\n"),
        "aws.ingress_cidrs[0]: expected an IPv4 CIDR block (its network address) such as '10.0.0.0/8', got '::/0'",
    ),
    (
        _with("aws: {ingress_cidrs: []}\n"),
        "aws.ingress_cidrs: expected at least one CIDR block (the router must reach the replicas)",
    ),
    (_with("aws: {key_name: 'my key'}\n"), "aws.key_name: expected an EC2 key pair name, got 'my key'"),
    (
        _with("aws: {subnets: {use1-az1: subnet-0123abcd, use1-az2: subnet-0123abcd}}\n"),
        "aws.subnets.use1-az2: subnet-0123abcd is given for use1-az1 too; a subnet lies in one zone",
    ),
    (_with("resources: {ports: http}\n"), "resources.ports: expected an integer in [1, 65535], got 'http'"),
    (
        _with("run: {command: x, env: {BAD-NAME: v}}\n", base="name: echo\nplacement: {clouds: [local]}\n"),
        "run.env.BAD-NAME: expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
    ),
    (  # an empty key is a string: what it lacks is a name (it said "expected string keys")
        _with("run: {command: x, env: {'': v}}\n", base="name: echo\nplacement: {clouds: [local]}\n"),
        "run.env: expected non-empty keys, got ''",
    ),
    (
        _with("terraform: {backend: consul}\n"),
        "terraform.backend: expected one of local, s3, gcs, got 'consul'",
    ),
    (
        _with("terraform: {backend: s3, config: {region: us-east-1}}\n"),
        "terraform.config.bucket: required for the s3 backend",
    ),
    (
        _with("terraform: {backend: gcs, config: {bucket: b, key: k}}\n"),
        "terraform.config.key: unknown field (allowed: bucket, prefix)",
    ),
    # skyhedge appends /<cloud>/<region>/terraform.tfstate: the S3 backend refused these keys at
    # `terraform init` ("The value must not start or end with "/"", "must not contain "//"")
    *(
        (
            _with(f"terraform: {{backend: s3, config: {{bucket: b, region: us-east-1, key: '{key}'}}}}\n"),
            f"terraform.config.key: expected an S3 key prefix like 'skyhedge/llm', got '{key}': the S3 "
            "backend refuses a key that starts with '/' or holds '//'",
        )
        for key in ("/skyhedge/llm", "skyhedge//llm", "/")
    ),
    # Terraform converts every string to Unicode NFC: a decomposed é reached the replica composed
    # (the value is not shown: it may be a secret)
    (
        _with(
            'run: {command: x, env: {PASSWORD: "cafe\\u0301"}}\n',
            base="name: echo\nplacement: {clouds: [local]}\n",
        ),
        "run.env.PASSWORD: Terraform converts every string to Unicode NFC, which would change this one "
        "(U+0301 at character 5): write it composed (NFC: é as U+00E9, not e + U+0301)",
    ),
    (  # a compatibility character is replaced (U+212B ANGSTROM SIGN by U+00C5)
        _with('run: {command: "echo \\u212b"}\n', base="name: echo\nplacement: {clouds: [aws]}\n"),
        "run.command: Terraform converts every string to Unicode NFC, which would change this one "
        "(U+212B at character 6): write it composed (NFC: é as U+00E9, not e + U+0301)",
    ),
    (
        _with('terraform: {backend: local, config: {path: "/srv/cafe\\u0301"}}\n'),
        "terraform.config.path: Terraform converts every string to Unicode NFC, which would change this "
        "one (U+0301 at character 10): write it composed (NFC: é as U+00E9, not e + U+0301)",
    ),
    (_with("replicas: 3\n"), "replicas: unknown field (did you mean 'replica_policy'?)"),
    (
        _with("zzz: 3\n"),
        "zzz: unknown field (allowed: aws, gcp, name, placement, readiness_probe, "
        "replica_policy, resources, run, service, terraform)",
    ),
    (_with("servce: {port: 1}\n"), "servce: unknown field (did you mean 'service'?)"),
    (
        _with('run: {command: "a\\0b"}\n', base="name: echo\nplacement: {clouds: [local]}\n"),
        "run.command: contains a NUL byte, which no command line or environment can hold",
    ),
    (
        _with("run: {image: vllm/vllm}\n", base="name: echo\nplacement: {clouds: [local]}\n"),
        "run.command: required with the local cloud, which runs a command (run.image needs a VM cloud)",
    ),
    (
        _with('run: {command: x, env: {A: "a\\0b"}}\n', base="name: echo\nplacement: {clouds: [local]}\n"),
        "run.env.A: contains a NUL byte, which no command line or environment can hold",
    ),
    (
        _with(
            'run: {image: "vllm/vllm", env: {A: "a\\nb"}}\n', base="name: echo\nplacement: {clouds: [aws]}\n"
        ),
        "run.env.A: a line break cannot reach a container (docker env files are line-based)",
    ),
    (
        _with('readiness_probe: {headers: {X: "a\\r\\nInjected: 1"}}\n'),
        "readiness_probe.headers.X: expected a header value of printable Latin-1 characters (no line breaks), "
        "got '\\r' at character 2",
    ),
    (
        _with('readiness_probe: {headers: {X: "\u20ac"}}\n'),
        "readiness_probe.headers.X: expected a header value of printable Latin-1 characters (no line breaks), "
        "got '\u20ac' at character 1",
    ),
    (
        _with("replica_policy: {min_replicas: 100000}\n"),
        "replica_policy.min_replicas: expected an integer in [0, 10000], got 100000",
    ),
    (
        _with("resources: {local_base_port: 31100}\nservice: {port: 31101}\n"),
        "service.port: 31101 is the port of local replica r-0001 (resources.local_base_port 31100 + 1): "
        "the router and that replica cannot both listen there; pick a service.port outside the replicas' range",
    ),
    (
        _with("service: {router: {read_timeout: 0}}\n"),
        "service.router.read_timeout: expected an integer in [1, 86400], got 0",
    ),
    (  # nginx starts with 3, then fails every request ("worker_connections are not enough")
        _with("service: {router: {worker_connections: 3}}\n"),
        "service.router.worker_connections: expected an integer in [64, 1048576], got 3",
    ),
    (
        _with("service: {router: {client_keepalive_timeout: -1}}\n"),
        "service.router.client_keepalive_timeout: expected an integer in [0, 86400], got -1",
    ),
    (
        _with("service: {router: {keepalive: 99999999999999999999}}\n"),
        "service.router.keepalive: expected an integer in [1, 65535], got 99999999999999999999",
    ),
    (
        _with("service: {router: {read_timeut: 60}}\n"),
        "service.router.read_timeut: unknown field (did you mean 'read_timeout'?)",
    ),
    (
        _with("service: {router: {client_max_body_size: '1 0m'}}\n"),
        "service.router.client_max_body_size: expected a size like '32m', at most 64g, got '1 0m'",
    ),
    (
        _with("service: {router: {client_max_body_size: 99999999999999999999g}}\n"),
        "service.router.client_max_body_size: expected a size like '32m', at most 64g, got "
        "'99999999999999999999g'",
    ),
    (
        _with("service: {router: {worker_processes: [2]}}\n"),
        "service.router.worker_processes: expected a string or an integer, got list",
    ),
    (
        _with("service: {port: 9000, router: {status_port: 9000}}\n"),
        "service.router.status_port: 9000 is service.port: the status page needs a port of its own",
    ),
    (
        _with("resources: {local_base_port: 31100}\nservice: {router: {status_port: 31102}}\n"),
        "service.router.status_port: 31102 is the port of local replica r-0002 (resources.local_base_port "
        "31100 + 2): the router and that replica cannot both listen there; pick a "
        "service.router.status_port outside the replicas' range",
    ),
    (
        "name: echo\nplacement: {clouds: [local]}\nrun: {command: x}\nreplica_policy: "
        + "[" * 1000
        + "]" * 1000,
        "invalid YAML: nested too deeply",
    ),
    (  # the first plan's last ID: min 1 + num_overprovision 1 spot, then 1 on-demand stand-in
        _with("resources: {local_base_port: 31100}\nservice: {port: 31103}\n"),
        "service.port: 31103 is the port of local replica r-0003 (resources.local_base_port 31100 + 3): "
        "the router and that replica cannot both listen there; pick a service.port outside the replicas' range",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_SPECS, ids=[f"bad{i:02d}" for i in range(len(BAD_SPECS))])
def test_bad_spec_gets_one_exact_line(write_spec, text, expected):
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {expected}"


def test_a_local_run_too_large_for_the_launcher_is_refused_when_read(write_spec):
    """A local replica's run.command, run.setup and run.env reach its launcher as one environment
    variable, which Linux caps at 128 KiB: past it, the spec is refused naming the largest part,
    not left to Terraform's `fork/exec ...: argument list too long` after the plan is recorded."""
    big = "x" * 50_000
    text = GOOD + f"  env: {{A: {big}, B: {big}, C: '{big}<&>'}}\n"
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(text))
    assert ": run.env.C: run.command, run.setup and run.env come to about 150112 bytes" in str(info.value)
    assert "put it in a file" in str(info.value)
    # one large value that fits (measured: 118,000 bytes start through Terraform) still loads
    assert load_spec(write_spec(GOOD + f"  env: {{A: {'x' * 118_000}}}\n")).run.env["A"]
    # the limit is the local launcher's: a VM cloud's spec is not held to it
    vm = text.replace("clouds: [local]", "clouds: [aws]").replace("command:", "image: img\n  command:")
    assert load_spec(write_spec(vm)).run.env["C"].endswith("<&>")


def test_corpus_is_large_enough():
    assert len(BAD_SPECS) + len(CATALOG_BAD) >= 30


# Errors that need the catalog (unknown zone / region / instance type), checked at placement.
CATALOG_BAD: list[tuple[str, str]] = [
    (
        "name: echo\nplacement: {clouds: [local], zones: [local-z]}\nrun: {command: x}\n",
        "placement.zones[0]: unknown zone 'local-z' for clouds local (did you mean 'local-f'?)",
    ),
    (
        "name: echo\nplacement: {clouds: [local], exclude_zones: [us-east-1a]}\nrun: {command: x}\n",
        "placement.exclude_zones[0]: unknown zone 'us-east-1a' for clouds local",
    ),
    (
        "name: echo\nplacement: {clouds: [aws], zones: [qqqq-az9]}\nrun: {command: x}\n",
        "placement.zones[0]: unknown zone 'qqqq-az9' for clouds aws (AWS zones are zone IDs such as 'use1-az1')",
    ),
    (
        "name: echo\nplacement: {clouds: [local], regions: [locale]}\nrun: {command: x}\n",
        "placement.regions[0]: unknown region 'locale' for clouds local (did you mean 'local'?)",
    ),
    (
        "name: echo\nplacement: {clouds: [local]}\nresources: {instance_type: {local: huge}}\nrun: {command: x}\n",
        "resources.instance_type.local: unknown instance type 'huge' for cloud 'local'",
    ),
    (
        "name: echo\nplacement: {clouds: [local], zones: [local-a], exclude_zones: [local-a]}\nrun: {command: x}\n",
        "placement: no allowed zone sells the instance type (local: local); widen clouds/regions/zones",
    ),
    (
        "name: x\nplacement: {clouds: [aws], regions: [eu-west-1]}\n"
        "resources: {instance_type: {aws: p5.48xlarge}}\nrun: {command: x}\n",
        "placement: no allowed zone sells the instance type (aws: p5.48xlarge); widen clouds/regions/zones",
    ),
    (
        "name: x\nrun: {command: x}\nresources: {accelerators: L4}\n"
        "placement: {clouds: [aws], regions: [us-east-1], zones: [usw2-az1]}\n",
        "placement.zones: names no zone in placement.regions (aws): a zone must lie in an allowed region; "
        "drop one of the lists or make them agree",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), CATALOG_BAD, ids=[f"cat{i:02d}" for i in range(len(CATALOG_BAD))]
)
def test_catalog_checked_spec_errors(write_spec, text, expected):
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        resolve_placement(load_spec(path))
    assert str(info.value) == f"{path}: {expected}"


@pytest.mark.parametrize(
    "text",
    [
        _with("replica_policy: {min_replicas: three}\n"),
        _with("replica_policy: {policy: nosuch}\n"),  # once only `plan` found it, without file or field
        CATALOG_BAD[0][0],
    ],
    ids=["type", "policy", "catalog"],
)
def test_cli_reports_one_line_exit_1_and_writes_nothing(tmp_path, write_spec, text):
    path = write_spec(text)
    state = tmp_path / "state"
    result = CliRunner().invoke(main, ["plan", str(path), "--state-dir", str(state)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")
    assert not state.exists()


def test_missing_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_merge_keys_may_be_overridden(write_spec):
    """A `<<` merge is not a duplicate: overriding a merged key is what merging is for."""
    spec = load_spec(
        write_spec(
            GOOD
            + """
readiness_probe:
  headers: {<<: &auth {Authorization: Bearer a, X-Team: ml}, Authorization: Bearer b}
"""
        )
    )
    assert spec.readiness_probe.headers == {"Authorization": "Bearer b", "X-Team": "ml"}


@pytest.mark.parametrize(
    "extra",
    [
        # plug-in policies are imported at plan time, never when the spec is read
        "replica_policy: {policy: 'not_installed_pkg.policies:Greedy'}\n",
        # run.env still takes numbers as their text; only probe headers are strings-only
        "run: {command: x, env: {PORT: 8000}}\n",
        # local ports only matter when the local cloud is used
        "resources: {local_base_port: 60000}\nreplica_policy: {min_replicas: 9000}\n",
    ],
    ids=["plugin-policy", "numeric-env", "ports-without-local"],
)
def test_new_checks_leave_these_alone(write_spec, extra):
    run = "" if extra.startswith("run:") else "run: {command: x}\n"
    load_spec(write_spec("name: echo\nplacement: {clouds: [aws]}\n" + run + extra))


@pytest.mark.parametrize("policy", ["skyhedge", "spothedge"])
def test_local_port_bound_is_the_first_plans_highest_port(write_spec, policy):
    """At the load-time bound a fresh plan uses port 65535 exactly; one port higher is refused."""

    def spec_text(extra: int) -> str:
        return (
            "name: echo\nplacement: {clouds: [local]}\nrun: {command: x}\nresources: {local_base_port: 60000}\n"
            f"replica_policy: {{min_replicas: 2767, num_overprovision: {extra}, policy: {policy}}}\n"
        )

    spec = load_spec(write_spec(spec_text(1)))
    plan, _ = compute_plan(spec, ServiceState(service="echo"), now=0.0)
    assert max(replica_port(spec, r.id) for r in plan.desired) == 65535
    with pytest.raises(SpecError, match=r"resources\.local_base_port: .* up to 65536 "):
        load_spec(write_spec(spec_text(2)))


def test_a_plug_in_policy_that_cannot_load_names_the_spec_field(write_spec):
    path = write_spec(GOOD + "replica_policy: {policy: 'nosuchmod:Cls'}\n")
    spec = load_spec(path)
    with pytest.raises(SpecError) as info:
        compute_plan(spec, ServiceState(service="echo"), now=0.0)
    assert str(info.value).startswith(f"{path}: replica_policy.policy: policy 'nosuchmod:Cls': cannot load")


def test_router_knobs_reach_the_router_options(write_spec):
    """`service.router` sets the nginx knobs; YAML numbers are fine for sizes and worker counts,
    and anything unset keeps the LLM-serving defaults."""
    spec = load_spec(
        write_spec(
            _with(
                "service:\n  router: {read_timeout: 1800, client_max_body_size: 1024, worker_processes: 2,"
                " status_port: 9145}\n"
            )
        )
    )
    opts = spec.service.router
    assert (opts.read_timeout, opts.client_max_body_size, opts.worker_processes, opts.status_port) == (
        1800,
        "1024",
        "2",
        9145,
    )
    assert opts.max_fails == RouterOptions().max_fails
    assert load_spec(write_spec(GOOD)).service.router == RouterOptions()


def test_a_local_replica_never_gets_the_number_whose_port_the_router_holds(tmp_path):
    """Local replica r-000N listens on local_base_port + N and IDs grow for ever: a router port
    above the base is reached one day (say after a spec reload moved it there). That number is
    skipped instead of launching a replica that cannot listen."""
    from skyhedge.spec import parse_spec

    spec = parse_spec(
        {
            "name": "echo",
            "placement": {"clouds": ["local"], "zones": ["local-a", "local-b"]},
            "resources": {"local_base_port": 19000},
            "replica_policy": {"min_replicas": 1, "num_overprovision": 0, "policy": "spothedge"},
            "service": {"port": 19038, "router": {"status_port": 19040}},
            "run": {"command": "true"},
        },
        source=str(tmp_path / "s.yaml"),
    )
    plan, _ = compute_plan(spec, ServiceState(service="echo", next_id=38), now=0.0)
    created = [r.id for r in plan.replicas]
    assert created and "r-0038" not in created and "r-0040" not in created
    assert created[0] == "r-0039"
    assert {replica_port(spec, rid) for rid in created}.isdisjoint({19038, 19040})


def _echo_spec(tmp_path, *, base_port: int, min_replicas: int):
    """A local service on two zones whose replicas listen on base_port + N."""
    from skyhedge.spec import parse_spec

    return parse_spec(
        {
            "name": "echo",
            "placement": {"clouds": ["local"], "zones": ["local-a", "local-b"]},
            "resources": {"local_base_port": base_port},
            "replica_policy": {"min_replicas": min_replicas, "num_overprovision": 0, "policy": "spothedge"},
            "run": {"command": "true"},
        },
        source=str(tmp_path / "s.yaml"),
    )


def test_the_status_port_the_running_router_kept_is_skipped_too(tmp_path):
    """A spec that stops naming a status port leaves nginx on the one it had (a reload keeps
    it): the state's router records it, and that replica number is skipped as well."""

    spec = _echo_spec(tmp_path, base_port=19000, min_replicas=1)
    state = ServiceState(service="echo", next_id=59)
    state.router = {"endpoint": "http://127.0.0.1:8080", "status_url": "http://127.0.0.1:19059/stub_status"}
    plan, _ = compute_plan(spec, state, now=0.0)
    assert [r.id for r in plan.replicas][0] == "r-0060"


def test_ids_past_the_highest_port_wrap_and_skip_the_ports_in_use(tmp_path):
    """Every launch takes a new ID, a refused one too (a market replay burned a thousand in half
    an hour): once base + N passed 65535 no local replica could launch again. Ports wrap to the
    bottom of the range, and a wrapped ID never lands on a live replica's or the router's port."""
    from skyhedge.state import ReplicaRecord

    spec = _echo_spec(tmp_path, base_port=60000, min_replicas=3)
    state = ServiceState(service="echo", next_id=5535)
    state.router = {"endpoint": "http://127.0.0.1:8080", "status_url": "http://127.0.0.1:60002/stub_status"}
    state.replicas["r-5534"] = (
        ReplicaRecord(  # serving on 65534; and on 60001 below, wrapped from an older cycle
            "r-5534",
            "local",
            "local",
            "local-a",
            "spot",
            0.0,
            provisioned_at=1.0,
            ready_at=2.0,
            endpoint="http://127.0.0.1:65534",
        )
    )
    state.replicas["r-0001"] = ReplicaRecord(
        "r-0001",
        "local",
        "local",
        "local-b",
        "spot",
        0.0,
        provisioned_at=1.0,
        ready_at=2.0,
        endpoint="http://127.0.0.1:60001",
    )
    plan, _ = compute_plan(spec, state, now=10.0, probe_ports=False)
    created = [r.id for r in plan.replicas if r.action == "create"]
    ports = [replica_port(spec, rid) for rid in created]
    assert created == ["r-5535", "r-5538"]  # 65535, then 60001 (live) and 60002 (router) skipped
    assert ports == [65535, 60003]


def test_after_the_base_port_is_lowered_new_ids_skip_the_ports_old_replicas_still_hold(tmp_path):
    """Replicas keep the port they were launched on when local_base_port changes, and outdated
    ones serve until their replacements are READY: a new ID whose port one of them holds would
    fail the whole root ("Two replicas cannot share a port") on every apply."""
    from skyhedge.spec import parse_spec
    from skyhedge.state import ReplicaRecord

    spec = parse_spec(
        {
            "name": "echo",
            "placement": {"clouds": ["local"], "zones": ["local-a", "local-b"]},
            "resources": {"local_base_port": 23699},  # was 23700
            "replica_policy": {"min_replicas": 5, "num_overprovision": 0, "policy": "spothedge"},
            "service": {"port": 23710},
            "run": {"command": "true"},
        },
        source=str(tmp_path / "s.yaml"),
    )
    state = ServiceState(service="echo", next_id=6)
    for n in range(1, 6):  # r-0001..r-0005 on 23701..23705, launched under the old base
        state.replicas[f"r-{n:04d}"] = ReplicaRecord(
            f"r-{n:04d}",
            "local",
            "local",
            "local-a" if n % 2 else "local-b",
            "spot",
            launched_at=0.0,
            provisioned_at=1.0,
            ready_at=2.0,
            endpoint=f"http://127.0.0.1:{23700 + n}",
            revision="old",
        )
    plan, _ = compute_plan(spec, state, now=10.0)
    created = [r.id for r in plan.replicas if r.action == "create"]
    assert created and "r-0006" not in created  # 23699 + 6 = 23705, r-0005's port
    ports = {r.port or replica_port(spec, r.id) for r in plan.replicas}
    assert len(ports) == len(plan.replicas)  # no two replicas share a port


def _gpu_catalog(offers: list[tuple[str, str, float | None]]) -> dict:
    """An AWS catalog of two L4 types (g6.xlarge the cheaper on-demand) sold as `offers` say."""
    types = {
        t: {"accelerator": "L4", "accelerator_count": 1, "vcpus": v, "memory_gib": 4 * v}
        for t, v in (("g6.xlarge", 4), ("g6.2xlarge", 8))
    }
    ondemand = {"g6.xlarge": 0.80, "g6.2xlarge": 0.98}
    return {
        "format": 1,
        "cloud": "aws",
        "source": "test fixture",
        "taken_at": "2026-01-01",
        "instance_types": types,
        "offers": [
            {
                "instance_type": t,
                "region": "us-west-2",
                "zone": z,
                "ondemand_price": ondemand[t],
                "spot_price": s,
            }
            for t, z, s in offers
        ],
    }


@pytest.mark.parametrize(
    ("offers", "policy", "expected"),
    [
        # the cheaper type is sold only outside the allowed zone: the one sold inside is chosen
        ([("g6.xlarge", "usw2-az1", 0.4), ("g6.2xlarge", "usw2-az2", 0.5)], "skyhedge", "g6.2xlarge"),
        # sold in the allowed zone on-demand only: a spot policy takes the type sold there on spot...
        ([("g6.xlarge", "usw2-az2", None), ("g6.2xlarge", "usw2-az2", 0.5)], "skyhedge", "g6.2xlarge"),
        # ...the ondemand policy the cheaper one
        ([("g6.xlarge", "usw2-az2", None), ("g6.2xlarge", "usw2-az2", 0.5)], "ondemand", "g6.xlarge"),
        # both sold there on spot: the cheaper, as before
        ([("g6.xlarge", "usw2-az2", 0.4), ("g6.2xlarge", "usw2-az2", 0.5)], "skyhedge", "g6.xlarge"),
    ],
)
def test_accelerators_pick_the_cheapest_type_the_placement_can_run(
    write_spec, tmp_path, monkeypatch, offers, policy, expected
):
    import json

    from skyhedge.catalog import clear_cache

    cache = tmp_path / "catalogs"
    cache.mkdir()
    (cache / "aws.json").write_text(json.dumps(_gpu_catalog(offers)))
    monkeypatch.setenv("SKYHEDGE_CATALOG_DIR", str(cache))
    clear_cache()
    try:
        spec = load_spec(
            write_spec(
                f"""
                name: llm
                placement: {{clouds: [aws], zones: [usw2-az2]}}
                resources: {{accelerators: "L4:1"}}
                replica_policy: {{policy: {policy}}}
                run: {{command: serve}}
                """
            )
        )
        assert resolve_placement(spec).instance_types == {"aws": expected}
    finally:
        clear_cache()


def test_aws_subnets_place_aws_replicas_only_in_their_zones(write_spec):
    """An account without a default VPC names its subnets; the zones that have one are where AWS
    replicas go, and a zone ID the catalog does not know is named, not silently dropped."""
    base = (
        "name: llm\nplacement: {clouds: [aws]}\nresources: {instance_type: {aws: g6.xlarge}}\n"
        "run: {command: serve}\naws: {subnets: %s}\n"
    )
    placement = resolve_placement(
        load_spec(write_spec(base % "{use1-az1: subnet-0123abcd, usw2-az2: subnet-4567ef01}"))
    )
    assert sorted(c.location.zone for c in placement.locations) == ["use1-az1", "usw2-az2"]
    with pytest.raises(
        SpecError, match=r"aws.subnets.use1-az9: unknown AWS zone ID 'use1-az9' \(did you mean"
    ):
        resolve_placement(load_spec(write_spec(base % "{use1-az9: subnet-0123abcd}")))


GCP_NET = (
    "name: llm\nplacement: {clouds: [gcp]}\nresources: {instance_type: {gcp: g2-standard-4}}\n"
    "run: {command: serve}\ngcp: %s\n"
)


def test_gcp_subnetworks_place_gcp_replicas_only_in_their_regions(write_spec):
    """An organisation without the default network names its network and one subnetwork per
    region; those regions are where GCP replicas go, and a region the catalog does not know is
    named, not silently dropped."""
    spec = load_spec(
        write_spec(
            GCP_NET % "{network: prod, subnetworks: {us-east4: serving-e4, "
            "us-central1: projects/net-host/regions/us-central1/subnetworks/serving}}"
        )
    )
    assert spec.gcp.network == "prod" and spec.gcp.subnetwork_of("us-east4") == "serving-e4"
    assert {c.location.region for c in resolve_placement(spec).locations} == {"us-east4", "us-central1"}
    with pytest.raises(
        SpecError, match=r"gcp.subnetworks.us-east9: unknown GCP region 'us-east9' \(did you mean"
    ):
        resolve_placement(load_spec(write_spec(GCP_NET % "{network: prod, subnetworks: {us-east9: s}}")))


@pytest.mark.parametrize(
    ("gcp", "message"),
    [
        ("{subnetworks: {us-east4: s}}", "gcp.subnetworks: needs gcp.network too"),
        (
            "{network: prod, subnetworks: {us-east4: projects/p-123456/regions/us-west1/subnetworks/s}}",
            "gcp.subnetworks.us-east4: projects/p-123456/regions/us-west1/subnetworks/s is in us-west1, not us-east4",
        ),
        ("{network: Prod_Net}", "gcp.network: expected a network name or 'projects/P/global/networks/N'"),
        ("{network: 'prod; rm -rf /'}", "gcp.network: expected a network name"),
        (
            "{network: prod, subnetworks: {us-east4: 'a/b'}}",
            "gcp.subnetworks.us-east4: expected a subnetwork name",
        ),
        ("{network: prod, subnetworks: {us_east4: s}}", "gcp.subnetworks.us_east4: expected a GCP region"),
        ("{ingress_cidrs: []}", "gcp.ingress_cidrs: expected at least one CIDR block"),
        ("{ingress_cidrs: [10.0.0.1/8]}", r"gcp.ingress_cidrs\[0\]: expected an IPv4 CIDR block"),
        ("{vpc: prod}", "gcp"),
        ("{external_ip: 'no'}", "gcp.external_ip: expected true or false, got 'no'"),
    ],
)
def test_gcp_network_settings_are_checked_with_the_field_named(write_spec, gcp, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_spec(GCP_NET % gcp))


def test_gcp_network_by_link_and_default_ingress(write_spec):
    spec = load_spec(
        write_spec(
            GCP_NET
            % "{network: 'https://www.googleapis.com/compute/v1/projects/host-proj/global/networks/prod'}"
        )
    )
    assert spec.gcp.network.endswith("/networks/prod") and spec.gcp.ingress_cidrs == ("0.0.0.0/0",)
    assert not spec.gcp.confined and spec.network("gcp") is spec.gcp and spec.network("local") is None


def test_gcp_a_subnetwork_of_another_project_than_its_network_is_refused(tmp_path):
    from skyhedge.errors import SpecError

    path = tmp_path / "svc.yaml"
    path.write_text(
        "name: svc\nplacement: {clouds: [gcp]}\nresources: {accelerators: 'L4:1'}\nrun: {command: serve}\n"
        "gcp: {network: projects/host-proj/global/networks/n,"
        " subnetworks: {us-central1: projects/other-proj/regions/us-central1/subnetworks/s}}\n"
    )
    with pytest.raises(
        SpecError,
        match=r"gcp.subnetworks.us-central1: .* is in project other-proj, but gcp.network is in host-proj",
    ):
        load_spec(path)


def test_replicas_kept_off_the_internet_are_reached_privately_and_are_a_new_revision(write_spec):
    """`aws.public_ip: false` / `gcp.external_ip: false`: the router can only reach the private
    IPs, whatever `ingress_cidrs` admits; and since EC2 sets a public IP at launch only (GCE
    would edit every running VM at once), the change rolls replicas over like a `run` change.
    Left unset, neither moves the revision of replicas already running."""
    from skyhedge.spec import replica_revision

    plain = load_spec(write_spec(GCP_NET % "{}"))
    assert plain.aws.public_ip is None and plain.gcp.external_ip is True
    assert not plain.aws.private_endpoint and not plain.gcp.private_endpoint
    internal = load_spec(write_spec(GCP_NET % "{external_ip: false}"))
    assert internal.gcp.private_endpoint and replica_revision(internal) != replica_revision(plain)
    explicit = load_spec(write_spec(GCP_NET % "{external_ip: true}"))
    assert replica_revision(explicit) == replica_revision(plain)
    text = (GCP_NET % "{}") + "aws: {public_ip: false}\n"
    private = load_spec(write_spec(text))
    assert private.aws.private_endpoint and replica_revision(private) != replica_revision(plain)
    public = load_spec(write_spec((GCP_NET % "{}") + "aws: {public_ip: true}\n"))
    assert not public.aws.private_endpoint and replica_revision(public) != replica_revision(private)
    # per cloud: gcp.external_ip rolls over GCP replicas only, aws.public_ip AWS replicas only
    for cloud in ("aws", "local"):
        assert replica_revision(internal, cloud) == replica_revision(plain, cloud)
    assert replica_revision(internal, "gcp") != replica_revision(plain, "gcp")
    for cloud in ("gcp", "local"):
        assert replica_revision(private, cloud) == replica_revision(plain, cloud)
    assert replica_revision(private, "aws") != replica_revision(plain, "aws")


@pytest.mark.parametrize(
    "cidrs, private",
    [
        ("[0.0.0.0/0]", False),  # the default: the router may be anywhere
        ("[0.0.0.0/1]", False),  # 0.0.0.0 and 127.255.255.255 are special; the addresses between are not
        ("[10.0.0.0/8]", True),
        ("[10.0.0.0/16, 192.168.0.0/16, 172.16.0.0/12]", True),
        ("[10.0.0.0/8, 0.0.0.0/0]", False),
        ("[172.32.0.0/16]", False),  # just past 172.16.0.0/12
        ("[100.64.0.0/10]", True),  # RFC 6598 shared space: no internet route (is_private says no)
        ("[100.128.0.0/16]", False),  # just past it
        ("[192.0.0.0/24]", False),  # private on Python 3.13 only
    ],
)
def test_private_endpoints_follow_ingress_ranges_on_any_python(write_spec, monkeypatch, cidrs, private):
    """Replicas are reached at their private IPs when every `ingress_cidrs` range is private, by
    skyhedge's own list of ranges: `ipaddress`'s `is_private` answers differently per Python release
    (3.10 counts 0.0.0.0/0 private, so a default spec on 3.10 routed a router outside the network to
    the replicas' private IPs). Here `is_private` answers as 3.10's does, and must not matter."""
    import ipaddress

    def py310_is_private(net: ipaddress.IPv4Network) -> bool:
        return net.network_address.is_private and net.broadcast_address.is_private

    monkeypatch.setattr(ipaddress.IPv4Network, "is_private", property(py310_is_private))
    assert ipaddress.ip_network("0.0.0.0/0").is_private  # the 3.10 answer is in force
    spec = load_spec(
        write_spec(
            "name: llm\nplacement: {clouds: [aws, gcp]}\n"
            "resources: {instance_type: {aws: g5.xlarge, gcp: g2-standard-4}}\nrun: {command: serve}\n"
            f"aws: {{ingress_cidrs: {cidrs}}}\ngcp: {{ingress_cidrs: {cidrs}}}\n"
        )
    )
    assert (spec.aws.private_endpoint, spec.gcp.private_endpoint) == (private, private)


def test_env_numbers_are_taken_as_written(write_spec):
    """YAML 1.1 reads 01234 as 668, 1.10 as 1.1 and 1:30 as 90: an env value is the text written."""
    spec = load_spec(
        write_spec(
            "name: echo\nplacement: {clouds: [aws]}\n"
            "run: {command: x, env: {ZIP: 01234, VERSION: 1.10, DURATION: 1:30, HEX: 0x1F, PORT: 8000}}\n"
        )
    )
    assert spec.run.env == {
        "ZIP": "01234",
        "VERSION": "1.10",
        "DURATION": "1:30",
        "HEX": "0x1F",
        "PORT": "8000",
    }


@pytest.mark.parametrize(
    ("text", "digest"),
    [
        # pinned from before aws.public_ip, gcp.external_ip and env numbers as written (fba8884)
        ("placement: {clouds: [local]}\nrun: {command: x, env: {N: 1.0}}\n", "fbe072bfb633"),
        ("placement: {clouds: [local]}\nrun: {command: x, env: {PORT: 8000, A: abc}}\n", "da8056d70547"),
        ("placement: {clouds: [aws]}\nrun: {command: x}\naws: {key_name: ops}\n", "d220face4f26"),
    ],
)
def test_an_upgrade_keeps_the_revision_of_a_spec_without_the_new_fields(write_spec, text, digest):
    """Running replicas roll over after an upgrade only where what they run changes: the digest of
    a spec that sets none of the new fields, and whose env numbers read the same as written, is
    the one recorded before (docs/controller.md, "Changing the spec")."""
    from skyhedge.spec import replica_revision

    spec = load_spec(write_spec("name: e\n" + text))
    assert {replica_revision(spec), *(replica_revision(spec, c) for c in ("aws", "gcp", "local"))} == {digest}


def test_a_spec_path_with_a_line_break_is_quoted_in_the_one_line(tmp_path):
    """Found by an input audit: `we\\nird.yaml` split every error about that spec in two."""
    path = tmp_path / "we\nird.yaml"
    path.write_text("name: x\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(repr(str(path)))


def test_a_plan_digests_the_replica_revision_once_per_cloud_not_per_replica(tmp_path, monkeypatch):
    """Every pass plans with the revision of every live replica (is it outdated?) and of every
    replica it creates: digested per replica (a JSON dump of `run` and `resources` each), it was
    about 70 ms of each watcher pass at 1,000 replicas. It depends on the spec and cloud alone."""
    import skyhedge.spec as spec_module
    from skyhedge.state import ReplicaRecord

    spec = _echo_spec(tmp_path, base_port=20000, min_replicas=300)
    current = spec_module.replica_revision(spec, "local")
    state = ServiceState(service="echo", next_id=201)
    for n in range(1, 201):
        rid = f"r-{n:04d}"
        state.replicas[rid] = ReplicaRecord(
            rid, "local", "local", "local-a", "spot", 0.0, provisioned_at=1.0, ready_at=2.0, revision=current
        )
    import skyhedge.service as service_module

    digests = []
    real = spec_module.replica_revision
    for module in (spec_module, service_module):  # (wherever the plan looks it up)
        monkeypatch.setattr(
            module, "replica_revision", lambda *a: digests.append(a) or real(*a), raising=False
        )
    plan, _ = compute_plan(spec, state, now=10.0, probe_ports=False)
    assert len([r for r in plan.replicas if r.action == "create"]) >= 100
    assert not any(r.outdated for r in plan.replicas)
    assert {r.revision for r in plan.replicas} == {current}
    assert len(digests) <= 2  # once for the outdated check, once for the new replicas


def test_a_text_terraform_would_change_is_refused_only_where_replicas_launch(write_spec):
    """Terraform converts every string to Unicode NFC, so a decomposed accent reached the replicas
    composed: refused for `plan`, `apply` and `watch`, but `destroy` and `logs` (which launch
    nothing) still read the spec, to tear down what an older skyhedge launched with it."""
    path = write_spec("name: echo\nplacement: {clouds: [local]}\nrun: {command: 'echo cafe\u0301'}\n")
    with pytest.raises(SpecError, match=r"run\.command: Terraform converts every string to Unicode NFC"):
        load_spec(path)
    assert load_spec(path, launches=False).run.command == "echo cafe\u0301"
    composed = write_spec("name: echo\nplacement: {clouds: [local]}\nrun: {command: 'echo caf\u00e9'}\n")
    assert load_spec(composed).run.command == "echo caf\u00e9"


def test_a_run_workdir_whose_name_is_not_nfc_is_refused(tmp_path):
    """A folder copied from macOS keeps its decomposed name on Linux; Terraform handed the
    launcher the composed one, another (missing) directory, and every local launch failed."""
    folder = tmp_path / "cafe\u0301"
    folder.mkdir()
    spec = folder / "service.yaml"
    spec.write_text("name: echo\nplacement: {clouds: [local]}\nrun: {command: x, workdir: .}\n")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert ": run.workdir: " in str(info.value) and "is not in Unicode NFC (U+0301 at character" in str(
        info.value
    )
    assert load_spec(spec, launches=False).run.workdir == folder
