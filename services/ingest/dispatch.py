"""Sending work to the Celery workers, by task name only.

``services/`` never imports ``workers/``: the listener and the watcher send the task name and a
spool file name. The workers resolve the name against their own data directory (a shared volume
in a distributed deployment).
"""

from __future__ import annotations

import logging
import threading

from services.core.broker import EMBED_TASK, celery_app
from services.core.config import BrokerSettings
from services.core.errors import BackendUnavailable

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
