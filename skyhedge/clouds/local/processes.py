"""Replica processes of the local cloud: pid files, liveness, stopping, and finding strays.

A pid file alone is not proof: pids are reused. Each pid file therefore records the process's
start time as the kernel counts it (`/proc/<pid>/stat`, field 22), and a pid only counts as our
replica while that start time still matches. Zombies count as gone (the replica was reparented
away from us, and whoever adopted it may never reap it).

Every replica also carries `SKYHEDGE_LOCAL_RUNTIME=<runtime dir>` in its environment, so the
processes of one service can be found even without their pid files (crash between launch and
pid file, or a child that left the process group): see `find_processes`. That marker is the path
the replica was launched under: a state dir moved since holds pid files of processes marked with
its old path, and a copy of one (`cp -a`) pid files of processes its original records too;
`ownership` tells the two apart (the local cloud's render adopts the first, refuses the second).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

from skyhedge._procnet import LISTEN, local_port, open_files, socket_fds, tcp_rows

log = logging.getLogger(__name__)

REPLICAS_SUBDIR = "replicas"
RUNTIME_ENV = "SKYHEDGE_LOCAL_RUNTIME"
REPLICA_ENV = "SKYHEDGE_REPLICA_ID"
SERVICE_ENV = "SKYHEDGE_SERVICE"
#: The identity of the runtime dir a process was launched into (`runtime_identity`): what tells
#: this state dir's processes from another's that once had the same path (`moved_from`).
RUNTIME_ID_ENV = "SKYHEDGE_LOCAL_RUNTIME_ID"
#: In the runtime dir: the paths it had when replicas were launched into it (`remember_paths`).
PATHS_FILE = "paths.json"
#: How many of those paths are kept (the newest): a state dir is not moved that often.
PATHS_KEPT = 16
#: In `PATHS_FILE`, beside `paths`: path -> the IDs of the replicas launched under it by a release
#: before `RUNTIME_ID_ENV` that this runtime dir adopted (`unmarked_replicas`, `claim_replicas`).
UNMARKED_KEY = "unmarked"


@dataclass(frozen=True)
class LocalProcess:
    """What the launcher recorded about one running replica."""

    id: str
    pid: int
    pgid: int
    port: int
    zone: str
    market: str
    started_at: float
    starttime: int
    log: str
    #: The runtime dir whose replica this is (resolved): the launcher's, or the one that adopted it
    #: when the state dir was moved or restored (`ownership`). "" in pid files of earlier
    #: releases: the marker in the process's environment (`RUNTIME_ENV`) says then.
    runtime: str = ""

    @classmethod
    def from_json(cls, data: dict[str, object]) -> LocalProcess:
        # (a field with a default may be missing: a pid file of an earlier release)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})  # type: ignore[arg-type]


def replicas_dir(runtime_dir: Path) -> Path:
    return Path(runtime_dir) / REPLICAS_SUBDIR


def pid_path(runtime_dir: Path, replica_id: str) -> Path:
    return replicas_dir(runtime_dir) / f"{replica_id}.json"


def log_path(runtime_dir: Path, replica_id: str) -> Path:
    return replicas_dir(runtime_dir) / f"{replica_id}.log"


def _trusted(uid: int) -> bool:
    """Whether a file or folder owned by `uid` may be used: this account's, or root's (as
    `state.check_trusted` trusts a state dir)."""
    return uid in (os.geteuid(), 0)


def _what(name: str, dir_fd: int | None) -> int | None:
    """The type bits of `name` (relative to `dir_fd`), not following a link; None if it is gone."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return None


