"""An AWS replica's log: its instance's console output (EC2 GetConsoleOutput).

EC2 keeps the newest 64 KB of the serial console. `Latest=True` reads it as it is now; instance
types that cannot do that (Xen, older generations) give the output buffered at the last state
change instead. The console is a window that slides, so a byte offset means nothing from one read
to the next: the cursor is the end of the previous read's text, and a read shows what follows it
(the whole window, marked skipped, when that end has slid out of it).
"""

from __future__ import annotations

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
    if not record.cloud_id:
        raise CloudError(f"{record.id}: no EC2 instance recorded yet (not applied, or not created)")
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    session = SESSION or new_session()
    ec2 = session.client(
        "ec2",
        region_name=record.region,
        config=Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 3}),
    )
    where = f"EC2 console output of {record.cloud_id} ({record.region})"
    try:
        try:
            reply = ec2.get_console_output(InstanceId=record.cloud_id, Latest=True)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "UnsupportedOperation":
                raise
            reply = ec2.get_console_output(InstanceId=record.cloud_id)  # not Nitro: the buffered one
    except ClientError as exc:
        error = exc.response.get("Error", {})
        what = f"{error.get('Code')}: {error.get('Message')}"
        raise CloudError(f"aws: {record.id}: GetConsoleOutput {record.cloud_id}: {what}") from None
    except BotoCoreError as exc:
        raise CloudError(f"aws: {record.id}: GetConsoleOutput {record.cloud_id}: {exc}") from None
    text = str(reply.get("Output") or "")  # botocore decodes the base64
    return _after(text, start, where)


#: How much of the previous read's end the cursor keeps: enough to be found once only.
ANCHOR_CHARS = 256


def _after(text: str, start: object, where: str) -> LogChunk:
    cursor = text[-ANCHOR_CHARS:]
    if not start or not isinstance(start, str):
        return LogChunk(text, cursor, where)
    at = text.rfind(start)
    if at < 0:
        return LogChunk(text, cursor, where, skipped="the console's 64 KB window moved past the last read")
    return LogChunk(text[at + len(start) :], cursor, where)
