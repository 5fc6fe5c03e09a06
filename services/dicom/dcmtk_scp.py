"""dcmtk as the listener's network side (``CBMIR_DICOM_RECEIVER=dcmtk``).

The native program ``cbmir-dcmtk-scp`` (``native/dcmtk-scp/cbmir-dcmtk-scp.cc``, built by
``make dcmtk-scp`` against Debian's ``libdcmtk-dev``) receives associations on a socket this process
binds and hands over, and does each C-STORE's receive, parse check and durable spooling itself
(fsync of the file and the folder before it answers). It reports each event as one line on its
stdout; :class:`DcmtkScp` reads them and hands them to the listener, which sends the workers their
references, counts the metrics and quarantines what was refused as malformed.

The program is a child of the listener: it ends when the listener ends (``PR_SET_PDEATHSIG``), and
the listener starts it again on the same socket when it dies (connections wait in the socket's
backlog meanwhile). What it had stored and not yet reported is in ``spool/incoming`` and is sent by
the sweep that follows every restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import ConfigError
from services.core.logs import mask_values

logger = logging.getLogger(__name__)

BINARY_NAME = "cbmir-dcmtk-scp"
BUILD_HINT = "build it with `make dcmtk-scp` (needs g++ and Debian's libdcmtk-dev)"
VERIFICATION = "1.2.840.10008.1.1"
# Restarts of a program that keeps dying are spaced out up to this.
MAX_RESTART_DELAY_S = 10.0
# How long a starting program may take to say "ready".
READY_TIMEOUT_S = 10.0


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _plain_names(names: list[str]) -> bool:
    return all(name and "/" not in name and name not in (".", "..") for name in names)


def find_binary() -> Path:
    """The native SCP: beside this Python (a virtual environment's ``bin``), else on ``PATH``."""
    beside = Path(sys.executable).parent / BINARY_NAME
    if beside.is_file():
        return beside
    found = shutil.which(BINARY_NAME)
    if found:
        return Path(found)
    raise ConfigError(f"CBMIR_DICOM_RECEIVER=dcmtk needs the program {BINARY_NAME}: {BUILD_HINT}")


@dataclass(frozen=True)
class ScpEvent:
    """One line of the native SCP.

    ``kind`` is one of:

    * ``stored``: ``name``, ``size``, ``seconds``;
    * ``refused``: ``status``, ``reason``, ``kept`` (the name of the refused file in spool/tmp
      when it is to be quarantined), ``name``, ``detail``;
    * ``association``: ``reason`` (accepted, rejected or aborted), ``detail`` (why it was rejected:
      calling-ae, too-many, no-request; or aborted: peer, idle, error), ``peer``, ``calling`` (the
      calling AE title, printable ASCII only).
    """

    kind: str
    name: str = ""
    size: int = 0
    seconds: float = 0.0
    status: int = 0
    reason: str = ""
    kept: str | None = None
    detail: str = ""
    peer: str = ""
    calling: str = ""


def parse_event(line: str) -> ScpEvent | None:
    """An event line (see ``native/dcmtk-scp/cbmir-dcmtk-scp.cc``); None for anything else.

    File names are single names without a folder: a line that names anything else is not an event."""
    words = line.rstrip("\n").split(" ")
    if words[0] in ("stored", "refused") and not _plain_names(
        words[1:2] if words[0] == "stored" else words[3:5]
    ):
        return None
    try:
        if words[0] == "stored" and len(words) == 4:
            return ScpEvent("stored", name=words[1], size=int(words[2]), seconds=int(words[3]) / 1e6)
        if words[0] == "refused" and len(words) >= 5:
            kept = None if words[3] == "-" else words[3]
            return ScpEvent(
                "refused",
                status=int(words[1], 16),
                reason=words[2],
                kept=kept,
                name=words[4],
                detail=" ".join(words[5:]),
            )
        if words[0] == "association" and len(words) >= 5:
            calling = " ".join(words[4:])
            return ScpEvent(
                "association",
                reason=words[1],
                peer=words[2],
                detail=words[3],
                calling="" if calling == "-" else calling,
            )
    except ValueError:
        return None
    return None


@dataclass(frozen=True)
class ScpOptions:
    """What the native SCP is told (the listener's settings, and the one vocabulary of classes)."""

    ae_title: str
    spool_tmp: Path
    incoming: Path
    storage_classes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    max_pdu: int
    acse_timeout_s: int
    idle_timeout_s: int
    max_associations: int
    min_free_mb: int
    allowed_ae_titles: frozenset[str]

    def argv(self, binary: Path, listen_fd: int) -> list[str]:
        """The program's command line."""
        argv = [
            str(binary),
            *("--listen-fd", str(listen_fd)),
            *("--ae-title", self.ae_title),
            *("--spool-tmp", str(self.spool_tmp)),
            *("--incoming", str(self.incoming)),
            *("--max-pdu", str(self.max_pdu)),
            *("--acse-timeout", str(self.acse_timeout_s)),
            *("--idle-timeout", str(self.idle_timeout_s)),
            *("--max-associations", str(self.max_associations)),
            *("--min-free-mb", str(self.min_free_mb)),
            *("--parent-pid", str(os.getpid())),
        ]
        for title in sorted(self.allowed_ae_titles):
            argv += ["--allow", title]
        return argv

    def contexts(self) -> str:
        """The presentation contexts, as the program reads them on its stdin."""
        lines = [f"ts {uid}" for uid in self.transfer_syntaxes]
        lines += [f"sop {uid}" for uid in (VERIFICATION, *self.storage_classes)]
        return "\n".join([*lines, "end"]) + "\n"


class DcmtkScp:
    """The native SCP as a supervised child process on a socket bound here."""

    def __init__(
        self,
        options: ScpOptions,
        listening: socket.socket,
        on_event: Callable[[ScpEvent], None],
        on_restart: Callable[[], None] = lambda: None,
        binary: Path | None = None,
    ):
        self.options = options
        self.binary = binary or find_binary()
        self._socket = listening
        self._on_event = on_event
        self._on_restart = on_restart
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # stop() either sees a new child or prevents it
        self._process: subprocess.Popen[bytes] | None = None
        self._supervisor: threading.Thread | None = None
        self.restarts = 0

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._socket.getsockname()[1])

    @property
    def pid(self) -> int | None:
        """The running program's process ID."""
        return self._process.pid if self._process is not None else None

    def start(self) -> int:
        """Start the program and wait until it serves; returns the port. ConfigError when it cannot
        start (a missing library, contexts it refuses)."""
        if self._spawn() != "ready":
            raise ConfigError(f"{BINARY_NAME} did not start: {self._failure_text()}")
        self._supervisor = threading.Thread(target=self._supervise, name="dcmtk-scp", daemon=True)
        self._supervisor.start()
        return self.port

    def _spawn(self) -> str:
        """Start the program, hand it the contexts; its first line ("ready"), or "" after
        :data:`READY_TIMEOUT_S`."""
        fd = self._socket.fileno()
        process = subprocess.Popen(
            self.options.argv(self.binary, fd),
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self._process = process
        with contextlib.suppress(OSError):
            process.stdin.write(self.options.contexts().encode())
            process.stdin.flush()
        threading.Thread(
            target=self._log_stderr, args=(process.stderr,), name="dcmtk-scp-log", daemon=True
        ).start()
        stdout = process.stdout
        first: list[bytes] = []
        reader = threading.Thread(target=lambda: first.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT_S)
        return _text(first[0]).strip() if first else ""

    def _failure_text(self) -> str:
        process = self._process
        if process is None:
            return "not started"
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return f"it did not report ready within {READY_TIMEOUT_S:.0f} s"
        return f"exit code {code}"

    @staticmethod
    def _log_stderr(stream: Iterable[bytes]) -> None:
        for raw in stream:
            text = mask_values(_text(raw).strip())
            if text:
                logger.warning("%s: %s", BINARY_NAME, text[:500])

    @staticmethod
    def _confirm(process: subprocess.Popen[bytes], line: str) -> None:
        assert process.stdin is not None
        with contextlib.suppress(OSError, ValueError):  # the program is gone: nothing waits
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()

    def _supervise(self) -> None:
        delay = 0.5
        while True:
            process = self._process
            assert process is not None and process.stdout is not None
            started = time.monotonic()
            for raw in process.stdout:  # split at b"\n" only; bytes that are not UTF-8 are replaced
                event = parse_event(_text(raw))
                if event is None:
                    logger.warning(
                        "%s: unexpected line %r", BINARY_NAME, mask_values(_text(raw).strip())[:200]
                    )
                    continue
                try:
                    self._on_event(event)
                except Exception:  # one event's handling must not stop the stream of them
                    logger.exception("handling a %s event failed", event.kind)
                if event.kept is not None:  # its answer waits for this (see the program's header)
                    self._confirm(process, f"kept {event.kept}")
            code = process.wait()
            if self._stopping.is_set():
                return
            delay = 0.5 if time.monotonic() - started > 60 else min(MAX_RESTART_DELAY_S, delay * 2)
            logger.error(
                "%s ended with exit code %s; starting it again in %.1f s (connections wait meanwhile)",
                BINARY_NAME,
                code,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._spawning:
                if self._stopping.is_set():
                    return
                try:
                    ready = self._spawn() == "ready"
                    why = "" if ready else self._failure_text()
                except OSError as exc:
                    ready, why = False, str(exc)
            if not ready:
                logger.error("%s did not start again: %s", BINARY_NAME, why)
                continue
            self.restarts += 1
            threading.Thread(target=self._after_restart, name="dcmtk-scp-restarted", daemon=True).start()

    def _after_restart(self) -> None:
        try:
            self._on_restart()
        except Exception:  # the periodic sweep sends them later
            logger.exception("after restarting %s", BINARY_NAME)

    def stop(self) -> None:
        """Stop the program (open associations end with it) and close the socket."""
        with self._spawning:
            self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(OSError):
            self._socket.close()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
