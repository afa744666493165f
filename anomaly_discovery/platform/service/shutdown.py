"""Stopping a server's whole process tree on SIGTERM exactly as on Ctrl-C (SIGINT).

``adisc ui`` runs ``streamlit run`` as a child in a process group of its own; ``adisc serve`` starts a local Ray
(GCS, raylet, workers, and the Serve proxy that holds the port). A process manager or a container runtime stops
a service with SIGTERM, whose default action ends only the process that receives it: its children would go on
serving. Inside :func:`interrupt_on_terminate` SIGTERM raises ``KeyboardInterrupt`` like SIGINT does, so one
cleanup path runs for both: the child's process group is stopped (:func:`stop_process_group`), Ray is shut down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

GRACE_S = 20.0


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def interrupt_on_terminate() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` in the main thread while the block runs (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_process_group(process: subprocess.Popen, grace_s: float = GRACE_S) -> int:
    """SIGTERM to the process group of ``process`` (started with ``start_new_session=True``), SIGKILL when it has
    not ended after ``grace_s`` seconds, and SIGKILL to any member left once it has; returns its exit code."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
    _signal_group(process.pid, signal.SIGKILL)
    return code


def _signal_group(group: int, sent: signal.Signals) -> None:
    try:
        os.killpg(group, sent)
    except ProcessLookupError:
        pass
