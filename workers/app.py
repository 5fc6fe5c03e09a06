"""The Celery application and its tasks, ``cbmir.embed_instances`` and ``cbmir.embed_instance``.

Tasks carry spool file names, never pixels: ``cbmir.embed_instances`` a batch (what the listener,
the watcher and the sweep send), ``cbmir.embed_instance`` one (what earlier versions sent, and
what a batch hands an instance that failed unexpectedly, so that it gets its own retries). They are
idempotent (the point ID is uuid5 of the SOP Instance UID, so a repeat overwrites the same point)
and acknowledged late. What happens on a failure depends on what failed:

* the input (InvalidInput: undecodable, unsupported, too large): quarantined with its reason;
* a backend or the disk (BackendUnavailable, StorageError, ConfigError): the task is retried,
  for the instances it hit (all of them when it hit the shared encoder or index write), with
  capped exponential backoff for ``CBMIR_RETRY_BUDGET_S``, never quarantined; past the budget the
  instances stay in the spool and the listener sends them again;
* anything else (a bug): ``CBMIR_MAX_RETRIES`` retries, then quarantined as ``internal-error``;
  in a batch, the instance (or, for a failure of the batch's shared stages, every instance) is
  sent again as its own ``cbmir.embed_instance`` task, so the others are not held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

from celery import Celery, Task

from services.core import metrics
from services.core.broker import EMBED_BATCH_TASK, EMBED_TASK, celery_app
from services.core.config import WorkerSettings
from services.core.errors import BackendUnavailable, CbmirError, InvalidInput, StorageError
from services.core.logs import describe
from workers.pipeline import TRANSIENT, EmbeddingPipeline

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 120.0
# An instance spooled this long ago is marked as being worked on (Spool.mark_attempt) before a
# batch starts, so the listener's sweep does not send it again beside the worker. A fresh one
# needs no mark (the sweep waits CBMIR_RESEND_AFTER_S, 10 minutes by default, and a duplicate would
# only cost work); at hundreds of instances a second the marker files cost more than the embedding.
MARK_ATTEMPT_AFTER_S = 60.0


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

    @app.task(name=EMBED_BATCH_TASK, bind=True, acks_late=True, max_retries=None)
    def embed_instances(task: Task, spool_names: list[str]) -> dict:
        pipeline = holder.get()
        counts: Counter[str] = Counter()
        present: list[Path] = []
        for name in dict.fromkeys(spool_names):
            path = pipeline.locate(name)
            if path is None:
                outcome = pipeline.outcome_without_file(name)
                metrics.TASKS.labels(outcome.status).inc()
                counts[outcome.status] += 1
                continue
            if task.request.retries or time.time() - spooled_at(path) > MARK_ATTEMPT_AFTER_S:
                pipeline.spool.mark_attempt(name)  # the sweep does not send it again beside us
            present.append(path)
        if not present:
            return {"status": "done", "counts": dict(counts)}
        try:
            result = pipeline.embed_and_upsert_many(present)
        except TRANSIENT as exc:  # the encoder or the write: the whole batch again
            return _retry_names(task, dict.fromkeys((path.name for path in present), exc), pipeline, counts)
        except Exception as exc:  # noqa: BLE001 - a bug in a shared stage: each instance on its own
            logger.error(
                "%d instance(s) from %s: batch failed (%s); each is retried as its own task",
                len(present),
                present[0].name,
                describe(exc),
            )
            for path in present:
                embed_instance.apply_async(args=[path.name], queue=settings.broker.queue)
            return {"status": "split", "counts": {**counts, "split": len(present)}}
        # each name on its own from here: one that cannot be moved is retried, not the others
        again: dict[str, Exception] = dict(result.transient)
        done = [name for name in result.indexed if not pipeline.spool.erased_recently(name)]
        result.erased += [name for name in result.indexed if name not in done]
        again.update(pipeline.spool.archive_many(done))
        archived = [name for name in done if name not in again]
        metrics.TASKS.labels("indexed").inc(len(archived))
        counts["indexed"] += len(archived)
        for name, invalid in result.invalid.items():
            try:
                pipeline.quarantine(pipeline.spool.incoming_path(name), invalid.reason, str(invalid))
            except StorageError as exc:
                again[name] = exc
                continue
            metrics.TASKS.labels("quarantined").inc()
            counts["quarantined"] += 1
        for name, failure in result.failed.items():
            logger.warning("%s failed (%s); it is retried as its own task", name, describe(failure))
            try:
                embed_instance.apply_async(args=[name], queue=settings.broker.queue)
            except Exception as exc:  # noqa: BLE001 - the broker: this task is retried with it
                again[name] = BackendUnavailable(f"cannot send task to broker: {describe(exc)}")
                continue
            counts["split"] += 1
        for name in result.erased:
            logger.info("%s was erased while it was being indexed; nothing kept", name)
        metrics.TASKS.labels("erased").inc(len(result.erased))
        counts["erased"] += len(result.erased)
        logger.info(
            "indexed %d of %d instance(s) (%d points) from %s",
            counts["indexed"],
            len(spool_names),
            sum(result.indexed.values()),
            present[0].name,
        )
        if again:
            return _retry_names(task, again, pipeline, counts)
        return {"status": "done", "counts": dict(counts)}

    def _retry_names(
        task: Task, again: dict[str, Exception], pipeline: EmbeddingPipeline, counts: Counter
    ) -> dict:
        """Retry the task for ``again`` only (a disk or a backend that failed for those names),
        within the retry budget; past it they stay in the spool for the listener's sweep."""
        names = list(again)
        exc = next(iter(again.values()))
        what = f"{len(names)} instance(s) from {names[0]}"
        waited_s = time.time() - min(spooled_at(pipeline.spool.incoming_path(name)) for name in names)
        if waited_s > settings.retry_budget_s:
            logger.error(
                "%s still failing after %.0f s (%s); left in the spool for the listener to send again",
                what,
                waited_s,
                exc,
            )
            metrics.TASKS.labels("pending").inc(len(names))
            return {"status": "pending", "counts": {**counts, "pending": len(names)}}
        metrics.TASK_RETRIES.labels("transient").inc()
        raise _retry(task, exc, what, max_retries=None, args=[names]) from exc

    def _retry(
        task: Task, exc: Exception, spool_name: str, max_retries: int | None, args: list | None = None
    ) -> Exception:
        countdown = min(MAX_BACKOFF_S, settings.retry_backoff_s * (2 ** min(task.request.retries, 16)))
        logger.warning(
            "%s failed (%s: %s); retry %d in %.1fs",
            spool_name,
            type(exc).__name__,
            exc,
            task.request.retries + 1,
            countdown,
        )
        retry: Exception = task.retry(args=args, exc=exc, countdown=countdown, max_retries=max_retries)
        return retry

    return app


def spooled_at(path: Path) -> float:
    """When an instance was spooled (its file's modification time); now if it is gone."""
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
