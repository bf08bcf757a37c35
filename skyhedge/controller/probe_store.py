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
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from skyhedge.state import atomic_write_bytes, private_dir

#: Under the state dir's private directory (`tf/`, with the `run.env` values).
PROBES_FILE = "probes.json"
PRIVATE_DIR = "tf"
_VERSION = 1


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
