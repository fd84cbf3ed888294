"""Watchdog: notices when the engine makes no progress while work is queued.

Runs on its own daemon thread, since a stuck event loop cannot watch itself. The engine
counts applied steps (`progress`); while it has work (`has_work`) and the count stays the
same for `timeout` seconds, the watchdog marks the engine stalled (`/health` answers 503),
logs which thread is stuck (`where`: the worker inside a call, or the event loop) and every
thread's stack, and with `exit_on_stall` ends the process with status 70 so that a
supervisor restarts it. When progress resumes the mark is cleared.

The engine pays one integer increment per step for this; the checks run off the loop.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Callable, Optional

logger = logging.getLogger(__name__)

EXIT_STATUS = 70  # EX_SOFTWARE: an internal error, restart me


def thread_stacks() -> str:
    """Every thread's current stack, named, as text for the log."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}):\n{stack}")
    return "\n".join(parts)


class Watchdog:
    def __init__(self, timeout: float, *, progress: Callable[[], int],
                 has_work: Callable[[], bool], where: Callable[[], str],
                 exit_on_stall: bool = False,
                 exit: Callable[[int], None] = os._exit):
        self.timeout = timeout
        self._progress, self._has_work, self._where = progress, has_work, where
        self.exit_on_stall = exit_on_stall
        self._exit = exit
        self.stalled: Optional[str] = None  # what is stuck, while stalled
        self._last = (progress(), time.monotonic())  # (count, when it last changed)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name="asgl-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        interval = min(max(self.timeout / 4, 0.05), 5.0)
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watchdog itself must never die
                logger.exception("watchdog check failed")

    def check(self, now: Optional[float] = None) -> Optional[str]:
        """One look: returns (and records) what is stuck, or None."""
        now = time.monotonic() if now is None else now
        count = self._progress()
        if count != self._last[0] or not self._has_work():
            if self.stalled is not None:
                logger.warning("the engine makes progress again (was: %s)", self.stalled)
            self._last = (count, now)
            self.stalled = None
            return None
        idle = now - self._last[1]
        if idle < self.timeout or self.stalled is not None:
            return self.stalled
        why = f"{self._where()}; no step completed for {idle:.1f} s with work queued"
        logger.critical("watchdog: the engine is stalled: %s. Thread stacks:\n%s", why,
                        thread_stacks())
        self.stalled = why  # (after the log: whoever sees the 503 finds the stacks logged)
        if self.exit_on_stall:
            logger.critical("watchdog: exiting (--exit-on-stall) with status %d", EXIT_STATUS)
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            self._exit(EXIT_STATUS)
        return self.stalled
