"""A replica's log, read through its cloud (`skyhedge logs`).

Each cloud folder may have a `logs.py` defining `read_log(spec, state_dir, record, start)`, which
returns a `LogChunk`: the text after the cursor `start` (the `next` of the previous read), or,
with `start=None`, the most recent part (at most `RECENT_BYTES`). A cursor is the cloud's own:
a byte offset for a file or GCP's serial port, the end of the previous text for EC2's console.
What each cloud has to show:

- local: the replica process's own stdout and stderr (`<state dir>/local/replicas/<id>.log`);
- aws: the instance's console output (EC2 GetConsoleOutput, the newest 64 KB): the boot log with
  the boot script's errors, which is where a replica that never gets READY shows why;
- gcp: serial port 1 (getSerialPortOutput), the same boot log, read on from `start` as it grows.

On a VM the service's own output goes to the journal (`journalctl -u skyhedge-replica` on the
machine), not to the console: writes to a serial console block at its baud rate, and a server
logging every request would be slowed down by them.

Adding a cloud's logs is adding its `logs.py`; this module only finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from skyhedge.clouds import cloud_module
from skyhedge.errors import CloudError

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ReplicaRecord

#: How much of a log `start=None` reads: what a terminal can show, not a week of a server's output.
RECENT_BYTES = 1 << 20


@dataclass(frozen=True)
class LogChunk:
    """`text` read from the log; `next`: the cursor the following read starts from; `source`: what was read
    (a path, an instance's console), for the header; `skipped`: why output before `text` is not
    shown, when some is not (`start=None` on a long log, a log truncated since the last read, a
    cloud's buffer that let it go); empty when `text` follows the cursor (or starts the log)."""

    text: str
    next: object
    source: str
    skipped: str = ""


def read_log(spec: ServiceSpec, state_dir: Path, record: ReplicaRecord, start: object = None) -> LogChunk:
    """The log of `record` through its cloud's `logs.py` (a CloudError when the cloud has none)."""
    module = cloud_module(record.cloud, "logs")
    if module is None:
        raise CloudError(f"{record.cloud}: skyhedge cannot read replica logs on this cloud")
    chunk: LogChunk = module.read_log(spec, state_dir, record, start)
    return chunk


def last_lines(text: str, count: int | None) -> str:
    """The last `count` lines of `text` (all of it for None), keeping a final partial line. Lines
    end at a line feed only, as `tail -n` counts them: a progress bar's carriage returns (a model
    download), form feeds or other separators `str.splitlines` knows do not end one."""
    if count is None:
        return text
    if count <= 0:
        return ""
    cut = len(text) - 1 if text.endswith("\n") else len(text)
    for _ in range(count):
        cut = text.rfind("\n", 0, cut)
        if cut < 0:
            return text
    return text[cut + 1 :]


__all__ = ["RECENT_BYTES", "LogChunk", "last_lines", "read_log"]
