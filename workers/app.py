"""The Celery application and its one task, ``cbmir.embed_instance``.

Tasks carry a spool file name, never pixels. They are idempotent (the point ID is uuid5 of the
SOP Instance UID, so a repeat overwrites the same point) and acknowledged late. What happens on a
failure depends on what failed:

* the input (InvalidInput: undecodable, unsupported, too large): quarantined with its reason;
* a backend or the disk (BackendUnavailable, StorageError, ConfigError): retried with capped
  exponential backoff for ``CBMIR_RETRY_BUDGET_S``, never quarantined; past the budget the
  instance stays in the spool and the listener sends it again;
* anything else (a bug): ``CBMIR_MAX_RETRIES`` retries, then quarantined as ``internal-error``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from celery import Celery, Task

from services.core import metrics
from services.core.broker import EMBED_TASK, celery_app
from services.core.config import WorkerSettings
from services.core.errors import BackendUnavailable, CbmirError, ConfigError, InvalidInput, StorageError
from services.core.logs import describe
from workers.pipeline import EmbeddingPipeline

logger = logging.getLogger(__name__)

# Failures that pass: the index owner or the broker is down, the disk is full, the model is being
# changed. They are retried with capped backoff for CBMIR_RETRY_BUDGET_S and never quarantine.
TRANSIENT = (BackendUnavailable, StorageError, ConfigError)
MAX_BACKOFF_S = 120.0


class PipelineHolder:
    """One :class:`~workers.pipeline.EmbeddingPipeline` per process, built on first use."""

    def __init__(self, settings: WorkerSettings):
        self._settings = settings
        self._lock = threading.Lock()
        self._pipeline: EmbeddingPipeline | None = None

    def get(self) -> EmbeddingPipeline:
        """The process's pipeline (the ONNX session is built by the first caller)."""
        if self._pipeline is None:
            with self._lock:
                if self._pipeline is None:
                    self._pipeline = EmbeddingPipeline(self._settings)
        return self._pipeline


def create_app(settings: WorkerSettings, holder: PipelineHolder | None = None) -> Celery:
    """Build the worker's Celery app from its settings and register the task.

    ``holder`` gives the task its pipeline; pass one to build the encoder before the worker starts.
    """
    app = celery_app(
        settings.broker,
        "cbmir",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    holder = holder or PipelineHolder(settings)

    @app.task(name=EMBED_TASK, bind=True, acks_late=True, max_retries=None)
    def embed_instance(task: Task, spool_name: str) -> dict:
        pipeline = holder.get()
        path = pipeline.locate(spool_name)
        if path is None:
            outcome = pipeline.outcome_without_file(spool_name)
            metrics.TASKS.labels(outcome.status).inc()
            return outcome.as_dict()
        pipeline.spool.mark_attempt(spool_name)  # the sweep does not send it again beside us
        try:
            points = pipeline.embed_and_upsert(path)
        except InvalidInput as exc:
            # The bytes will not change on a retry: keep them, with the reason, and stop.
            pipeline.quarantine(path, exc.reason, str(exc))
            metrics.TASKS.labels("quarantined").inc()
            return {"status": "quarantined", "spool_name": spool_name, "reason": exc.reason}
        except TRANSIENT as exc:
            # The index, the broker or the disk will come back: retry within the budget, never
            # quarantine. Past the budget the instance stays spooled; the listener re-sends it.
            waited_s = time.time() - spooled_at(path)
            if waited_s > settings.retry_budget_s:
                logger.error(
                    "%s still failing after %.0f s (%s); left in the spool for the listener to send again",
                    spool_name,
                    waited_s,
                    exc,
                )
                metrics.TASKS.labels("pending").inc()
                return {"status": "pending", "spool_name": spool_name, "reason": exc.reason}
            metrics.TASK_RETRIES.labels("transient").inc()
            raise _retry(task, exc, spool_name, max_retries=None) from exc
        except Exception as exc:  # a bug: a few retries (CBMIR_MAX_RETRIES), then quarantine
            reason = exc.reason if isinstance(exc, CbmirError) else "internal-error"
            if task.request.retries >= settings.max_retries:
                pipeline.quarantine(path, reason, f"after {task.request.retries} retries: {describe(exc)}")
                metrics.TASKS.labels("quarantined").inc()
                return {"status": "quarantined", "spool_name": spool_name, "reason": reason}
            metrics.TASK_RETRIES.labels("error").inc()
            raise _retry(task, exc, spool_name, max_retries=settings.max_retries) from exc
        if points is None or pipeline.spool.erased_recently(spool_name):
            metrics.TASKS.labels("erased").inc()
            logger.info("%s was erased while it was being indexed; nothing kept", spool_name)
            return {"status": "erased", "spool_name": spool_name}
        pipeline.archive(spool_name)
        metrics.TASKS.labels("indexed").inc()
        logger.info("indexed %s (%d point%s)", spool_name, points, "" if points == 1 else "s")
        return {"status": "indexed", "spool_name": spool_name, "points": points}

    def _retry(task: Task, exc: Exception, spool_name: str, max_retries: int | None) -> Exception:
        countdown = min(MAX_BACKOFF_S, settings.retry_backoff_s * (2 ** min(task.request.retries, 16)))
        logger.warning(
            "%s failed (%s: %s); retry %d in %.1fs",
            spool_name,
            type(exc).__name__,
            exc,
            task.request.retries + 1,
            countdown,
        )
        retry: Exception = task.retry(exc=exc, countdown=countdown, max_retries=max_retries)
        return retry

    return app


def spooled_at(path: Path) -> float:
    """When an instance was spooled (its file's modification time); now if it is gone."""
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
