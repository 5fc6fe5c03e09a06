"""Starting and stopping processes: the one way cbmir stops a child and waits for a stop signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable


def stop_process(process: subprocess.Popen[str], timeout_s: float = 15.0, *, group: bool = False) -> int:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit code.

    With ``group=True`` the SIGKILL after a timeout goes to the child's whole process group (for
    children started with ``start_new_session=True``), so nothing it started outlives it.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()
    return process.returncode


def run_until_stopped(start: Callable[[], str], stop: Callable[[], None]) -> int:
    """``start()``, print the line it returns (how a supervisor or a test learns the bound port),
    block until SIGINT or SIGTERM, then ``stop()``; returns the exit code 0.

    The line and its newline go out in one write: ``print`` writes them separately, and with an
    unbuffered stdout shared with stderr, another thread's log line landed between them, so a
    reader parsed the port's digits run on into the log's date."""
    sys.stdout.write(f"{start()}\n")
    sys.stdout.flush()
    wait_for_stop_signal()
    stop()
    return 0


def wait_for_stop_signal() -> None:
    """Block the main thread until SIGINT or SIGTERM arrives."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
