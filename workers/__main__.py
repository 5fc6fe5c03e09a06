"""``python -m workers``: run a Celery embedding worker (what ``cbmir worker`` becomes)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from services.core import metrics
from services.core.config import MetricsSettings, WorkerSettings
from services.core.errors import CbmirError
from services.core.logs import configure_logging
from services.ops.cli import add_worker_arguments
from workers.app import PipelineHolder, create_app

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the settings, the encoder session and the Celery app, serve the metrics (with
    CBMIR_METRICS_PORT), then consume until stopped."""
    parser = argparse.ArgumentParser(prog="cbmir worker", description="Run a Celery embedding worker.")
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    settings = WorkerSettings.from_env()
    metrics_settings = MetricsSettings.from_env()
    holder = PipelineHolder(settings)
    app = create_app(settings, holder)
    holder.get()  # build the encoder session now, so the provider choice is logged once at start
    concurrency = args.concurrency or settings.concurrency
    worker_args = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={settings.broker.queue}",
        f"--loglevel={logging.getLevelName(logging.getLogger().level)}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if args.hostname:
        worker_args.append(f"--hostname={args.hostname}")
    logger.info(
        "worker: broker %s, queue %s, %d threads",
        _redact(settings.broker.url),
        settings.broker.queue,
        concurrency,
    )
    # the queue length is asked of the broker when scraped
    collectors = [metrics.QueueCollector(settings.broker)] if metrics_settings.enabled else []
    try:
        endpoint = metrics.serve_metrics(metrics_settings, collectors)
    except CbmirError as exc:  # the port is taken: one line, as every cbmir command says it
        print(f"cbmir worker: {exc}", file=sys.stderr)
        holder.get().close()
        return 2
    try:
        app.worker_main(worker_args)
    finally:
        holder.get().close()  # the batcher thread, the index writer's channel or the store
        if endpoint is not None:
            endpoint.close()
    return 0


def _redact(url: str) -> str:
    """A broker URL without its credentials."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


if __name__ == "__main__":
    raise SystemExit(main())
