"""A local replica's log: its process's stdout and stderr, as the launcher redirected them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from skyhedge.clouds.local import runtime_dir
from skyhedge.clouds.local.processes import GONE_LOGS_BYTES, GONE_LOGS_KEPT, log_path, open_log
from skyhedge.errors import CloudError
from skyhedge.replica_logs import RECENT_BYTES, LogChunk

if TYPE_CHECKING:
    from skyhedge.spec import ServiceSpec
    from skyhedge.state import ReplicaRecord


def read_log(spec: ServiceSpec, state_dir: Path, record: ReplicaRecord, start: object) -> LogChunk:
    """From byte `start` (None: the last RECENT_BYTES). A log shorter than `start` was truncated or
    replaced since (a relaunch under the same ID): it is read again from its beginning."""
    path = log_path(runtime_dir(state_dir), record.id)
    start = start if isinstance(start, int) else None
    try:
        # never through a link planted in its place: it printed whatever file it pointed to
        with os.fdopen(open_log(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            skipped = ""
            if start is None:
                start = max(0, size - RECENT_BYTES)
                if start:
                    skipped = f"the last {RECENT_BYTES:,} of {size:,} bytes: the whole log is that file"
            elif start > size:
                start, skipped = 0, "the log was cut or replaced since the last read: read from its start"
            f.seek(start)
            data = f.read(max(0, size - start))
    except FileNotFoundError:
        if record.provisioned_at is None and record.ready_at is None:
            raise CloudError(f"{record.id}: no log yet (its process was never started): {path}") from None
        kept = (
            f" (a watcher keeps the logs of the {GONE_LOGS_KEPT} most recently gone replicas, "
            f"{GONE_LOGS_BYTES // 2**20} MiB at most)"
            if record.gone_at is not None
            else ""
        )
        raise CloudError(f"{record.id}: its log is gone{kept}: {path}") from None
    except OSError as exc:
        raise CloudError(f"{record.id}: cannot read its log {path}: {exc.strerror or exc}") from None
    data = _whole_characters(data)  # the rest of a character being written comes with the next read
    end = start + len(data)
    if data and start > 0 and skipped:  # cut at a line start: half a line reads as garbage
        cut = data.find(b"\n")
        data = data[cut + 1 :] if cut >= 0 else data
    return LogChunk(text=data.decode("utf-8", errors="replace"), next=end, source=str(path), skipped=skipped)


def _whole_characters(data: bytes) -> bytes:
    """`data` without a UTF-8 character cut at its end (a follow reads while the process writes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead
            continue
        need = 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4 if byte >> 3 == 0b11110 else 1
        return data[:-back] if need > back else data
    return data
