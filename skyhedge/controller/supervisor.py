"""The one loop runner: call `tick() -> delay`, sleep until the delay passes or something wakes it.

Event sources call `wake()` from their background threads (an SQS message arrived, a replica
process exited), so a preemption is handled at once instead of at the next period. A tick that
raises is logged and retried with exponential backoff; the loop itself never dies of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from skyhedge.errors import SkyhedgeError

log = logging.getLogger("skyhedge.controller")


class Supervisor:
    def __init__(
        self,
        tick: Callable[[], float],
        *,
        min_delay: float = 0.05,
        max_backoff: float = 60.0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._tick = tick
        self.min_delay = min_delay
        self.max_backoff = max_backoff
        self.on_error = on_error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.failures = 0
        self.ticks = 0
        self.woken = False
        self.last_error: BaseException | None = None

    def wake(self) -> None:
        """Run the next tick now (thread-safe)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def backoff(self) -> float:
        return min(self.max_backoff, 1.0 * 2 ** min(self.failures - 1, 16))

    def run_once(self) -> float:
        """One guarded tick; returns the delay before the next."""
        self.woken = self._wake.is_set()  # this tick runs for a wake-up, not the delay's end
        self._wake.clear()  # cleared before the tick, so a wake during it triggers the next at once
        self.ticks += 1
        try:
            delay = self._tick()
        except (SkyhedgeError, OSError) as exc:
            # An OSError is the machine's doing (out of file descriptors, a full disk, a file
            # unreadable for a moment), as a SkyhedgeError is the user's: one line, not a
            # traceback every pass (measured: `tick crashed` with 9 frames a pass while the watcher
            # was out of file descriptors); the traceback stays in the debug log.
            self.failures += 1
            self.last_error = exc
            log.error("tick failed (%d in a row): %s", self.failures, exc)
            if isinstance(exc, OSError):
                log.debug("the failed tick's traceback", exc_info=exc)
            if self.on_error:
                self.on_error(exc)
            return self.backoff()
        except Exception as exc:  # a bug must not take the watcher down: log it whole, back off
            self.failures += 1
            self.last_error = exc
            log.exception("tick crashed (%d in a row)", self.failures)
            if self.on_error:
                self.on_error(exc)
            return self.backoff()
        self.failures = 0
        return max(self.min_delay, delay)

    def run(self, *, max_ticks: int | None = None, until: Callable[[], bool] | None = None) -> None:
        """Tick until `stop()`, `max_ticks` ticks, or `until()` is true."""
        while not self._stop.is_set():
            delay = self.run_once()
            if (max_ticks is not None and self.ticks >= max_ticks) or (until is not None and until()):
                return
            deadline = time.monotonic() + delay
            while not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or self._wake.wait(left):
                    break