def _open_dir(name: str | Path, dir_fd: int | None, shown: Path, create: bool) -> int:
    """A descriptor on the folder `name` (relative to `dir_fd`), made if `create` and missing;
    refused (an OSError naming `shown`) when it is a symbolic link, another account's, or
    writable by every account without the sticky bit."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)
        return _open_dir(name, dir_fd, shown, create=False)
    except OSError as exc:
        mode = _what(str(name), dir_fd)
        if mode is not None and stat.S_ISLNK(mode):  # ELOOP
            why = f"{shown}: a symbolic link, not the folder skyhedge made: refused (links are not followed)"
            raise OSError(exc.errno, why, str(shown)) from None
        raise
    try:
        info = os.fstat(fd)
        if not _trusted(info.st_uid):
            why = f"{shown}: owned by another account (uid {info.st_uid}), not by you or root: refused"
            raise OSError(errno.EPERM, why, str(shown))
        if info.st_mode & 0o002 and not info.st_mode & 0o1000:
            why = f"{shown}: writable by every account (mode {info.st_mode & 0o7777:04o}): refused"
            raise OSError(errno.EPERM, why, str(shown))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_replicas_dir(runtime_dir: Path, *, create: bool = False) -> int:
    """A descriptor on `<runtime_dir>/replicas`, which logs and pid files are opened relative to
    (`dir_fd`), never by a path that could lead elsewhere. Made if `create` and missing.

    A `local/` or `replicas/` folder that is a symbolic link (a tool of the user's, or an account
    sharing the state dir's group, which `check_trusted` allows to write it, pointing it at a
    folder of its own) took every log, pid file and prune there: the launcher wrote the replicas'
    whole output into a file that account could read, a pid file it wrote there had skyhedge
    SIGKILL any process of the user's (`stop_replica`), and `prune_logs` deleted the `r-*.log` files
    of whatever folder it led to. One another account owns (made first in a group-writable state
    dir) is as much its own. Both are refused (an OSError whose `strerror` names the folder and
    why); the state dir itself may be a link (`runtime_dir` resolves it)."""
    runtime = Path(runtime_dir)
    top = open_runtime_dir(runtime, create=create)
    try:
        return _open_dir(REPLICAS_SUBDIR, top, runtime / REPLICAS_SUBDIR, create)
    finally:
        os.close(top)


def open_runtime_dir(runtime_dir: Path, *, create: bool = False) -> int:
    """A descriptor on `<runtime_dir>` itself (`local/`), refused as `open_replicas_dir` refuses it
    (a link, another account's, writable by all): the capacity file and its lock are opened
    relative to it (`capacity.py`), as logs and pid files are to `replicas/`."""
    runtime = Path(runtime_dir)
    if create:
        runtime.parent.mkdir(parents=True, exist_ok=True)
    return _open_dir(runtime, None, runtime, create)


def open_log(path: Path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor on the replica log at `path` (`log_path(...)`), opened with `flags`,
    never through a link: `open_log_at` in the replicas dir `open_replicas_dir` checked (made, with
    O_CREAT)."""
    dir_fd = open_replicas_dir(path.parent.parent, create=bool(flags & os.O_CREAT))
    try:
        return open_log_at(dir_fd, path.name, flags, path)
    finally:
        os.close(dir_fd)


def open_log_at(dir_fd: int, name: str, flags: int, shown: Path) -> int:
    """A file descriptor on the replica log `name` in the replicas dir open at `dir_fd`.

    The replicas dir is writable by whoever runs the replicas (and, for a group-writable state
    dir, by the group): a log replaced by a symbolic link to a file of the user running skyhedge
    (`~/.ssh/id_ed25519`, `~/.bashrc`) was printed by `skyhedge logs`, written through by the
    launcher (the replica's whole output appended to it) and truncated by the watcher's rotation.
    So it is opened with O_NOFOLLOW (O_NONBLOCK: a FIFO planted there must not hang the open),
    and only a regular file with a single link is used (a hard link is another name of someone's
    file). A log another account made in advance (its owner could read what the replica prints,
    or write what `skyhedge logs` shows) is refused too; opened to create (the launcher), it is
    replaced by a new one instead: a replica restarted under its ID still appends to its own.
    Refusals are OSErrors whose `strerror` says why in a few words."""
    try:
        fd = _open_file_at(dir_fd, name, flags, shown)
    except PermissionError:
        # one we may not open (another account's, mode 0644: the usual one), opened to create:
        # replaced all the same, or every launch of that ID failed for good ("Permission denied")
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            info = None
        if not flags & os.O_CREAT or info is None or not stat.S_ISREG(info.st_mode) or _trusted(info.st_uid):
            raise
        owner = info.st_uid
    else:
        try:
            owner = os.fstat(fd).st_uid
            if _trusted(owner):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    why = f"owned by another account (uid {owner}), not a log the launcher made: refused"
    if not flags & os.O_CREAT:
        raise OSError(errno.EPERM, why, str(shown))
    try:
        os.unlink(name, dir_fd=dir_fd)
        return _open_file_at(dir_fd, name, flags | os.O_EXCL, shown)
    except OSError as exc:  # (made again in between: EEXIST)
        raise OSError(exc.errno, f"{why} (and not replaced: {exc.strerror or exc})", str(shown)) from None


def _open_file_at(dir_fd: int, name: str, flags: int, shown: Path) -> int:
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        mode = _what(name, dir_fd)
        if mode is None:
            raise exc from None
        if stat.S_ISLNK(mode):  # ELOOP
            raise OSError(
                exc.errno, "a symbolic link, not a log the launcher made: refused", str(shown)
            ) from None
        if not stat.S_ISREG(mode):  # a FIFO without a reader to write to: ENXIO
            raise OSError(exc.errno, "not a regular file: refused", str(shown)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file: refused", str(shown))
        if info.st_nlink > 1:
            why = f"a file with {info.st_nlink} names (a hard link): refused"
            raise OSError(errno.EMLINK, why, str(shown))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def proc_starttime(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    state, starttime = rest[0], rest[19]
    if state in {"Z", "X"}:
        return None
    return int(starttime)


def read_pidfile(runtime_dir: Path, replica_id: str) -> LocalProcess | None:
    """The replica's pid file; None when there is none, or none to trust (`_read_pidfile_at`)."""
    try:
        dir_fd = open_replicas_dir(runtime_dir)
    except OSError:  # no replicas dir, or one refused: the launcher says why
        return None
    try:
        return _read_pidfile_at(dir_fd, replica_id)
    finally:
        os.close(dir_fd)


def _read_pidfile_at(dir_fd: int, replica_id: str) -> LocalProcess | None:
    """The pid file of `replica_id` in the replicas dir open at `dir_fd`: None when it is missing
    or unreadable, or is a link or another account's file (a pid file decides which process
    group a stop SIGKILLs: a forged one named any process of the user's)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (a FIFO there: no hang)
    try:
        fd = os.open(f"{replica_id}.json", flags, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode) or not _trusted(info.st_uid):
                return None
            return LocalProcess.from_json(json.loads(fh.read().decode("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_pidfile(runtime_dir: Path, proc: LocalProcess) -> None:
    """Write the replica's pid file whole (a temp file renamed over it), the temp file created
    new under a name no one can guess: a predictable name was opened through whatever link
    stood there (a runtime dir another account can write, e.g. a state dir under /tmp, let it
    point the launcher at any file the launcher may write). A write the disk refuses raises an
    OSError naming the pid file, and leaves no temp file behind (a watcher retrying each pass on
    a full disk left one per attempt)."""
    path = pid_path(runtime_dir, proc.id)
    data = (json.dumps(asdict(proc), indent=2, sort_keys=True) + "\n").encode("utf-8")
    try:
        dir_fd = open_replicas_dir(runtime_dir, create=True)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        _write_whole_at(dir_fd, path.name, lambda fh: fh.write(data), path)
    finally:
        os.close(dir_fd)


def _write_whole_at(dir_fd: int, name: str, write: Callable[[IO[bytes]], object], shown: Path) -> None:
    """Write `name` in the folder open at `dir_fd` whole: `write` fills a temp file made new under a
    name no one can guess, renamed over `name` (a link planted at `name` is replaced, never
    written through). An OSError names `shown`; no temp file is left behind."""
    try:
        fd, tmp = _new_temp_at(dir_fd, name)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(shown)) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, str(shown)) from exc
        raise


def _new_temp_at(dir_fd: int, name: str) -> tuple[int, str]:
    """A new file `.<name>.<random>.tmp` in the folder open at `dir_fd` (as `tempfile.mkstemp`)."""
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(tmp, flags, 0o600, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name")


def _unlink_at(runtime_dir: Path, names: Sequence[str]) -> None:
    """Remove `names` from the replicas dir, if it is one to trust (`open_replicas_dir`)."""
    try:
        dir_fd = open_replicas_dir(runtime_dir)
    except OSError:
        return
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _names(dir_fd: int, suffix: str) -> list[str]:
    """The `r-*<suffix>` entries of the folder open at `dir_fd`, sorted (as `glob` finds them)."""
    return sorted(n for n in os.listdir(dir_fd) if n.startswith("r-") and n.endswith(suffix))


def readopt(
    runtime_dir: Path,
    replica_id: str,
    *,
    port: int,
    zone: str,
    market: str,
    started_at: float,
    pids: Sequence[int] | None = None,
) -> LocalProcess | None:
    """The replica's process when its pid file is gone but the process runs on (the runtime dir
    or the file deleted by hand, `rm -rf .skyhedge/svc/local`), recorded again; None when no
    process of it runs. Found by the markers the launcher puts in its environment
    (`find_processes`), as `stop_replica` finds what left the group. Without it, a replica that
    still served was judged gone: routed around at once (503s), replaced, and then stopped."""
    # Only the process the launcher started counts, as only it was in the pid file: the leader
    # of a session of its own (`start_new_session`). Others carry the markers too: a child of it
    # (its leader gone, the replica is gone, as the pid file would say), what `run.setup` left in
    # the background (in the launcher's process group: the caller's own, Terraform's or the
    # watcher's, which stopping the replica would then SIGKILL) or a `setsid` helper of the
    # command (started after it: the earliest leader is the launcher's; one that outlived the
    # command cannot be told from it, and is taken for it).
    # `pids`: the replica's processes as `replica_processes` found them for every replica at once
    leaders = []
    for pid in find_processes(runtime_dir, replica_id) if pids is None else pids:
        with contextlib.suppress(OSError):
            leads = os.getsid(pid) == pid and os.getpgid(pid) == pid
            if leads and (starttime := proc_starttime(pid)) is not None:
                leaders.append((starttime, pid))
    if not leaders:
        return None
    starttime, pid = min(leaders)
    proc = LocalProcess(
        id=replica_id,
        pid=pid,
        pgid=pid,
        port=port,
        zone=zone,
        market=market,
        started_at=started_at,
        starttime=starttime,
        log=str(log_path(runtime_dir, replica_id)),
        runtime=str(Path(runtime_dir).resolve()),
    )
    write_pidfile(runtime_dir, proc)
    return proc


def list_pidfiles(runtime_dir: Path) -> list[LocalProcess]:
    try:
        dir_fd = open_replicas_dir(runtime_dir)
    except OSError:  # no replicas dir, or one refused (`read_pidfile`)
        return []
    try:
        procs = (_read_pidfile_at(dir_fd, name[: -len(".json")]) for name in _names(dir_fd, ".json"))
        return [proc for proc in procs if proc is not None]
    finally:
        os.close(dir_fd)


def is_running(proc: LocalProcess) -> bool:
    return proc_starttime(proc.pid) == proc.starttime


def owner_of(proc: LocalProcess) -> str | None:
    """The runtime dir `proc` is a replica of: its pid file's `runtime`, else (a pid file of an
    earlier release) the marker the launcher put in its environment; None when neither says."""
    return proc.runtime or _environ(proc.pid).get(RUNTIME_ENV)


@dataclass(frozen=True)
class Ownership:
    """Whose the running replicas recorded in a runtime dir are, when not plainly its own.

    `shared`: ID -> the runtime dir that records the very same process (pid and start time) as
    its own replica: this state dir is a copy of that one (`cp -a`), and two watchers would manage
    one set of processes (each stopping, replacing and routing them as its own); that runtime dir
    is found by the path the replica was launched under, or, when that records it no more, by the
    identity of the folder it was launched into (a copy of a moved state dir). `moved`: those
    recorded for a runtime dir that no longer records them (gone, or holding no pid file of that
    process) and launched into no other folder still there: the state dir was moved here (`mv`,
    a restore onto another path), so they are this one's."""

    shared: dict[str, str]
    moved: list[LocalProcess]


def ownership(runtime_dir: Path) -> Ownership:
    """`Ownership` of the running replicas whose pid files are in `runtime_dir` (one read of each
    pid file here and, for a replica recorded for another path, of that path's pid file). Cheap
    when nothing moved: an owner is only looked up for a pid file naming another runtime dir."""
    mine = str(Path(runtime_dir).resolve())
    identity = runtime_identity(runtime_dir)
    shared: dict[str, str] = {}
    moved: list[LocalProcess] = []
    for proc in list_pidfiles(runtime_dir):
        if not is_running(proc):
            continue
        owner = owner_of(proc)
        if owner is None or owner == mine:
            continue
        with contextlib.suppress(OSError):  # this very folder under another name: a link to it, or
            # a bind mount (`/mnt/x` bound to `/data`), which no resolve() sees through: its pid
            # files are these very files, and this state dir was refused as "a copy" of itself
            if os.path.samefile(owner, runtime_dir):
                continue
        if _records(Path(owner), proc):
            shared[proc.id] = owner
            continue
        # The path it was launched under records it no more: this state dir was moved here, or is
        # a copy of one that was (`mv state a; cp -a a c`: both hold the pid files, and by path
        # alone each took the replicas for its own). The runtime dir it was launched into, found
        # by its identity where it is now (one an earlier release launched: where its log is
        # open), is the judge: it records the very same process only if this one is a copy of it
        # (it is this folder itself, under `mv`).
        launched_into = _runtime_now(proc, runtime_dir, identity or "")
        if launched_into is not None and _records(launched_into, proc):
            shared[proc.id] = str(launched_into)
        else:
            moved.append(proc)
    return Ownership(shared, moved)


def _records(runtime_dir: Path, proc: LocalProcess) -> bool:
    """Whether `runtime_dir` has a pid file of the very process `proc` (pid and start time)."""
    theirs = read_pidfile(runtime_dir, proc.id)
    return theirs is not None and (theirs.pid, theirs.starttime) == (proc.pid, proc.starttime)


def _runtime_now(proc: LocalProcess, runtime_dir: Path, mine: str) -> Path | None:
    """The runtime dir replica `proc` was launched into, by the path it has now, when that is
    another folder than `runtime_dir` (identity `mine`) and still there: found among the files the
    process holds open (its log, under `replicas/`), which the kernel names at their path now.
    One carrying `RUNTIME_ID_ENV` names that folder by its identity; one an earlier release
    launched (none) by where its own log is open (`<runtime dir>/replicas/<ID>.log`: before, the
    copy of a state dir moved after an upgrade adopted the older release's replicas, recorded them
    as its own and stopped them at its next scale-down). None when it carries this one's identity
    (a `mv` keeps it), or that folder is gone (a move to another file system: a copy, then a
    delete) or cannot be seen: then its path is all there is to judge by, as before."""
    launched = _environ(proc.pid).get(RUNTIME_ID_ENV)
    if launched == mine and mine:
        return None
    try:
        targets = open_files(Path(f"/proc/{proc.pid}"))
    except OSError:
        return None
    seen: set[Path] = set()
    for target in targets:
        if target.endswith(" (deleted)"):
            continue
        if not launched:
            folder = Path(target).parent.parent
            if Path(target).name == f"{proc.id}.log" and Path(target).parent.name == REPLICAS_SUBDIR:
                with contextlib.suppress(OSError):
                    if not os.path.samefile(folder, runtime_dir):
                        return folder
            continue
        for folder in Path(target).parents:
            if folder in seen or folder == Path("/"):
                continue
            seen.add(folder)
            if runtime_identity(folder) == launched:
                return folder
    return None


def adopt(runtime_dir: Path, procs: Iterable[LocalProcess]) -> list[str]:
    """Record `procs` (`Ownership.moved`) as replicas of `runtime_dir` from now on (their pid
    files rewritten with it as `runtime`); returns their IDs. Why: their processes keep the marker
    of the path they were launched under, and a copy made later of this state dir must find that
    they are this one's (`ownership`), not the old path's, which no longer records them."""
    mine = str(Path(runtime_dir).resolve())
    done = []
    for proc in procs:
        write_pidfile(runtime_dir, replace(proc, runtime=mine, log=str(log_path(runtime_dir, proc.id))))
        done.append(proc.id)
    return sorted(done)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _marked(runtime_dir: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(pid, environment) of each live process (not this one) that the launcher marked as a
    replica of `runtime_dir`: one walk of /proc."""
    marker = str(Path(runtime_dir).resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        env = _environ(pid)
        if env.get(RUNTIME_ENV) == marker and proc_starttime(pid) is not None:
            yield pid, env


def replica_processes(runtime_dir: Path) -> dict[str, list[int]]:
    """`find_processes(runtime_dir, ID)` of every replica ID at once, in one walk of /proc: a pass
    that lost the pid files of many replicas (the runtime dir deleted by hand) walked every
    process's environment once per replica, 1,000 x 90 reads, 2.5 s of each `plan`."""
    found: dict[str, list[int]] = {}
    for pid, env in _marked(runtime_dir):
        rid = env.get(REPLICA_ENV)
        if rid is not None:
            found.setdefault(rid, []).append(pid)
    return {rid: sorted(pids) for rid, pids in found.items()}


def find_processes(runtime_dir: Path, replica_id: str | None = None) -> list[int]:
    """Live pids whose environment marks them as replicas of this runtime dir (optionally one ID)."""
    return sorted(
        pid for pid, env in _marked(runtime_dir) if replica_id is None or env.get(REPLICA_ENV) == replica_id
    )


def listening_sockets(ports: Iterable[int]) -> dict[int, set[int]]:
    """Port -> inodes of the TCP sockets listening on it (on any address, IPv4 or IPv6) in this
    network namespace, for the `ports` asked about (/proc/net/tcp and tcp6; empty without them)."""
    wanted = set(ports)
    found: dict[int, set[int]] = {}
    for fields in tcp_rows(Path("/proc/net")):
        with contextlib.suppress(ValueError, IndexError):
            if fields[3] == LISTEN and (port := local_port(fields)) in wanted:
                found.setdefault(port, set()).add(int(fields[9]))
    return found


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds open (empty when it cannot be read)."""
    try:
        return set(socket_fds(Path(f"/proc/{pid}")))
    except OSError:
        return set()


def foreign_listeners(runtime_dir: Path, ports: Mapping[str, int]) -> dict[str, str]:
    """Of this runtime dir's replicas `ports` (ID -> its port), those whose port another skyhedge
    replica listens on: one of another state dir (a service on this machine whose
    `local_base_port` range overlaps this one's) or another replica of this one. ID -> that
    replica, as `r-0001 of <its runtime dir>`.

    Why: a replica's port is free until its server binds it, and a model server loads its weights
    first (minutes), so another service's replica launched meanwhile can be handed that port and
    take it. Its probes answered 200 for ours: the watcher marked ours READY and routed this
    service's clients to the other service's model (measured: 63 of 465 requests through the
    router, until ours failed to bind). Only a listener positively known as another replica's (by
    the markers the launcher puts in its environment) counts: one this account cannot look into
    (docker-proxy forwarding `docker run -p $PORT:...`, root's) is nobody's, and judges nothing.
    Nothing is read for no `ports` (every replica READY); else one read of /proc/net/tcp (30 ms
    with 5,000 sockets open on the machine), and /proc is walked only when some port asked about
    has a listener: a pass looks while a replica loads, not once all are READY."""
    if not ports:
        return {}
    held = listening_sockets(ports.values())
    if not held:
        return {}
    wanted = set().union(*held.values())
    owners: dict[int, set[tuple[str, str]]] = {}
    groups: dict[int, set[int]] = {}  # inode -> process groups of its holders
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _environ(int(entry.name))
        runtime, rid = env.get(RUNTIME_ENV), env.get(REPLICA_ENV)
        if runtime is None or rid is None:
            continue
        for inode in _socket_inodes(int(entry.name)) & wanted:
            owners.setdefault(inode, set()).add((runtime, rid))
            with contextlib.suppress(OSError):
                groups.setdefault(inode, set()).add(os.getpgid(int(entry.name)))
    mine = str(Path(runtime_dir).resolve())
    # A replica's own process, as its pid file here records it, is ours whatever its marker says:
    # one launched before the state dir was moved carries the old path (`ownership`), and was
    # judged another service's replica holding our port (GONE, replaced) as soon as it was not
    # READY (a probe failing once). So is a process carrying the marker its recorded process
    # carries (that old path): a server's worker in a process group of its own (setsid) binds the
    # port for it, and was judged "r-0001 of <old path>" after every move
    recorded = {rid: proc for rid in ports if (proc := read_pidfile(runtime_dir, rid)) and is_running(proc)}
    out: dict[str, str] = {}
    for rid, port in ports.items():
        holders = {who for inode in held.get(port, ()) for who in owners.get(inode, ())}
        if (proc := recorded.get(rid)) is not None:
            if any(proc.pgid in groups.get(inode, ()) for inode in held.get(port, ())):
                continue
            if (_environ(proc.pid).get(RUNTIME_ENV), rid) in holders:
                continue
        if holders and (mine, rid) not in holders:
            runtime, other = min(holders)
            out[rid] = f"{other} of {'this service' if runtime == mine else runtime}"
    return out


def _signal(pids: list[int], pgid: int | None, sig: signal.Signals) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: list[int], pgid: int | None, leader: LocalProcess | None) -> bool:
    if leader is not None and is_running(leader):
        return True
    return any(proc_starttime(p) is not None for p in pids)


def _strays(runtime_dir: Path, replica_id: str, leader: LocalProcess | None) -> list[int]:
    """The processes carrying `replica_id`'s markers: this runtime dir's and, for a replica
    launched under the path a moved state dir had (`adopt`), its leader's. Why: a worker in a
    session of its own (setsid) or what `run.setup` left in the background carries the old path,
    and outlived the replica's stop after every move (holding its port, and a GPU's memory).
    With no leader left to ask (it crashed, its worker ran on), the processes this runtime dir
    launched under a path it had before (`moved_from`, `_launched_here`) are looked at: the worker
    outlived `destroy` else."""
    markers = {str(Path(runtime_dir).resolve())}
    marker = None if leader is None else _environ(leader.pid).get(RUNTIME_ENV)
    if marker is not None:
        markers.add(marker)
    accept = _launched_here(runtime_dir, moved_from(runtime_dir)) if marker is None else None
    return sorted(
        pid
        for pid, env in _marked_any(markers | set(accept.olds if accept else ()), accept)
        if env.get(REPLICA_ENV) == replica_id
    )


def runtime_identity(runtime_dir: Path) -> str | None:
    """`device:inode` of the runtime dir (not followed if a link), which its processes carry
    (`RUNTIME_ID_ENV`); None when it cannot be read. A `mv` within a file system keeps it, a copy
    (`cp -a`) or another state dir made later at the same path has its own. Why: a path alone
    did not say whose a process is, once a state dir was moved away and another made there (and
    moved on in turn): both listed the path in `paths.json`, and each one's sweep stopped the
    other's processes carrying it (measured: a launch of r-0001 killed the other's r-0001)."""
    try:
        st = os.stat(runtime_dir, follow_symlinks=False)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


@dataclass(frozen=True)
class _LaunchedHere:
    """Which processes carrying an earlier path (`olds`) this runtime dir launched: those whose
    `RUNTIME_ID_ENV` is its identity (`runtime_identity`); a process carrying one of this runtime
    dir's own current markers is judged by its path, as before. One with no `RUNTIME_ID_ENV` (an
    earlier release launched it) is this runtime dir's only if it carries the ID of a replica that
    this runtime dir adopted from that path (`unmarked`): else it may be another state dir's that
    was at that path, and is left alone."""

    olds: frozenset[str]
    identity: str | None
    unmarked: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __call__(self, env: Mapping[str, str]) -> bool:
        path = env.get(RUNTIME_ENV)
        if path not in self.olds:
            return True
        if RUNTIME_ID_ENV not in env:
            return env.get(REPLICA_ENV) in self.unmarked.get(path, frozenset())
        return self.identity is not None and env.get(RUNTIME_ID_ENV) == self.identity


def _launched_here(runtime_dir: Path, olds: Iterable[str]) -> _LaunchedHere:
    olds = frozenset(olds)
    unmarked = {path: frozenset(ids) for path, ids in _read_record(runtime_dir)[1].items() if path in olds}
    return _LaunchedHere(olds, runtime_identity(runtime_dir), unmarked)


def _read_paths(runtime_dir: Path) -> list[str]:
    """The paths `PATHS_FILE` lists, oldest first; none when it is missing, unreadable, or not a
    file to trust (a link, another account's: it decides which processes a destroy stops)."""
    return _read_record(runtime_dir)[0]


def _read_record(runtime_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """`PATHS_FILE` read: its paths (`_read_paths`) and, of those, the ones replicas an earlier
    release launched were adopted from, with their IDs (`UNMARKED_KEY`); both empty when it is
    not a file to trust."""
    try:
        dir_fd = open_runtime_dir(runtime_dir)
    except OSError:
        return [], {}
    try:
        fd = _open_file_at(dir_fd, PATHS_FILE, os.O_RDONLY, Path(runtime_dir) / PATHS_FILE)
        with os.fdopen(fd, "rb") as fh:
            if not _trusted(os.fstat(fh.fileno()).st_uid):
                return [], {}
            raw = fh.read()
        data = json.loads(raw.decode("utf-8"))
        paths, unmarked = data.get("paths"), data.get(UNMARKED_KEY)
    except OSError:
        return [], {}
    except (ValueError, AttributeError, RecursionError):  # (`[[[[...`: RecursionError, a traceback)
        log.warning(
            "%s: not a JSON object of paths: ignored (rewritten at the next launch; a process "
            "launched under a path it listed is no longer found once its replica is gone)",
            Path(runtime_dir) / PATHS_FILE,
        )
        return [], {}
    finally:
        os.close(dir_fd)
    paths = [p for p in paths if isinstance(p, str) and os.path.isabs(p)] if isinstance(paths, list) else []
    ids = {
        path: sorted({i for i in rids if isinstance(i, str)})
        for path, rids in (unmarked.items() if isinstance(unmarked, dict) else ())
        if path in paths and isinstance(rids, list)
    }
    return paths, {path: rids for path, rids in ids.items() if rids}


def remember_paths(
    runtime_dir: Path, also: Iterable[str] = (), unmarked: Mapping[str, Iterable[str]] | None = None
) -> None:
    """Add the path `runtime_dir` has now (resolved), and `also` (the paths replicas adopted here
    were launched under), to its `PATHS_FILE` (the newest `PATHS_KEPT`; written only when that
    changes it). The launcher calls it at each launch. Why: a replica's processes carry the path
    they were launched under (`RUNTIME_ENV`), and once the state dir was moved and its pid files
    rewritten (`adopt`), nothing in it said that path any more: `destroy` stopped only what
    carried the new one, and a worker of a crashed replica launched before the move ran on.

    `unmarked`: path -> IDs of replicas adopted here that a release before `RUNTIME_ID_ENV`
    launched under it (`unmarked_replicas`); kept with the path. Why: their processes carry no
    identity, and without it a crashed one's setsid worker outlived its replacement and `destroy`
    of a state dir moved after the upgrade (measured: `sleep` workers of the older release's
    replicas ran on after `destroy` exited 0)."""
    mine = str(Path(runtime_dir).resolve())
    known, known_unmarked = _read_record(runtime_dir)
    adopted = list(dict.fromkeys(also))
    paths = [p for p in known if p != mine and p not in adopted] + [*adopted, mine]
    paths = [p for p in dict.fromkeys(paths) if os.path.isabs(p)][-PATHS_KEPT:]
    merged = {p: set(ids) for p, ids in known_unmarked.items()}
    for path, ids in (unmarked or {}).items():
        merged.setdefault(path, set()).update(ids)
    kept = {p: sorted(merged[p]) for p in paths if merged.get(p)}
    if paths == known and kept == known_unmarked:
        return
    record: dict[str, object] = {"paths": paths}
    if kept:
        record[UNMARKED_KEY] = kept
    data = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    dir_fd = open_runtime_dir(runtime_dir, create=True)
    try:
        _write_whole_at(dir_fd, PATHS_FILE, lambda fh: fh.write(data), Path(runtime_dir) / PATHS_FILE)
    finally:
        os.close(dir_fd)


def unmarked_replicas(procs: Iterable[LocalProcess]) -> dict[str, list[str]]:
    """Of the running replicas `procs` (`Ownership.moved`), those a release before
    `RUNTIME_ID_ENV` launched (none in their environment), by the path they carry (`RUNTIME_ENV`):
    path -> IDs, for `remember_paths`."""
    found: dict[str, set[str]] = {}
    for proc in procs:
        env = _environ(proc.pid)
        path = env.get(RUNTIME_ENV)
        if path and RUNTIME_ID_ENV not in env:
            found.setdefault(path, set()).add(env.get(REPLICA_ENV) or proc.id)
    return {path: sorted(ids) for path, ids in found.items()}


def forget_paths(runtime_dir: Path) -> None:
    """Remove the `PATHS_FILE` (a destroy stopped everything carrying any of its paths)."""
    try:
        dir_fd = open_runtime_dir(runtime_dir)
    except OSError:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PATHS_FILE, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def moved_from(runtime_dir: Path) -> list[str]:
    """The paths this runtime dir had before it moved (`remember_paths`) at which nothing is now:
    processes still carrying one of those markers can only be this one's. One that holds a file or
    folder again (a state dir made anew there, a copy left behind) may be another's: left out."""
    mine = str(Path(runtime_dir).resolve())
    return [p for p in _read_paths(runtime_dir) if p != mine and not os.path.lexists(p)]


def _marked_any(
    runtime_dirs: Iterable[str], accept: Callable[[Mapping[str, str]], bool] | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
    """`_marked` of several runtime dirs (resolved paths) in one walk of /proc; only the
    processes `accept` takes, when given (`_LaunchedHere`)."""
    markers = set(runtime_dirs)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = _environ(int(entry.name))
        if (
            env.get(RUNTIME_ENV) in markers
            and (accept is None or accept(env))
            and proc_starttime(int(entry.name)) is not None
        ):
            yield int(entry.name), env


def moved_strays(runtime_dir: Path, service: str) -> list[int]:
    """The live processes of `service` that this runtime dir launched under a path it had before
    it moved (`moved_from`; `RUNTIME_ID_ENV` says which runtime dir launched them): `kill_all` of
    the runtime dir finds only those carrying its path now. One carrying such a path that another
    state dir launched (made at that path after this one left it) is not this one's."""
    olds = moved_from(runtime_dir)
    if not olds:
        return []
    accept = _launched_here(runtime_dir, olds)
    return sorted(pid for pid, env in _marked_any(olds, accept) if env.get(SERVICE_ENV) == service)


def stop_replica(runtime_dir: Path, replica_id: str, *, grace: float = 10.0) -> bool:
    """Stop a replica: SIGTERM its process group (and strays carrying its ID), SIGKILL after `grace`.

    Returns True if something was running. Safe to repeat: a replica already gone is a no-op.
    """
    leader = read_pidfile(runtime_dir, replica_id)
    if leader is not None and not is_running(leader):
        leader = None
    pgid = leader.pgid if leader is not None else None
    strays = _strays(runtime_dir, replica_id, leader)
    if leader is None and not strays:
        _unlink_at(runtime_dir, [f"{replica_id}.json"])
        return False
    _signal(strays, pgid, signal.SIGTERM)
    # A stopped process (SIGSTOP, a debugger, a replica hung that way on purpose) acts on no
    # signal but SIGKILL until continued: without this it waited out the whole grace, then died
    # without its shutdown (measured: the apply replacing one took 10.7 s instead of ~1 s). As
    # systemd does, continue it so that it gets its SIGTERM now.
    _signal(strays, pgid, signal.SIGCONT)
    deadline = time.monotonic() + max(grace, 0.0)
    while _alive(strays, pgid, leader) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(strays, pgid, leader):
        _signal(strays + _strays(runtime_dir, replica_id, leader), pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _alive(strays, pgid, leader) and time.monotonic() < deadline:
            time.sleep(0.05)
    _unlink_at(runtime_dir, [f"{replica_id}.json"])
    return True


def stop_unrecorded(runtime_dir: Path) -> list[str]:
    """Stop what launches cut short left running: processes of this runtime dir whose replica has
    no running pid file (a `run.setup`, or what it started, whose launcher Terraform killed when
    an apply was interrupted). A replica's pid file is written as its command starts, so a
    recorded replica is never touched. Returns the replica IDs stopped."""
    ids: set[str] = set()
    for pid in find_processes(runtime_dir):
        rid = _environ(pid).get(REPLICA_ENV)
        if rid:
            ids.add(rid)
    stopped = []
    for rid in sorted(ids):
        proc = read_pidfile(runtime_dir, rid)
        if proc is None or not is_running(proc):
            stop_replica(runtime_dir, rid, grace=0.0)
            stopped.append(rid)
    return stopped


#: The logs of gone replicas (no pid file) a watcher keeps for `skyhedge logs`, newest first: at
#: most this many, and at most `GONE_LOGS_BYTES` together (a log and its rotated `.log.1`). The
#: newest is kept whatever its size, so that the replica that just went (preempted, crashed) can
#: always be read. Live replicas' logs are not counted: rotation bounds each (`rotate_logs`).
GONE_LOGS_KEPT = 100
GONE_LOGS_BYTES = 256 * 2**20


def prune_logs(
    runtime_dir: Path,
    keep: set[str],
    *,
    max_count: int = GONE_LOGS_KEPT,
    max_bytes: int = GONE_LOGS_BYTES,
) -> list[str]:
    """Remove the logs of replicas that do not run (no pid file) beyond what is kept: those not
    in `keep` (the IDs the state records), then the oldest (by last write) past `max_count` logs
    or `max_bytes` bytes together; returns the IDs removed.

    A replica's log outlives it, for `skyhedge logs` of a replica just preempted and for
    post-mortems; but every launch writes a new one (IDs are never reused), so without this a
    churny fleet's folder grew by a file per replica for as long as the service ran, and the
    state's 500 gone replicas could hold 500 logs of up to 128 MiB each (a log and its `.1`)."""
    try:
        dir_fd = open_replicas_dir(runtime_dir)
    except OSError:  # none yet, or refused (a link, another account's): nothing of ours to prune
        return []
    try:
        return _prune_at(dir_fd, keep, max_count, max_bytes)
    finally:
        os.close(dir_fd)


def _prune_at(dir_fd: int, keep: set[str], max_count: int, max_bytes: int) -> list[str]:
    """`prune_logs` in the replicas dir open at `dir_fd`: every name relative to it."""
    gone: list[tuple[float, int, str, list[str]]] = []  # (last write, bytes, id, files)
    removed = []
    for name in _names(dir_fd, ".log"):
        rid = name[: -len(".log")]
        if _stat_at(dir_fd, f"{rid}.json") is not None:
            continue
        files = [name, f"{name}.1"]  # its rotated part goes with it
        if rid not in keep:
            _unlink_names(dir_fd, files)
            removed.append(rid)
            continue
        sizes = [st for f in files if (st := _stat_at(dir_fd, f)) is not None]
        if sizes:
            gone.append((max(st.st_mtime for st in sizes), sum(st.st_size for st in sizes), rid, files))
    total = 0
    for i, (_, size, rid, files) in enumerate(sorted(gone, reverse=True)):
        total += size
        if i > 0 and (i >= max_count or total > max_bytes):
            _unlink_names(dir_fd, files)
            removed.append(rid)
    return sorted(removed)


def _stat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _unlink_names(dir_fd: int, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


#: A running local replica's log past this size is rotated by `rotate_logs`.
LOG_ROTATE_BYTES = 64 * 2**20


def rotate_logs(runtime_dir: Path, max_bytes: int = LOG_ROTATE_BYTES) -> list[str]:
    """Rotate the logs of replicas past `max_bytes`: copied to `<id>.log.1` (replacing the one
    before), then truncated in place, since the replica's process keeps writing to the file it
    was started with (appending: its next line lands at the new start). A chatty server running
    for weeks filled the disk. Lines written between the copy and the truncation are lost, as
    with logrotate's copytruncate; on a disk too full for the copy, the old `.1` goes first, and
    if that is not room enough the log is truncated uncopied (`_copy_keeping_room`). Returns the
    IDs rotated."""
    try:
        dir_fd = open_replicas_dir(runtime_dir)
    except OSError:  # none yet, or refused: `skyhedge logs` says why
        return []
    rotated = []
    try:
        for name in _names(dir_fd, ".log"):
            shown = replicas_dir(runtime_dir) / name
            try:
                fd = open_log_at(dir_fd, name, os.O_RDWR, shown)  # a link there is neither copied nor cut
            except OSError:
                continue  # gone, or refused: `skyhedge logs` says why
            try:
                if os.fstat(fd).st_size <= max_bytes:
                    continue
                _copy_keeping_room(dir_fd, f"{name}.1", fd, shown)
                os.ftruncate(fd, 0)
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
            rotated.append(name[: -len(".log")])
    finally:
        os.close(dir_fd)
    return sorted(rotated)


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _copy_keeping_room(dir_fd: int, name: str, src: int, shown: Path) -> None:
    """Copy the log open at `src` to `name` (`<id>.log.1`) in the folder open at `dir_fd`, on a
    disk too full for it (often full of these very logs) after dropping the generation `name`
    holds; failing that too, no copy: the log is truncated with its lines lost. Before, the
    copy's ENOSPC stopped the rotation before the truncation, so a disk the logs filled stayed
    full, and every launch and state write of the watcher failed with it."""
    for attempt in range(2):
        try:
            _write_whole_at(dir_fd, name, lambda out: _copy_whole(src, out), shown)
            return
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
        if attempt == 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)


def _copy_whole(src: int, out: IO[bytes]) -> None:
    """Copy the file open at `src` to `out`, from its start (into a temp file `_write_whole_at`
    renames over `<id>.log.1`, so that a link planted there is replaced, never written through)."""
    with os.fdopen(os.dup(src), "rb") as inp:
        inp.seek(0)
        while chunk := inp.read(1 << 20):
            out.write(chunk)


def kill_all(runtime_dir: Path, also: Iterable[int] = ()) -> list[int]:
    """SIGKILL every process of this runtime dir at once (test teardown, `destroy` safety net),
    and `also` (`moved_strays`), and remove the pid files left without a process (a crash skips
    the launcher's own cleanup)."""
    pids = set(find_processes(runtime_dir)) | set(also)
    groups = {p.pgid for p in list_pidfiles(runtime_dir) if is_running(p)}
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(proc_starttime(p) is not None for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for proc in list_pidfiles(runtime_dir):
        if not is_running(proc):
            _unlink_at(runtime_dir, [f"{proc.id}.json"])
    return sorted(pids)
