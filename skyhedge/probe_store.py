"""The readiness probes a watcher keeps for its restart, out of state.json.

A probe may carry a token (`readiness_probe.headers`, `post_data`). state.json is written with the
umask's mode (0644 under 022: teams share state dirs) and, under `watch --gitops`, committed to
git, where the spec itself may deliberately not be. So state.json holds only a keyed digest of each
probe kept (`extra.earlier_probes`, `extra.probe`), and the probes themselves are in
`tf/probes.json`: the state dir's private directory (0700, `state.private_dir`, which holds the
`run.env` values already), in an owner-only (0600) file written atomically.

The digest is an HMAC keyed with a random key that lives in that file only, so state.json says
nothing a reader could test guessed header values against; and a probes file that does not belong
to the state.json beside it (lost, restored from another time, edited) is found out: its probes do
not match the digests, and the watcher falls back to the spec's probe with one warning line.

Which probe a replica is probed with is chosen here too (`earlier_revision`), for the watcher and
for the commands that probe replicas without it (`apply`, `routing reload|up --probe`): mid rolling
update they probed every replica with the spec's probe, which the outdated ones (an earlier health
path) failed, and took them out of the router (every replica, while the replacements were still
booting: an outage). `routing` only reads the kept probes (`earlier_probes`). The two writers are
the watcher (at a spec reload, `Controller.reconfigure`) and `apply` (`applied_probes`), each
holding the state dir's writer lock, through the same `ProbeStore.keep` / `ProbeStore.name` and
the same choice of which revisions take the outgoing probe (`outgoing_revisions`): with no
watcher, `apply` of v1 then of v2 (a new health path) recorded nothing, and the v2 apply's
rolling update stopped after its first step, the v1 replicas failing the v2 probe.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import Container, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from skyhedge.errors import SkyhedgeError, SpecError
from skyhedge.planner import by_replica_id
from skyhedge.spec import (
    ReadinessProbe,
    ServiceSpec,
    parse_readiness_probe,
    readiness_probe_json,
    replica_revision,
)
from skyhedge.state import (
    STATE_FILE,
    ReplicaRecord,
    ServiceState,
    atomic_write_bytes,
    private_dir,
    unwritable,
)

#: Under the state dir's private directory (`tf/`, with the `run.env` values).
PROBES_FILE = "probes.json"
PRIVATE_DIR = "tf"
_VERSION = 1

#: `state.extra` key: `{revision: readiness_probe}`, the probe of the spec the outdated replicas of
#: that revision were launched under, when a reload changed it together with the revision
#: (`Controller.reconfigure`). In the state so that a restart mid-rolling-update keeps probing them
#: with it, not with the new version's probe (which they may fail: NOT_READY, FAILED 180 s later).
#: Only a keyed digest of each probe is in state.json (`{revision: digest}`; a release before
#: this one wrote the probe itself, read back all the same): a probe may carry a token, and the
#: probes are in the state dir's private `tf/probes.json` (`ProbeStore`).
EARLIER_PROBES_KEY = "earlier_probes"
#: `state.extra` key: the digest of the probe the current revision's replicas are probed with (the
#: probe itself in `tf/probes.json`): a watcher restarted with a spec whose probe differs checks
#: it as a reload would (`Controller._check_restart_probe`) instead of taking it unchecked.
PROBE_KEY = "probe"


def _canonical(probe: dict[str, Any]) -> bytes:
    return json.dumps(probe, sort_keys=True, separators=(",", ":")).encode("utf-8")


class ProbeStore:
    """`tf/probes.json` of one state dir: `{"version", "key", "probes": {digest: probe}}`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PRIVATE_DIR / PROBES_FILE
        self._key: bytes | None = None
        self._written: bytes | None = None  # the file's content as last written or read
        # id(probe) -> (probe, digest): the watcher asks at every pass for the same few probes,
        # whose `post_data` may be large (kept alive here, so an id is never reused meanwhile)
        self._memo: dict[int, tuple[dict[str, Any], str]] = {}

    def read(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The probes of the file by digest, and what was wrong with it (None: nothing, or no file
        at all, which a caller that expects probes reports itself). Entries whose digest does not
        match their probe are left out (and reported)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            return {}, f"{self.path}: cannot read ({exc.strerror or exc})"
        try:
            data = json.loads(raw)
            key = bytes.fromhex(data["key"]) if data.get("version") == _VERSION else b""
            table = data["probes"]
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return {}, f"{self.path}: not a probes file skyhedge wrote"
        if len(key) < 16 or not isinstance(table, dict):
            return {}, f"{self.path}: not a probes file skyhedge wrote"
        self._key, self._written, self._memo = key, raw, {}
        probes = {
            d: p for d, p in table.items() if isinstance(p, dict) and hmac.compare_digest(self.digest(p), d)
        }
        problem = None if len(probes) == len(table) else f"{self.path}: probes that do not match their digest"
        return probes, problem

    def digest(self, probe: dict[str, Any]) -> str:
        """The keyed digest state.json holds for `probe` (a key is made if none was read yet)."""
        known = self._memo.get(id(probe))
        if known is not None and known[0] is probe:
            return known[1]
        if self._key is None:
            self._key = secrets.token_bytes(32)
        digest = hmac.new(self._key, _canonical(probe), hashlib.sha256).hexdigest()
        if len(self._memo) >= 64:
            self._memo.clear()
        self._memo[id(probe)] = (probe, digest)
        return digest

    def write(self, probes: list[dict[str, Any]]) -> None:
        """Keep exactly `probes` (0600, atomically; nothing written when the file holds them
        already). None to keep removes the file: no stale token stays behind."""
        if not probes:
            if self._written is not None or self.path.exists():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self._written = None
            return
        table = {self.digest(p): p for p in probes}
        assert self._key is not None
        data = {"version": _VERSION, "key": self._key.hex(), "probes": dict(sorted(table.items()))}
        text = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
        if text == self._written and self.path.exists():
            return
        private_dir(self.path.parent)
        atomic_write_bytes(self.path, text, mode=0o600)
        self._written = text

    def keep(self, in_force: dict[str, Any] | None, earlier: Mapping[str, dict[str, Any]]) -> None:
        """Write the probes a state names (`name`): the probe in force and the earlier ones. Called
        before the state is saved: state.json never names a digest the file does not hold."""
        self.write([*([in_force] if in_force else []), *earlier.values()])

    def name(
        self,
        extra: MutableMapping[str, Any],
        in_force: dict[str, Any] | None,
        earlier: Mapping[str, dict[str, Any]],
    ) -> None:
        """Name the probes kept in a state's `extra`, as digests (`EARLIER_PROBES_KEY`, revision ->
        digest; `PROBE_KEY`): none kept, no key (a state without them reads as before)."""
        if earlier:
            extra[EARLIER_PROBES_KEY] = {rev: self.digest(p) for rev, p in sorted(earlier.items())}
        else:
            extra.pop(EARLIER_PROBES_KEY, None)
        if in_force is not None:
            extra[PROBE_KEY] = self.digest(in_force)
        else:
            extra.pop(PROBE_KEY, None)


R = TypeVar("R", bound=ReplicaRecord)


def outgoing_revisions(
    live: Iterable[ReplicaRecord], kept: Container[str], current: Mapping[str, str]
) -> list[str]:
    """The revisions that take the outgoing probe when the probe in force changes (a spec reload,
    a restart with an edited spec, an `apply` of a new version): those live replicas run that are
    outdated (not `current`, cloud -> the spec's revision) and have no kept probe yet (`kept`:
    one launched under a still earlier spec keeps its own). The choice of the watcher and of
    `apply`: they must agree, or a watcher started after an apply probes the outdated replicas
    with another probe than the apply did."""
    return sorted(
        {
            rec.revision
            for rec in live
            if rec.revision is not None and rec.revision != current[rec.cloud] and rec.revision not in kept
        }
    )


def earlier_revision(
    rec: ReplicaRecord, kept: Container[str], spec: ServiceSpec, current: dict[str, str] | None = None
) -> str | None:
    """The revision whose kept probe `rec` is probed with (`kept`: the revisions a probe is kept
    for, `EARLIER_PROBES_KEY`), or None: the probe in force (the spec's, or one a restarted
    watcher holds). An outdated replica keeps the probe of the spec it was launched under; a
    replica of the spec's revision (a spec reverted) takes the spec's. The one choice of the
    watcher (`Controller._probers`), `apply` and `routing --probe`: they must agree, or one of
    them takes out of the router what the others keep in it. `current`: cloud -> the spec's
    revision, filled as asked (one digest per cloud, not per replica)."""
    rev = rec.revision
    if rev is None or rev not in kept:
        return None
    if current is None:
        current = {}
    if rec.cloud not in current:
        current[rec.cloud] = replica_revision(spec, rec.cloud)
    return rev if rev != current[rec.cloud] else None


def by_probe(
    records: Iterable[R], kept: Container[str], spec: ServiceSpec, current: dict[str, str] | None = None
) -> tuple[list[R], dict[str, list[R]]]:
    """`records` split by the probe they are probed with (`earlier_revision`): those probed with
    the probe in force, and by revision those probed with their revision's kept probe."""
    current = {} if current is None else current
    rest: list[R] = []
    earlier: dict[str, list[R]] = {}
    for rec in records:
        rev = earlier_revision(rec, kept, spec, current)
        if rev is None:
            rest.append(rec)
        else:
            earlier.setdefault(rev, []).append(rec)
    return rest, earlier


@dataclass
class KeptProbes:
    """The probes state.json names (`EARLIER_PROBES_KEY`, `PROBE_KEY`), read back from the probes
    file. `before`: the probe in force when the state was written; `unchecked`: one is named but
    not to be had; `problems`: what was wrong (each a line part; none: nothing)."""

    earlier: dict[str, ReadinessProbe] = field(default_factory=dict)
    before: ReadinessProbe | None = None
    unchecked: bool = False
    problems: list[str] = field(default_factory=list)


def read_kept(store: ProbeStore, extra: Mapping[str, Any]) -> KeptProbes:
    """The probes `extra` (a state's) names, from their digests and `store`'s file, which is only
    read (and only when a digest is to be looked up); an earlier release's state.json holds the
    earlier probes themselves (taken as they are). What is missing, unreadable or not matching is
    left out and said in `problems`: the caller probes those replicas with the spec's probe."""
    out = KeptProbes()
    raw, in_force = extra.get(EARLIER_PROBES_KEY), extra.get(PROBE_KEY)
    if raw is None and in_force is None:
        return out
    where = f"{STATE_FILE}: extra.{EARLIER_PROBES_KEY}"
    if raw is not None and not isinstance(raw, dict):
        out.problems.append(f"{where}: expected an object of revision -> digest")
    stored: dict[str, dict[str, Any]] | None = None
    unmatched: list[str] = []  # what names a probe the probes file does not hold
    problem: str | None = None

    def kept(digest: str, name: str) -> Any:
        nonlocal stored, problem
        if stored is None:
            stored, problem = store.read()
        if digest not in stored:
            unmatched.append(name)
        return stored.get(digest)

    for rev, value in (raw if isinstance(raw, dict) else {}).items():
        probe = kept(value, str(rev)) if isinstance(value, str) else value  # (an earlier release's)
        if probe is None:
            continue
        try:
            out.earlier[str(rev)] = parse_readiness_probe(probe, source=f"{where}.{rev}")
        except SkyhedgeError as exc:
            out.problems.append(str(exc))
    if isinstance(in_force, str):
        probe = kept(in_force, f"extra.{PROBE_KEY}")
        try:
            out.before = None if probe is None else parse_readiness_probe(probe, source=f"extra.{PROBE_KEY}")
        except SpecError as exc:
            out.problems.append(str(exc))
        out.unchecked = out.before is None
    elif in_force is not None:
        out.unchecked = True
        out.problems.append(
            f"{STATE_FILE}: extra.{PROBE_KEY}: expected a probe's digest, got {in_force!r:.40}"
        )
    if unmatched:
        path = store.path
        why = problem or (f"{path}: missing" if not path.exists() else f"{path}: holds no such probe")
        out.problems.append(f"{why} (named by {STATE_FILE}'s {', '.join(unmatched)})")
    return out


#: What a probe not to be had costs (the end of the warning line).
FALLBACK = "outdated replicas are probed with the spec's probe"


def earlier_probes(
    state_dir: Path, state: ServiceState, spec: ServiceSpec
) -> tuple[dict[str, ReadinessProbe], str | None]:
    """The kept probes of the outdated replicas live in `state` (revision -> probe), for a command
    that probes replicas while no watcher runs (`routing reload|up --probe`: it holds the writer
    lock a watcher would need), and what was wrong, as one warning line (None: nothing). Read
    only (an earlier release's probes held in `state` are moved to the file when the caller saves
    it: `digest_inline_probes`): the probes file is the watcher's and `apply`'s to keep
    (`applied_probes`), and a
    revision no live outdated replica runs is not looked up (no warning about a probe nobody
    needs)."""
    raw = state.extra.get(EARLIER_PROBES_KEY)
    if raw is None:
        return {}, None
    if isinstance(raw, dict):
        _, wanted = by_probe(state.live(), raw, spec)
        raw = {rev: value for rev, value in raw.items() if rev in wanted}
        if not raw:
            return {}, None
    found = read_kept(ProbeStore(state_dir), {EARLIER_PROBES_KEY: raw})
    warning = f"{'; '.join(found.problems)}: ignored: {FALLBACK}" if found.problems else None
    return found.earlier, warning


@dataclass
class AppliedProbes:
    """The probes an `apply` keeps, as the watcher keeps them at a reload: `in_force`, the probe the
    current revision's replicas are probed with (as JSON), and `earlier`, revision -> the probe
    its outdated replicas were launched under (JSON; `probes`: the same, parsed, to probe them
    with). `warning`: what was wrong with the probes the state named, as one line (None: nothing,
    or nothing any live replica needs)."""

    store: ProbeStore
    in_force: dict[str, Any]
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)
    probes: dict[str, ReadinessProbe] = field(default_factory=dict)
    warning: str | None = None

    def keep(self, state: ServiceState, spec: ServiceSpec) -> None:
        """Write the probes file, then name its probes in `state` (saved by the caller, which holds
        the writer lock): a watcher, `routing --probe` or the next apply finds them there. A
        revision no live outdated replica runs any more is dropped (released, or current again),
        as the watcher drops it (`Controller._probers`)."""
        _, wanted = by_probe(state.live(), self.earlier, spec)
        self.earlier = {rev: p for rev, p in self.earlier.items() if rev in wanted}
        self.probes = {rev: p for rev, p in self.probes.items() if rev in wanted}
        try:
            self.store.keep(self.in_force, self.earlier)
        except OSError as exc:
            raise unwritable(self.store.path.parent.parent, exc) from exc
        self.store.name(state.extra, self.in_force, self.earlier)


