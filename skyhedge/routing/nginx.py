"""The nginx binary and its processes: find it, test a config, start it, and look at its workers.

Worker processes are read from /proc (Linux): after a reload the old generation of workers
finishes its in-flight requests and exits, which is exactly the "drained" signal `Router.drain`
needs. nginx is started as a daemon, so its master is not our child: "alive" means a /proc entry
that is not a zombie (a container's init may never reap it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import ipaddress
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from skyhedge._procnet import LISTEN, local_port, open_files, tcp_rows
from skyhedge._procnet import socket_fds as listed_socket_fds
from skyhedge.errors import RoutingError
from skyhedge.routing.config import RouterPaths

_FALLBACKS = (
    "/usr/sbin/nginx",
    "/usr/local/sbin/nginx",
    "/usr/local/nginx/sbin/nginx",
    "/opt/homebrew/bin/nginx",
)
_PROC = Path("/proc")
CAN_SEE_WORKERS = (_PROC / "self" / "stat").is_file()


def find_nginx(explicit: str | None = None) -> str:
    """`explicit`, else $SKYHEDGE_NGINX, else nginx on PATH, else the usual sbin locations."""
    wanted = explicit or os.environ.get("SKYHEDGE_NGINX")
    if wanted:
        found = shutil.which(wanted)
        if not found:
            source = "" if explicit else " (from $SKYHEDGE_NGINX)"
            raise RoutingError(f"nginx binary {wanted!r}{source} not found or not executable")
        return found
    found = shutil.which("nginx")
    if found:
        return found
    for path in _FALLBACKS:
        if os.access(path, os.X_OK):
            return path
    raise RoutingError(
        "nginx not found on PATH or in /usr/sbin: install it (Debian/Ubuntu: apt-get install nginx-light) "
        "or set SKYHEDGE_NGINX to its path"
    )


@functools.lru_cache(maxsize=8)
def has_stub_status(binary: str) -> bool:
    """Whether this nginx was built with the stub_status module (Debian's nginx and nginx-light are)."""
    try:
        out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--with-http_stub_status_module" in out.stderr + out.stdout


# Linux file capabilities (`setcap cap_net_bind_service=+ep nginx`): struct vfs_cap_data, little
# endian: magic_etc (revision | the effective flag), then the permitted set's low 32 bits.
_CAP_NET_BIND_SERVICE = 10
_VFS_CAP_FLAGS_EFFECTIVE = 0x000001


@functools.lru_cache(maxsize=8)
def binds_low_ports(binary: str) -> bool:
    """Whether this nginx may bind ports below 1024 whoever runs it: its file carries
    CAP_NET_BIND_SERVICE, permitted and effective (the usual way to serve :80 or :443 without
    root). Why: the router's port check binds in this process, which lacks that capability, so
    without asking the binary it refused a port nginx itself binds."""
    try:
        raw = os.getxattr(binary, "security.capability")
    except (OSError, AttributeError):  # no capabilities, no xattr support, not Linux
        return False
    if len(raw) < 8:
        return False
    magic = int.from_bytes(raw[0:4], "little")
    permitted = int.from_bytes(raw[4:8], "little")
    return bool(magic & _VFS_CAP_FLAGS_EFFECTIVE and permitted & (1 << _CAP_NET_BIND_SERVICE))


def _base_args(binary: str, paths: RouterPaths, conf: Path) -> list[str]:
    # -e: the error log before the config is read, so nginx never touches /var/log/nginx.
    return [binary, "-p", f"{paths.prefix}/", "-c", str(conf), "-e", str(paths.error_log)]


def ensure_dirs(paths: RouterPaths) -> None:
    for d in (paths.conf.parent, paths.logs, paths.temp):
        d.mkdir(parents=True, exist_ok=True)


def check_config(binary: str, paths: RouterPaths, conf: Path) -> None:
    """`nginx -t` on `conf`; RoutingError carrying nginx's own text when it refuses it."""
    try:
        out = subprocess.run(
            [*_base_args(binary, paths, conf), "-t", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RoutingError(f"cannot run {binary} -t: {exc}") from exc
    if out.returncode != 0:
        raise RoutingError(
            f"nginx refused the new configuration ({conf})", stderr=(out.stderr or out.stdout).strip()
        )


def start(binary: str, paths: RouterPaths) -> None:
    """Start the nginx master (it daemonizes); RoutingError with nginx's text if it cannot."""
    # stderr goes to a file, not a pipe: the daemon inherits it and a pipe would never reach EOF.
    with tempfile.TemporaryFile(mode="w+") as err:
        try:
            rc = subprocess.run(
                _base_args(binary, paths, paths.conf),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=30,
                check=False,
                start_new_session=True,
            ).returncode
        except (OSError, subprocess.SubprocessError) as exc:
            raise RoutingError(f"cannot start {binary}: {exc}") from exc
        err.seek(0)
        text = err.read().strip()
    if rc != 0:
        raise RoutingError(
            f"nginx failed to start (exit {rc})", stderr="\n".join(_collapse_repeats(text.splitlines()))
        )


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (state, ppid, pgrp, ...; Linux), or None when there is no
    such process (or no /proc). The command name (field 2) may hold spaces or parentheses, so the
    fields are counted from its last ')'."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    return raw.rsplit(")", 1)[1].split()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, process group) of a process, or None when it does not exist."""
    fields = stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[1]), int(fields[2]))


