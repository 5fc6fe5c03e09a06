"""The Celery application and its one task, ``cbmir.embed_instance``.

Tasks carry a spool file name, never pixels. They are idempotent (the point ID is uuid5 of the
SOP Instance UID, so a repeat overwrites the same point), acknowledged late, retried with
exponential backoff, and after the last retry the instance is quarantined with its reason.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery, Task

from services.core.broker import EMBED_TASK, celery_app
from services.core.config import WorkerSettings
from services.core.errors import CbmirError, InvalidInput
from workers.pipeline import EmbeddingPipeline

logger = logging.getLogger(__name__)


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

    @app.task(name=EMBED_TASK, bind=True, acks_late=True, max_retries=settings.max_retries)
    def embed_instance(task: Task, spool_name: str) -> dict:
        pipeline = holder.get()
        path = pipeline.locate(spool_name)
        if path is None:
            return pipeline.outcome_without_file(spool_name).as_dict()
        try:
            points = pipeline.embed_and_upsert(path)
        except InvalidInput as exc:
            # The bytes will not change on a retry: keep them, with the reason, and stop.
            pipeline.quarantine(path, exc.reason, str(exc))
            return {"status": "quarantined", "spool_name": spool_name, "reason": exc.reason}
        except Exception as exc:
            reason = exc.reason if isinstance(exc, CbmirError) else "internal-error"
            if task.request.retries >= task.max_retries:
                pipeline.quarantine(
                    path, reason, f"after {task.request.retries} retries: {type(exc).__name__}: {exc}"
                )
                return {"status": "quarantined", "spool_name": spool_name, "reason": reason}
            countdown = min(120.0, settings.retry_backoff_s * (2**task.request.retries))
            logger.warning(
                "%s failed (%s: %s); retry %d in %.1fs",
                spool_name,
                type(exc).__name__,
                exc,
                task.request.retries + 1,
                countdown,
            )
            raise task.retry(exc=exc, countdown=countdown) from exc
        pipeline.archive(spool_name)
        logger.info("indexed %s (%d point%s)", spool_name, points, "" if points == 1 else "s")
        return {"status": "indexed", "spool_name": spool_name, "points": points}

    return app