def applied_probes(state_dir: Path, state: ServiceState, spec: ServiceSpec) -> AppliedProbes:
    """What `apply` of `spec` keeps (nothing is written here: `AppliedProbes.keep`, once the apply
    goes ahead). The probes the state names are read back (`read_kept`); when the probe in force
    before (`PROBE_KEY`) is not the spec's, the outdated replicas with no kept probe take it
    (`outgoing_revisions`), exactly as at a watcher's reload. The spec's probe is the one in force
    from now on, except while replicas of the spec's revision run that were probed with the one
    before (a probe-only edit, or one a watcher refused and held): `apply` has not checked them
    against it, so the state keeps naming the earlier one and a watcher checks it at its start
    (`Controller._check_restart_probe`), as it would have without this apply. Replicas of a
    revision that had a kept probe (current again: the spec reverted, e.g. after an update whose
    launches failed) were probed with that one, not the one before: the spec's is in force, as
    after a watcher's reload.

    A state from before probes were kept (no `PROBE_KEY`) has nothing to carry over: its outdated
    replicas are probed with the spec's probe, as before; from this apply on, the spec's is
    recorded. Only what some live replica needs is looked up (and warned about)."""
    store = ProbeStore(state_dir)
    spec_probe = readiness_probe_json(spec.readiness_probe)
    out = AppliedProbes(store, spec_probe)
    live = state.live()
    current = {cloud: replica_revision(spec, cloud) for cloud in {r.cloud for r in live}}
    raw, in_force = state.extra.get(EARLIER_PROBES_KEY), state.extra.get(PROBE_KEY)
    table = raw if isinstance(raw, dict) else {}  # (before dropping the revisions no one needs)
    if isinstance(raw, dict):
        _, wanted = by_probe(live, raw, spec, current)
        raw = {rev: value for rev, value in raw.items() if rev in wanted} or None
    kept_revs = raw if isinstance(raw, dict) else {}
    outgoing = outgoing_revisions(live, kept_revs, current)
    # replicas of the spec's revision that were probed with the probe in force: not those of a
    # revision current again (the spec reverted), which were probed with their kept probe. Taken as
    # ours, a failed update reverted by `apply` kept the failed version's probe in force, and its
    # next apply kept none for the replicas it replaces (they failed its probe mid update)
    ours = any(
        r.revision is not None and r.revision == current[r.cloud] and r.revision not in table for r in live
    )
    lookup: dict[str, Any] = {}
    if raw is not None:
        lookup[EARLIER_PROBES_KEY] = raw
    if in_force is not None and (outgoing or ours):
        lookup[PROBE_KEY] = in_force
    found = read_kept(store, lookup)
    if not lookup:
        store.read()  # (its key: the digests state.json names stay the same from apply to apply)
    for rev, readiness in found.earlier.items():
        out.earlier[rev], out.probes[rev] = readiness_probe_json(readiness), readiness
    if found.before is not None:
        was = readiness_probe_json(found.before)
        if was != spec_probe:
            for rev in outgoing_revisions(live, out.earlier, current):
                out.earlier[rev], out.probes[rev] = was, found.before
            if ours:
                out.in_force = was
    if found.problems and (raw is not None or outgoing):
        out.warning = f"{'; '.join(found.problems)}: ignored: {FALLBACK}"
    return out


