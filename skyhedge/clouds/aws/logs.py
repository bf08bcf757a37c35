"""An AWS replica's log: its instance's console output (EC2 GetConsoleOutput).

EC2 keeps the newest 64 KB of the serial console. `Latest=True` reads it as it is now; instance
types that cannot do that (Xen, older generations) give the output buffered at the last state
change instead. The console is a window that slides, so a byte offset alone means nothing from
one read to the next: the cursor is the previous read's length and the end of its text, and a read
shows what follows that end (the whole window, marked skipped, when it has slid out of it).
A replica whose instance ID the state does not record (`watch --gitops`: CI applied it) is found
by its `skyhedge:service` and `skyhedge:replica` tags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyhedge.clouds.aws import new_session
from skyhedge.errors import CloudError
from skyhedge.replica_logs import LogChunk

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ReplicaRecord

#: A test (moto) or a caller with its own session and credentials sets this.
SESSION: Any = None


def read_log(spec: ServiceSpec, state_dir: Path, record: ReplicaRecord, start: object) -> LogChunk:
    from botocore.config import Config
    from botocore.exceptions import ClientError

    session = SESSION or new_session()
    ec2 = session.client(
        "ec2",
        region_name=record.region,
        config=Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 3}),
    )
    instance = record.cloud_id or _tagged_instance(ec2, spec, record)
    if not instance:
        raise CloudError(f"{record.id}: no EC2 instance recorded yet (not applied, or not created)")
    where = f"EC2 console output of {instance} ({record.region})"
    with _one_line(f"aws: {record.id}: GetConsoleOutput {instance}"):
        try:
            reply = ec2.get_console_output(InstanceId=instance, Latest=True)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "UnsupportedOperation":
                raise
            reply = ec2.get_console_output(InstanceId=instance)  # not Nitro: the buffered one
    text = str(reply.get("Output") or "")  # botocore decodes the base64
    return _after(text, start, where)


def _tagged_instance(ec2: Any, spec: ServiceSpec, record: ReplicaRecord) -> str | None:
    """The instance carrying the replica's tags, for a replica whose instance ID the state does
    not record: under `watch --gitops` CI applies the tree, and the state never learns the IDs.
    The newest one that is not terminated, else the newest (its console outlives it a while)."""
    from skyhedge.clouds.aws.events import TAG_REPLICA, TAG_SERVICE

    filters = [
        {"Name": f"tag:{TAG_SERVICE}", "Values": [spec.name]},
        {"Name": f"tag:{TAG_REPLICA}", "Values": [record.id]},
    ]
    found: list[dict[str, Any]] = []
    with _one_line(f"aws: {record.id}: DescribeInstances ({record.region})"):
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                found.extend(reservation.get("Instances", []))
    found.sort(key=lambda i: (i.get("State", {}).get("Name") != "terminated", str(i.get("LaunchTime", ""))))
    return str(found[-1]["InstanceId"]) if found else None


@contextlib.contextmanager
def _one_line(call: str) -> Iterator[None]:
    """An AWS API failure inside the block as one CloudError line: `CALL: Code: Message`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CloudError(f"{call}: {error.get('Code')}: {error.get('Message')}") from None
    except BotoCoreError as exc:
        raise CloudError(f"{call}: {exc}") from None


#: How much of the previous read's end the cursor keeps: enough to be found once only.
ANCHOR_CHARS = 256


def _after(text: str, start: object, where: str) -> LogChunk:
    cursor = (len(text), text[-ANCHOR_CHARS:])
    if not isinstance(start, tuple) or len(start) != 2:
        return LogChunk(text, cursor, where)
    end, anchor = start
    # The window only slides forward: the previous read's end is where it was (a console under
    # 64 KB, as most boot logs are), or earlier, never later. The same text found further on is
    # that text printed again (a service restarted, a retry loop): what lies before it is new.
    if text[max(0, end - len(anchor)) : end] == anchor:
        return LogChunk(text[end:], cursor, where)
    at = text.rfind(anchor, 0, end) if anchor else -1
    if at < 0:
        return LogChunk(text, cursor, where, skipped="the console's 64 KB window moved past the last read")
    return LogChunk(text[at + len(anchor) :], cursor, where)
