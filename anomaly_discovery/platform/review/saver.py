"""Saving the review loop's index without blocking reviewer actions: requests that arrive within ``delay_s`` of
each other are written once, by a daemon thread (or at once when ``background`` is off). The store is the log,
so a checkpoint lost in a crash is replayed when the loop opens."""

from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class CoalescingSaver:
    """Calls ``save`` (under ``lock``) for the requests it is given, coalescing those within ``delay_s``."""

    def __init__(self, save: Callable[[], object], lock: threading.RLock, background: bool, delay_s: float):
        self.save, self.lock, self.background, self.delay_s = save, lock, background, delay_s
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsaved = False

    def request(self) -> None:
        """Save now, or ask the background thread to (starting it on the first request)."""
        if not self.background:
            self.save()
            return
        with self.lock:
            self._unsaved = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="adisc-index-saver", daemon=True)
                self._thread.start()
        self._wanted.set()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wanted.wait()
            self._wanted.clear()
            if self._closed.wait(self.delay_s):
                return
            try:
                self.flush()
            except Exception:
                logger.exception("index checkpoint failed; the next one (or a replay on open) catches up")

    def flush(self) -> None:
        """Write a pending save now (a no-op when nothing is pending)."""
        with self.lock:
            if self._unsaved:
                self.save()
                self._unsaved = False

    def close(self) -> None:
        """Write the pending save and stop the thread."""
        self.flush()
        self._closed.set()
        self._wanted.set()