def digest_inline_probes(state_dir: Path, state: ServiceState) -> None:
    """Replace the probes an earlier release kept in `state` itself (`EARLIER_PROBES_KEY`:
    revision -> the probe, its headers and `post_data` included) by their digests, the probes
    written to the probes file first (with those it holds whose digest `state` names, still
    matching). Called by `save_state`, the one writer of state.json, before each write.

    Why there: only a watcher's write rewrote them, so after an upgrade run by `apply` alone
    (`routing reload|up --probe`, `destroy`) every write put the token back into state.json (0644,
    committed by `--gitops`) for as long as the revision ran. A value that is not a probe is left
    for the reader's one warning line. Raises OSError when the probes file cannot be written
    (state.json is then not written either: it would name a digest the file does not hold)."""
    raw = state.extra.get(EARLIER_PROBES_KEY)
    if not isinstance(raw, dict) or not any(isinstance(v, dict) for v in raw.values()):
        return
    store = ProbeStore(state_dir)
    stored, _ = store.read()  # (a file not to be read gets a new key: what it held matches nothing)
    named = {v for v in raw.values() if isinstance(v, str)} | {state.extra.get(PROBE_KEY)}
    inline = [v for v in raw.values() if isinstance(v, dict)]
    store.write([*(p for d, p in stored.items() if d in named), *inline])
    state.extra[EARLIER_PROBES_KEY] = {
        rev: store.digest(v) if isinstance(v, dict) else v for rev, v in raw.items()
    }