def alive(pid: int) -> bool:
    if not _PROC.is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return (
            (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        )
    except OSError:
        return ""


def is_master(pid: int, conf: Path) -> bool:
    """Whether `pid` is a live nginx master started with `conf` (not a recycled pid)."""
    if not alive(pid):
        return False
    if not _PROC.is_dir():
        return True
    return _master_of(cmdline(pid), conf)


def _master_of(cmd: str, conf: Path) -> bool:
    """Whether the command line `cmd` (an nginx master's title: `nginx: master process BINARY -p
    PREFIX -c CONF -e LOG`, `_base_args`) is that of a master started with `conf`: its `-c`
    argument whole. Why: `conf` found anywhere in it took the router of the state dir
    `/home/u/srv/svc` for that of `/srv/svc` (the one path ends the other): a pid file of
    `/srv/svc`'s dead router naming a pid reused by the other's master had `routing down`,
    `destroy` and `routing reload` of one service stop, or reload, the other's router."""
    return "nginx: master process " in cmd and f" -c {conf} " in f"{cmd} "


def master_conf(pid: int) -> Path | None:
    """The config file (`-c`) the live nginx master `pid` was started with (`_base_args`), or None
    (not an nginx master, gone, or a command line this account cannot read)."""
    if not alive(pid):
        return None
    cmd = cmdline(pid)
    if not cmd.startswith("nginx: master process "):
        return None
    found = re.search(r" -c (.+?) -e ", cmd) or re.search(r" -c (\S+)", cmd)
    return Path(found.group(1)) if found else None


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP socket listening on `port` (any address; its network
    namespace's /proc/<pid>/net/tcp and tcp6, and its descriptors); False when it cannot be told."""
    inodes = set(socket_fds(pid))
    if not inodes:
        return False
    for fields in tcp_rows(_PROC / str(pid) / "net"):
        with contextlib.suppress(ValueError, IndexError):
            if fields[3] == LISTEN and local_port(fields) == port and int(fields[9]) in inodes:
                return True
    return False


def held_folders(pid: int) -> list[Path] | None:
    """The folders of the files process `pid` holds open (an nginx master: its logs), as the
    kernel names them now: a folder renamed since (`mv` of a state dir) by its new path, so
    that they say whose the process is where its command line (`-c`) names where it was started;
    None when its descriptors cannot be read (gone, another account's)."""
    try:
        targets = open_files(_PROC / str(pid))
    except OSError:
        return None
    return [Path(target.removesuffix(" (deleted)")).parent for target in targets]


def masters_of(conf: Path) -> list[int]:
    """Live nginx masters started with `conf`, found by their command line: what a router whose
    pid file is gone (its folder deleted under it, `rm -rf router/`) is still known by."""
    return sorted(pid for pid, cmd in _live_where(lambda _st: True).items() if _master_of(cmd, conf))


def _live_where(test: Callable[[tuple[str, int, int]], bool]) -> dict[int, str]:
    if not _PROC.is_dir():
        return {}
    out: dict[int, str] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is not None and st[0] not in ("Z", "X") and test(st):
            out[int(entry.name)] = cmdline(int(entry.name))
    return out


def workers(master: int) -> dict[int, str]:
    """Live children of the master: pid -> title ("nginx: worker process[ is shutting down]")."""
    children = _PROC / str(master) / "task" / str(master) / "children"  # the master is single-threaded
    try:
        pids = [int(p) for p in children.read_text().split()]
    except (OSError, ValueError):  # kernel without CONFIG_PROC_CHILDREN: scan every process
        return _live_where(lambda st: st[1] == master)
    return {p: cmdline(p) for p in pids if alive(p)}


def leftovers(master: int) -> list[int]:
    """nginx processes still in the (dead) master's process group: workers orphaned by a crash.

    The daemonized master leads its own process group and its workers inherit it; Linux does not
    reuse a pid while it still names a process group, so these can only be that master's workers.
    """
    if alive(master):
        return []
    return sorted(
        p for p, title in _live_where(lambda st: st[2] == master).items() if title.startswith("nginx:")
    )


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def log_size(path: Path) -> int:
    """The error log's size now: `log_tail(path, since=...)` then shows only what came after."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_tail(path: Path, lines: int = 15, *, since: int = 0) -> str:
    """The last `lines` lines written to `path` from byte `since` on (an earlier attempt's errors
    would otherwise be reported as this one's)."""
    try:
        with path.open("rb") as fh:
            fh.seek(since if 0 <= since <= path.stat().st_size else 0)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(_collapse_repeats(text.splitlines())[-lines:])


_LOG_PREFIX = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d |nginx: )")


def _collapse_repeats(lines: list[str]) -> list[str]:
    """Lines that differ only in their timestamp are said once, where first seen, marked
    `(N times)`: nginx retries a busy port's bind() five times and logs each (alternating when
    two ports are busy), which buried the lines that matter in an error report. Blank lines
    are dropped."""
    order: list[str] = []
    first: dict[str, str] = {}
    counts: dict[str, int] = {}
    for line in lines:
        key = _LOG_PREFIX.sub("", line).strip()
        if not key:
            continue
        if key not in counts:
            order.append(key)
            first[key] = line
            counts[key] = 0
        counts[key] += 1
    return [f"{first[k]} ({counts[k]} times)" if counts[k] > 1 else first[k] for k in order]


# -- closing connections to a replica that vanished ------------------------------------------------

#: pidfd_getfd(2) (Linux 5.6 on): 438 on the architectures whose newer system calls share one
#: numbering (x86, arm, arm64, riscv, powerpc, s390, ...); alpha and ia64 add an offset, and
#: mips's depends on its ABI (4438, 5438 or 6438): there 438 names another call, or none.
_SYS_PIDFD_GETFD = 438
_PIDFD_GETFD_ELSEWHERE = {"alpha": 548, "ia64": 1462}


def _pidfd_getfd_number() -> int | None:
    """The system call number of pidfd_getfd on this machine; None where it is not known (mips)."""
    machine = platform.machine().lower()
    if machine.startswith("mips"):
        return None
    return _PIDFD_GETFD_ELSEWHERE.get(machine, _SYS_PIDFD_GETFD)


#: /proc/net/tcp states with a peer: everything but LISTEN (0A) and CLOSE (07).
_NO_PEER_STATES = {"07", "0A"}


def _peer(hex_addr: str) -> tuple[str, int]:
    """`0100007F:1F90` (/proc/net/tcp's remote address: 32-bit words in host order) as
    ("127.0.0.1", 8080); an IPv4-mapped IPv6 address as its IPv4 form."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def tcp_peers(pid: int) -> dict[int, tuple[str, int]]:
    """Socket inode -> (peer address, peer port) of the TCP connections in `pid`'s network
    namespace (/proc/<pid>/net/tcp and tcp6), listening sockets left out."""
    out: dict[int, tuple[str, int]] = {}
    for fields in tcp_rows(_PROC / str(pid) / "net"):
        if fields[3] not in _NO_PEER_STATES:
            with contextlib.suppress(ValueError):
                out[int(fields[9])] = _peer(fields[2])
    return out


def socket_fds(pid: int) -> dict[int, int]:
    """Socket inode -> file descriptor number in process `pid` (empty when it cannot be read)."""
    try:
        return _listed_socket_fds(pid)
    except OSError:
        return {}


def _listed_socket_fds(pid: int) -> dict[int, int]:
    """`socket_fds`, raising the OSError that listing /proc/<pid>/fd met."""
    return listed_socket_fds(_PROC / str(pid))


def borrow_fd(pid: int, fd: int) -> int:
    """A duplicate, in this process, of descriptor `fd` of process `pid` (pidfd_getfd(2); Linux
    5.6+, and the right to ptrace `pid`: the same user where ptrace is not restricted, or root).
    The socket it names is shared: `shutdown()` on the copy acts on `pid`'s connection."""
    number = _pidfd_getfd_number()
    if number is None:
        raise OSError(errno.ENOSYS, f"pidfd_getfd's number on {platform.machine()} is not known to skyhedge")
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        got = int(libc.syscall(number, pidfd, fd, 0))
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return got
    finally:
        os.close(pidfd)


#: struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32s; `tcpi_last_data_sent` is the 10th
#: u32 and `tcpi_last_data_recv` the 12th, each in milliseconds (the ages of the last data sent and
#: of the last data received on the connection).
_TCP_INFO_LEN = 104
_LAST_DATA_SENT_AT = 44
_LAST_DATA_RECV_AT = 52


def awaiting_answer(sock: socket.socket, within: float) -> bool:
    """Whether `sock` (nginx's end of an upstream connection) carries a request sent less than
    `within` seconds ago of which nothing came back yet: nothing received since the last data
    sent. That is a request nginx may still retry on another replica if its connection is
    closed (no byte of its answer reached the client, and `next_upstream_timeout` has not
    passed). A stream under way (data received since) is not, nor is an idle kept-alive
    connection (its answer came after its request). False when the kernel does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return False
    if len(info) < _LAST_DATA_RECV_AT + 4:
        return False
    (sent_ms,) = struct.unpack_from("=I", info, _LAST_DATA_SENT_AT)
    (recv_ms,) = struct.unpack_from("=I", info, _LAST_DATA_RECV_AT)
    return recv_ms >= sent_ms and sent_ms < within * 1000


def sever(
    pids: Iterable[int],
    peers: set[tuple[str, int]],
    only: Callable[[socket.socket], bool] | None = None,
) -> int:
    """Shut down (both ways) every TCP connection that processes `pids` hold to one of `peers`
    ((address, port)), or those of them `only` accepts; returns how many. Why: a cloud VM that
    vanishes (a spot preemption) sends no reset, so nginx's connections to it wait for
    `proxy_read_timeout`. Shut down, the worker reads the end of the connection at once
    ("upstream prematurely closed connection"), an error `proxy_next_upstream` retries on another
    replica. Raises OSError (EPERM: not allowed to take the worker's descriptors; EACCES: not
    allowed to list them; ENOSYS: a kernel before 5.6) when none could be shut down."""
    done = 0
    failure: OSError | None = None
    pids = list(pids)
    # the workers share the master's network namespace: its connection table is read once, from
    # the first worker whose table can be read (the first listed may be an old worker that exited
    # since: its /proc entry gone, it showed no connection at all, and nothing was closed)
    table: dict[int, tuple[str, int]] = {}
    for pid in pids:
        if table := tcp_peers(pid):
            break
    wanted = {inode for inode, peer in table.items() if peer in peers}
    if not wanted:
        return 0
    for pid in pids:
        try:
            fds = _listed_socket_fds(pid)
        except OSError as exc:
            # EACCES: a worker we may not look into (an nginx given a file capability to bind a
            # port below 1024 is not dumpable: its /proc/<pid>/fd is root's): said, not passed
            # over as one without connections
            if exc.errno in (errno.EACCES, errno.EPERM):
                failure = exc
            continue
        for inode, fd in fds.items():
            if inode not in wanted:
                continue
            try:
                copy = borrow_fd(pid, fd)
            except OSError as exc:  # gone meanwhile (ESRCH, EBADF), or not allowed
                if exc.errno not in (errno.ESRCH, errno.EBADF):
                    failure = exc
                continue
            # the worker may have closed that descriptor and reused its number (for another
            # connection, a file) since it was listed: only the very socket found is shut down
            try:
                if os.fstat(copy).st_ino == inode:
                    with socket.socket(fileno=copy) as sock:
                        copy = -1  # closed with `sock`
                        if only is None or only(sock):
                            sock.shutdown(socket.SHUT_RDWR)
                            done += 1
            except OSError:  # the connection ended meanwhile (ENOTCONN)
                pass
            finally:
                if copy >= 0:
                    os.close(copy)
    if failure is not None and not done:
        raise failure
    return done
