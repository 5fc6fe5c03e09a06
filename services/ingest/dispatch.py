"""Sending work to the Celery workers, by task name only.

``services/`` never imports ``workers/``: the listener and the watcher send the task name and a
spool file name. The workers resolve the name against their own data directory (a shared volume
in a distributed deployment).
"""

from __future__ import annotations

import logging
import threading
import time

from services.core import metrics
from services.core.broker import EMBED_TASK, celery_app
from services.core.config import BrokerSettings
from services.core.errors import BackendUnavailable
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)


class TaskDispatcher:
    """Sends ``cbmir.embed_instance(spool_name)``; keeps a backlog when the broker is down."""

    def __init__(self, broker: BrokerSettings):
        self._broker = broker
        self._app = celery_app(broker, "cbmir-dispatch")
        self._lock = threading.Lock()
        self._backlog: dict[str, None] = {}

    def embed(self, spool_name: str) -> bool:
        """Send the task; on broker failure keep it for :meth:`flush_backlog` and return False."""
        try:
            self._send(spool_name)
            return True
        except BackendUnavailable as exc:
            logger.error("broker unavailable, %s kept in backlog: %s", spool_name, exc)
            metrics.TASKS_SENT.labels("backlog").inc()
            with self._lock:
                self._backlog[spool_name] = None
            return False

    def _send(self, spool_name: str) -> None:
        try:
            self._app.send_task(
                EMBED_TASK,
                args=[spool_name],
                queue=self._broker.queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu raises many transport-specific types
            raise BackendUnavailable(f"cannot send task to broker: {type(exc).__name__}: {exc}") from exc
        metrics.TASKS_SENT.labels("sent").inc()

    def flush_backlog(self) -> int:
        """Retry every task the broker refused earlier; returns how many are still waiting."""
        with self._lock:
            waiting = list(self._backlog)
        for name in waiting:
            try:
                self._send(name)
            except BackendUnavailable:
                break
            with self._lock:
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
        for path in pending:
            self.dispatcher.embed(path.name)
            self._sent_at[path.name] = now
        metrics.SPOOL_RESENT.inc(len(pending))
        return len(pending)

    def sweep(self, now: float | None = None) -> int:
        """Re-send what waited too long, drop stale partial files; returns how many were re-sent."""
        now = time.time() if now is None else now
        sent, waiting = 0, set()
        for spooled_at, path in self.spool.pending_since():
            waiting.add(path.name)
            attempted = self.spool.last_attempt(path.name) or 0.0
            if now - max(spooled_at, attempted, self._sent_at.get(path.name, 0.0)) >= self.resend_after_s:
                self.dispatcher.embed(path.name)
                self._sent_at[path.name] = now
                sent += 1
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
