"""Sending work to the Celery workers, by task name only.

``services/`` never imports ``workers/``: the listener and the watcher send the task name and
spool file names. The workers resolve the names against their own data directory (a shared volume
in a distributed deployment). One task carries up to ``CBMIR_DISPATCH_BATCH`` names, so a worker
decodes, embeds and upserts them together, and the broker sees one message per batch.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable

from services.core import metrics
from services.core.broker import EMBED_BATCH_TASK, celery_app
from services.core.config import BrokerSettings
from services.core.errors import BackendUnavailable
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)


class TaskDispatcher:
    """Sends ``cbmir.embed_instances(spool_names)``; keeps a backlog when the broker is down."""

    def __init__(self, broker: BrokerSettings):
        self._broker = broker
        self._app = celery_app(broker, "cbmir-dispatch")
        self._lock = threading.Lock()
        self._backlog: dict[str, None] = {}

    @property
    def batch_size(self) -> int:
        """The most spool names one task carries (``CBMIR_DISPATCH_BATCH``)."""
        return self._broker.dispatch_batch

    def embed(self, spool_name: str) -> bool:
        """Send one instance's task; on broker failure keep it for :meth:`flush_backlog` and
        return False."""
        return self.embed_many([spool_name]) == 1

    def embed_many(self, spool_names: Iterable[str]) -> int:
        """Send tasks of at most :attr:`batch_size` names each; returns how many names were sent.
        On broker failure the rest are kept for :meth:`flush_backlog`."""
        names = list(dict.fromkeys(spool_names))
        for start in range(0, len(names), self.batch_size):
            chunk = names[start : start + self.batch_size]
            try:
                self._send(chunk)
            except BackendUnavailable as exc:
                left = names[start:]
                logger.error("broker unavailable, %d instance(s) kept in backlog: %s", len(left), exc)
                metrics.TASKS_SENT.labels("backlog").inc(len(left))
                self.keep(left)
                return start
        return len(names)

    def _send(self, spool_names: list[str]) -> None:
        try:
            self._app.send_task(
                EMBED_BATCH_TASK,
                args=[spool_names],
                queue=self._broker.queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu raises many transport-specific types
            raise BackendUnavailable(f"cannot send task to broker: {type(exc).__name__}: {exc}") from exc
        metrics.TASKS_SENT.labels("sent").inc(len(spool_names))

    def keep(self, spool_names: Iterable[str]) -> None:
        """Put names in the backlog, to be sent by :meth:`flush_backlog`."""
        with self._lock:
            self._backlog.update(dict.fromkeys(spool_names))

    def flush_backlog(self) -> int:
        """Retry every task the broker refused earlier; returns how many are still waiting."""
        with self._lock:
            waiting = list(self._backlog)
        for start in range(0, len(waiting), self.batch_size):
            chunk = waiting[start : start + self.batch_size]
            try:
                self._send(chunk)
            except BackendUnavailable:
                break
            with self._lock:
                for name in chunk:
                    self._backlog.pop(name, None)
        with self._lock:
            return len(self._backlog)

    @property
    def backlog_size(self) -> int:
        """How many tasks wait for the broker to come back."""
        with self._lock:
            return len(self._backlog)

    def close(self) -> None:
        """Close the broker connection."""
        self._app.close()


class BackgroundDispatch:
    """Sends tasks from a thread, so a C-STORE response never waits for the broker, and gathers
    the names that arrive within ``CBMIR_DISPATCH_WAIT_MS`` of the first into one task (at most
    ``CBMIR_DISPATCH_BATCH``).

    Safe because the spool, not the broker, is the record: an instance whose task is lost in a
    crash is still in ``spool/incoming`` and is sent again when the listener starts.
    """

    def __init__(self, dispatcher: TaskDispatcher, wait_s: float):
        self._dispatcher = dispatcher
        self._wait_s = max(0.0, wait_s)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dispatch", daemon=True)
        self._thread.start()

    def __call__(self, spool_name: str) -> None:
        """Queue a spool name to be sent (returns at once)."""
        self._queue.put(spool_name)

    def _gather(self, first: str) -> tuple[list[str], bool]:
        """``first`` and what follows within the wait, up to a batch; True when told to stop."""
        names, deadline = [first], time.monotonic() + self._wait_s
        while len(names) < self._dispatcher.batch_size:
            try:
                name = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if name is None:
                return names, True
            names.append(name)
        return names, False

    def _run(self) -> None:
        stop = False
        while not stop and (first := self._queue.get()) is not None:
            names, stop = self._gather(first)
            try:
                self._dispatcher.embed_many(names)
            except Exception:  # the thread must live on: the names wait in the backlog
                logger.exception("sending %d instance(s) failed; they wait in the backlog", len(names))
                self._dispatcher.keep(names)
            for _ in names:
                self._queue.task_done()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until everything handed over so far was sent (or put in the backlog)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self.drain()
        self._queue.put(None)
        self._thread.join(timeout=5)


class PendingSweep:
    """Sends again what waits in the spool too long, so that no acknowledged instance is stranded.

    A task can be lost after its file was spooled: a broker that lost its data, a worker killed on
    a transport that never redelivers. The spool, not the broker, is the record: every instance
    still in ``spool/incoming`` longer than ``resend_after_s`` since it was spooled, last sent, or
    last attempted by a worker (:meth:`Spool.mark_attempt`: a worker retrying through an outage
    touches it at least every 2 minutes, so its task is not sent again beside it) gets its task
    again. Tasks are idempotent, so a duplicate costs only work. The listener and the watcher each
    run one (a deployment may run either alone).
    """

    STALE_TMP_S = 3600.0  # a partial write untouched for an hour has no writer left

    def __init__(self, spool: Spool, dispatcher: TaskDispatcher, resend_after_s: float):
        self.spool, self.dispatcher, self.resend_after_s = spool, dispatcher, resend_after_s
        self._sent_at: dict[str, float] = {}

    @property
    def interval_s(self) -> float:
        """How often :meth:`sweep` should run: a quarter of the re-send age, 1 to 60 s."""
        return max(1.0, min(60.0, self.resend_after_s / 4))

    def send_all(self) -> int:
        """Send every pending instance now (at a listener's start: a crash may have lost tasks)."""
        pending, now = self.spool.pending(), time.time()
        self.dispatcher.embed_many(path.name for path in pending)
        for path in pending:
            self._sent_at[path.name] = now
        metrics.SPOOL_RESENT.inc(len(pending))
        return len(pending)

    def sweep(self, now: float | None = None) -> int:
        """Re-send what waited too long, drop stale partial files; returns how many were re-sent."""
        now = time.time() if now is None else now
        stale, waiting = [], set()
        for spooled_at, path in self.spool.pending_since():
            waiting.add(path.name)
            attempted = self.spool.last_attempt(path.name) or 0.0
            if now - max(spooled_at, attempted, self._sent_at.get(path.name, 0.0)) >= self.resend_after_s:
                stale.append(path.name)
                self._sent_at[path.name] = now
        self.dispatcher.embed_many(stale)
        sent = len(stale)
        for name in set(self._sent_at) - waiting:  # indexed or quarantined since
            del self._sent_at[name]
        for marker in self.spool.layout.attempts.iterdir():  # markers whose instance is done
            if marker.name not in waiting:
                self.spool.forget_attempts(marker.name)
        if sent:
            metrics.SPOOL_RESENT.inc(sent)
            logger.warning("re-sent %d instance(s) not indexed after %d s", sent, self.resend_after_s)
        self.spool.remove_stale_tmp(self.STALE_TMP_S)
        self.spool.forget_old_erasures()  # erasure markers whose hold is over
        return sent
