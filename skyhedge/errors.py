"""One exception tree for skyhedge. The CLI turns any `SkyhedgeError` into one line and exit 1.

SkyhedgeError
├── SpecError            a spec file is invalid (carries file + field path)
├── CatalogError         unknown cloud / instance type / zone, unreadable catalog
├── StateError           state dir unreadable, wrong version, locked by another writer
│   └── LockHeld         another writer holds the service's lock (carries the state dir)
├── PolicyError          unknown policy name, bad plug-in
├── TraceError           a trace file/dir is malformed
├── RenderError          templates/modules missing or rendering failed
├── EngineError          Terraform failed (carries Terraform's own stderr)
│   └── InsufficientCapacity   a spot launch was refused for capacity
├── CloudError           a cloud API call failed (boto3 / REST), converted at the boundary
│   └── NotFound
├── RoutingError         nginx config test/reload failed (carries nginx's stderr)
└── OutputError          an output file (plot, report) cannot be written
"""

from __future__ import annotations

import re


class SkyhedgeError(Exception):
    """Base of every error skyhedge raises on purpose; the message is one user-facing line."""


class SpecError(SkyhedgeError):
    """An invalid service spec: `file: field.path: what was expected, got what`."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None) -> None:
        self.file = file
        self.path = path
        self.reason = message
        # a path holding a line break (or another unprintable character) is quoted: the error
        # stays one line (found by an input audit)
        shown = file if file is None or file.isprintable() else repr(file)
        parts = [p for p in (shown, path) if p]
        super().__init__(": ".join([*parts, message]))


class CatalogError(SkyhedgeError):
    pass


class StateError(SkyhedgeError):
    pass


class LockHeld(StateError):
    """Another skyhedge process holds the service's writer lock. `state_dir`: whose lock, so the
    CLI can name the running watcher (its record lives there) and how to stop it; `question`: a
    guess at the holder, shown in parentheses unless the CLI knows the answer."""

    def __init__(self, message: str, state_dir: object, *, question: str | None = None) -> None:
        self.state_dir = state_dir
        self.base = message
        super().__init__(f"{message} ({question})" if question else message)


class PolicyError(SkyhedgeError):
    pass


class TraceError(SkyhedgeError):
    pass


class RenderError(SkyhedgeError):
    pass


class EngineError(SkyhedgeError):
    """Terraform failed. `stderr` holds Terraform's own text, shown to the user as is."""

    def __init__(self, message: str, *, stderr: str = "", root: str | None = None) -> None:
        self.stderr = stderr
        self.root = root
        super().__init__(message)


class InsufficientCapacity(EngineError):
    pass


class CloudError(SkyhedgeError):
    pass


class NotFound(CloudError):
    pass


class RoutingError(SkyhedgeError):
    def __init__(self, message: str, *, stderr: str = "") -> None:
        self.stderr = stderr
        super().__init__(message)


class OutputError(SkyhedgeError):
    """An output the user asked for (a `--plot` PNG, a report) cannot be written where asked."""


#: Control characters (C0 but the tab, DEL, C1): what must not reach a terminal as is.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """`text` with its control characters shown escaped (`\\x1b`), tabs kept. For what a replica
    said (its output, its answer to a probe) quoted in an error or a log line: an escape sequence
    it printed must not retitle, clear or recolour the operator's terminal, and a line break in
    it must not split a one-line error."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


#: The same, line breaks kept: for text printed as lines of its own (stderr's messages).
_CONTROL_IN_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls_in_lines(text: str) -> str:
    """`text` with control characters escaped as `escape_controls` does, but tabs and line breaks
    kept: what skyhedge prints to stderr (an error and the Terraform detail under it, warnings)
    quotes what clouds and replicas said (an instance's tags, an API's error text, a replica's
    output), and an escape sequence in it must not reach the terminal as one."""
    return _CONTROL_IN_LINES.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def first_line(text: str) -> str:
    """The first non-blank line of an error's text (Terraform's diagnostics, a cloud's reply), for
    the one-line messages skyhedge prints: the rest stays in the detail shown below them."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())
