"""``cbmir watch DIR``: take files dropped into a folder into the same path as the DICOM listener.

Every accepted file becomes one DICOM object in the spool (:meth:`Spool.store`, durable) and one
``cbmir.embed_instance`` task; the workers cannot tell a watched file from a received one.

Input rules (the conformance document lists them too):

* **Which files.** Regular files anywhere under DIR. Ignored: every path with a component that
  starts with a dot (dotfiles, ``.processed/``, ``.failed/``, editors' swap files), names ending in
  ``.part``, ``.tmp``, ``.partial`` or ``~`` (a copy still in progress: rename when done), and
  symbolic links.
* **Complete files only.** A file is taken once its size and modification time have not changed
  for ``settle_s`` seconds (``--settle``, default 1 s) *and* no process holds it open for writing
  (checked with a Linux read lease where the kernel allows one; elsewhere the settle rule alone).
* **What happens to it** (DICOM spooled as received, PNG/JPEG and EDF converted into DICOM, under
  which UIDs) is :mod:`services.ingest.convert`'s business.
* **After the spool write is durable and the task is sent**, the original moves to
  ``DIR/.processed/<relative path>``; a file that cannot be used (not decodable, unsupported) is
  copied into the quarantine with a reason (``stage: watcher``, counted by ``cbmir stats``) and the
  original moves to ``DIR/.failed/<relative path>``. Nothing is ever deleted; a name already taken
  there gets a numeric suffix. Files already in DIR when the watcher starts are taken too, so
  nothing dropped while it was down is missed, and nothing moved out is seen again.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from services.core import metrics
from services.core.config import MetricsSettings, WatcherSettings
from services.core.errors import CbmirError, ConfigError, StorageError
from services.core.files import fsync_dir
from services.core.logs import describe, file_ref
from services.core.processes import run_until_stopped
from services.ingest.convert import FileConverter
from services.ingest.dispatch import PendingSweep, TaskDispatcher
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)

PROCESSED_DIR = ".processed"
FAILED_DIR = ".failed"
TEMP_SUFFIXES = (".part", ".tmp", ".partial", "~")


# --- which files ------------------------------------------------------------------------------


def is_ignored(relative: Path) -> bool:
    """Dotfiles, anything under a dot folder (``.processed``, ``.failed``) and temp names."""
    if any(part.startswith(".") for part in relative.parts):
        return True
    return relative.name.lower().endswith(TEMP_SUFFIXES)


def writer_active(path: Path) -> bool | None:
    """Whether another process holds ``path`` open for writing (Linux read lease); None: unknown."""
    import fcntl

    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None  # EACCES: not our file
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


# --- the watcher ---------------------------------------------------------------------------------


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    not_before: float = 0.0
    failures: int = 0


class FolderWatcher:
    """Watches ``watch_dir``; :meth:`start` runs the observer and the ingest loop in threads."""

    def __init__(
        self,
        settings: WatcherSettings,
        spool: Spool,
        dispatcher: TaskDispatcher,
        *,
        poll_s: float = 0.2,
        rescan_s: float = 10.0,
    ):
        if settings.watch_dir is None:
            raise ConfigError("no folder to watch: give DIR or set CBMIR_WATCH_DIR")
        self.root = Path(settings.watch_dir)
        self.settle_s = settings.settle_s
        self.spool = spool
        self.dispatcher = dispatcher
        self.converter = FileConverter()
        self.poll_s = poll_s
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._candidates: dict[Path, _Candidate] = {}
        self._awaiting_dispatch: dict[Path, Path] = {}  # spooled, task in the backlog: source -> rel
        self._stuck: dict[Path, tuple[int, int]] = {}  # handled but could not be moved away
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self.sweep = PendingSweep(spool, dispatcher, settings.resend_after_s)

    # -- discovery ----------------------------------------------------------------------------
    def notice(self, path: str | os.PathLike) -> None:
        """A file event (or a scan) saw ``path``; it is considered once it has settled."""
        path = Path(path)
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return
        if is_ignored(relative):
            return
        with self._lock:
            if path not in self._candidates:
                self._candidates[path] = _Candidate(-1, -1, time.monotonic())

    def scan(self) -> int:
        """Walk the folder (dot folders pruned) and notice every regular file; returns how many."""
        found = 0
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                self.notice(Path(folder) / name)
                found += 1
        return found

    def _start_observer(self) -> None:
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.is_directory:
                    return
                target = getattr(event, "dest_path", "") or event.src_path
                if event.event_type in ("created", "modified", "moved", "closed") and target:
                    watcher.notice(os.fsdecode(target))

        try:
            observer = Observer()
            observer.schedule(Handler(), str(self.root), recursive=True)
            observer.start()
        except Exception as exc:  # noqa: BLE001 - inotify limits and the like: fall back to periodic scans
            logger.warning(
                "file events unavailable (%s); scanning %s every %.0f s", exc, self.root, self.rescan_s
            )
            return
        self._observer = observer

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the file observer and the ingest loop; files already there are taken too."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_observer()
        found = self.scan()
        self._thread = threading.Thread(target=self._loop, name="watch-ingest", daemon=True)
        self._thread.start()
        logger.info("watching %s (settle %.1f s); %d file(s) already there", self.root, self.settle_s, found)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop observing, finish the file in hand, close the broker connection."""
        self._stop.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self.dispatcher.close()

    def _loop(self) -> None:
        next_scan = time.monotonic() + self.rescan_s
        next_flush = time.monotonic() + 2.0
        next_sweep = time.monotonic() + self.sweep.interval_s
        while not self._stop.is_set():
            try:
                self.poll_once()
                now = time.monotonic()
                if now >= next_scan:
                    next_scan = now + self.rescan_s
                    self.scan()
                if now >= next_flush:
                    next_flush = now + 2.0
                    self._flush_backlog()
                if now >= next_sweep:
                    next_sweep = now + self.sweep.interval_s
                    self.sweep.sweep()
            except Exception:  # the loop must survive anything; files stay where they are
                logger.exception("watch loop iteration failed")
            self._stop.wait(self.poll_s)

    # -- settling and ingest ------------------------------------------------------------------
    def poll_once(self) -> int:
        """Take every candidate that has settled; returns how many files were handled."""
        now = time.monotonic()
        with self._lock:
            items = list(self._candidates.items())
        ready = []
        for path, candidate in items:
            try:
                info = os.lstat(path)
            except OSError:
                self._forget(path)
                continue
            if not stat.S_ISREG(info.st_mode):
                self._forget(path)
                continue
            if (info.st_size, info.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                candidate.size, candidate.mtime_ns, candidate.stable_since = (
                    info.st_size,
                    info.st_mtime_ns,
                    now,
                )
                continue
            if now - candidate.stable_since < self.settle_s or now < candidate.not_before:
                continue
            if path in self._awaiting_dispatch or self._stuck.get(path) == (info.st_size, info.st_mtime_ns):
                continue
            if writer_active(path):
                candidate.stable_since = now  # still open for writing: wait another settle period
                continue
            ready.append((info.st_mtime_ns, path))
        handled = 0
        for _, path in sorted(ready):
            if self._stop.is_set():
                break
            if self.ingest(path):
                handled += 1
        return handled

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(path, None)

    def _retry_later(self, path: Path, detail: str) -> None:
        with self._lock:
            candidate = self._candidates.get(path)
            if candidate is not None:
                candidate.failures += 1
                delay = min(60.0, 2.0 ** min(candidate.failures, 6))
                candidate.not_before = time.monotonic() + delay
        logger.error("%s: %s; trying again later", file_ref(path.relative_to(self.root)), detail)

    def ingest(self, path: Path) -> bool:
        """Convert, spool and dispatch one settled file, or quarantine it; then move it away."""
        relative = path.relative_to(self.root)
        try:
            converted = self.converter.convert(path, relative)
        except StorageError as exc:  # could not read it now: maybe later
            self._retry_later(path, str(exc))
            return False
        except CbmirError as exc:
            return self._fail(path, relative, exc.reason, str(exc))
        except Exception as exc:  # a bug must not stop the watcher, nor lose the file
            logger.exception("converting %s failed unexpectedly", file_ref(relative))
            return self._fail(path, relative, "internal-error", describe(exc))
        try:
            if converted.data is None:
                self.spool.store_file(path, converted.spool_name)
            else:
                self.spool.store(converted.spool_name, converted.data)
        except StorageError as exc:
            self._retry_later(path, str(exc))
            return False
        sent = self.dispatcher.embed(converted.spool_name)
        metrics.WATCH_FILES.labels("spooled").inc()
        logger.info("spooled %s as %s (%s)", file_ref(relative), converted.spool_name, converted.description)
        if not sent:  # in the dispatcher's backlog: the original stays until the task is sent
            self._forget(path)
            self._awaiting_dispatch[path] = relative
            return True
        self._move(path, relative, PROCESSED_DIR)
        return True

    def _fail(self, path: Path, relative: Path, reason: str, detail: str) -> bool:
        try:
            self.spool.quarantine(
                path, reason=reason, detail=detail, stage="watcher", source_name=str(relative)
            )
        except StorageError as exc:
            self._retry_later(path, f"cannot quarantine: {exc}")
            return False
        metrics.WATCH_FILES.labels("quarantined").inc()
        metrics.QUARANTINED.labels("watcher", metrics.slug(reason)).inc()
        self._move(path, relative, FAILED_DIR)
        return True

    def _move(self, path: Path, relative: Path, folder: str) -> Path | None:
        target = self.root / folder / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{target.stem}.{time.time_ns()}{target.suffix}")
            os.replace(path, target)
            fsync_dir(target.parent)
        except OSError as exc:
            try:
                info = os.lstat(path)
                self._stuck[path] = (info.st_size, info.st_mtime_ns)
            except OSError:
                pass
            logger.error(
                "handled %s but cannot move it into %s: %s", file_ref(relative), folder, exc.strerror or exc
            )
            return None
        self._forget(path)
        self._stuck.pop(path, None)
        return target

    def _flush_backlog(self) -> None:
        if not self.dispatcher.backlog_size and not self._awaiting_dispatch:
            return
        left = self.dispatcher.flush_backlog() if self.dispatcher.backlog_size else 0
        if left == 0 and self._awaiting_dispatch:
            waiting, self._awaiting_dispatch = self._awaiting_dispatch, {}
            for path, relative in waiting.items():
                self._move(path, relative, PROCESSED_DIR)
            logger.info("broker back: dispatch backlog flushed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir watch``."""
    parser.add_argument("dir", metavar="DIR", nargs="?", help="folder to watch (default CBMIR_WATCH_DIR)")
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long size and mtime must stay unchanged before a file is taken (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    """``cbmir watch``: watch (and serve its metrics, with CBMIR_METRICS_PORT) until SIGINT or SIGTERM."""
    settings = WatcherSettings.from_env()
    metrics_settings = MetricsSettings.from_env()
    if args.dir:
        settings = replace(settings, watch_dir=Path(args.dir).expanduser().resolve())
    if args.settle is not None:
        if args.settle < 0:
            print("cbmir watch: --settle must be >= 0", file=sys.stderr)
            return 2
        settings = replace(settings, settle_s=args.settle)
    if settings.watch_dir is None:
        print("cbmir watch: give DIR or set CBMIR_WATCH_DIR", file=sys.stderr)
        return 2
    watcher = FolderWatcher(settings, Spool(settings.layout), TaskDispatcher(settings.broker))
    endpoint: metrics.MetricsEndpoint | None = None

    def start() -> str:
        nonlocal endpoint
        endpoint = metrics.serve_metrics(metrics_settings)
        watcher.start()
        return f"cbmir watch: watching {settings.watch_dir}"

    def stop() -> None:
        watcher.stop()
        if endpoint is not None:
            endpoint.close()

    return run_until_stopped(start, stop)
