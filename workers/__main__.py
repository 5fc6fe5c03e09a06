"""``python -m workers``: run a Celery embedding worker (what ``cbmir worker`` starts)."""

from __future__ import annotations

import argparse
import logging
import os

from services.core.config import WorkerSettings
from workers.app import create_app

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cbmir worker", description="Run a Celery embedding worker.")
    parser.add_argument("--concurrency", type=int, help="task threads (default CBMIR_WORKER_CONCURRENCY)")
    parser.add_argument("--hostname", default=None, help="Celery node name")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CBMIR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    settings = WorkerSettings.from_env()
    app = create_app(settings)
    # Build the encoder session now, so the provider choice is logged once at start.
    app.cbmir_pipeline.get()
    concurrency = args.concurrency or settings.concurrency
    worker_args = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={settings.broker.queue}",
        f"--loglevel={os.environ.get('CBMIR_LOG_LEVEL', 'INFO')}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if args.hostname:
        worker_args.append(f"--hostname={args.hostname}")
    logger.info("worker: broker %s, queue %s, %d threads", _redact(settings.broker.url), settings.broker.queue, concurrency)
    app.worker_main(worker_args)
    return 0


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


if __name__ == "__main__":
    raise SystemExit(main())