def spec_probe_refused(spec: ServiceSpec, live: Iterable[ReplicaRecord]) -> tuple[int, str, str] | None:
    """The watcher's check of a probe it did not take yet (`Controller._check_restart_probe`), for
    a command without one: probe the READY replicas of the spec's revision with the spec's probe;
    (how many were probed, the first one's ID, why it failed) when none passes, else None (one
    passes, or none could be asked). `apply` records the spec's probe only then, and `routing
    --probe` probes with it only then: both took it unchecked, or not at all, while a watcher
    refused it (measured: after `apply` of a probe-only edit to a path the replicas do not serve,
    `routing reload --probe` took both replicas out, every request 503)."""
    from skyhedge.probe import check_all

    ready = [
        r
        for r in live
        if r.endpoint
        and r.ready_at is not None
        and r.not_ready_since is None
        and not r.draining
        and r.revision in (None, replica_revision(spec, r.cloud))
    ]
    results = check_all([r.endpoint or "" for r in ready], spec.readiness_probe) if ready else {}
    if not results or any(result.ok for result in results.values()):
        return None
    first = min(ready, key=by_replica_id)
    return len(ready), first.id, results[first.endpoint or ""].error or "failed"


def probe_in_force(state_dir: Path, state: ServiceState, spec: ServiceSpec) -> ReadinessProbe | None:
    """The probe the state names as the one the current revision's replicas are probed with
    (`PROBE_KEY`), when it is not the spec's (a probe-only edit a watcher or `apply` has not taken
    yet); None when it is the spec's, none is named, or it is not to be had (read only)."""
    if not isinstance(state.extra.get(PROBE_KEY), str):
        return None
    before = read_kept(ProbeStore(state_dir), {PROBE_KEY: state.extra[PROBE_KEY]}).before
    if before is None or readiness_probe_json(before) == readiness_probe_json(spec.readiness_probe):
        return None
    return before
