"""Prometheus metrics: every metric cbmir exports, and the one way a process serves them.

Each process (``cbmir scp``, ``watch``, ``worker``, ``query``) serves its own registry at
``http://CBMIR_METRICS_HOST:CBMIR_METRICS_PORT/metrics`` when ``CBMIR_METRICS_PORT`` is set
(:func:`serve_metrics`). ``cbmir serve`` instead starts its children in prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` in their environment, a folder of the data
directory) and serves the merged metrics of all of them on its own port.

Counters and histograms are updated where things happen. What is a state rather than an event is
computed when scraped: the spool (pending instances, the oldest one's age, quarantine by reason)
by :class:`SpoolCollector` and the broker queue by :class:`QueueCollector`. The index's point count
is a gauge the index owner refreshes.

No PHI: label values are fixed vocabularies (DICOM status names, gRPC code names, modalities,
quarantine reasons, stages), never UIDs, names or file names; :func:`slug` turns anything else
into ``other``.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from services.core.config import BrokerSettings, MetricsSettings
from services.core.errors import BackendUnavailable
from services.core.vocabulary import MODALITIES, OTHER

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

# prometheus-client reads this variable when it is imported: set in a child's environment, the
# child writes its metrics into files there, which the parent merges (``cbmir serve``).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLUG = re.compile(r"[a-z][a-z0-9_-]{0,47}")


def slug(value: object, default: str = OTHER) -> str:
    """A label value from a fixed vocabulary (reason, modality): a lower-case slug, else ``default``.

    A slug starts with a letter and has no dots, so a UID can never become a label value.
    """
    text = str(value or "").strip().lower()
    return text if _SLUG.fullmatch(text) else default


# --- ingest: the DICOM listener, the folder watcher, task dispatch ---------------------------------

DICOM_ASSOCIATIONS = Counter(
    "cbmir_dicom_associations_total",
    "DICOM associations of the listener, by result: accepted, rejected, aborted.",
    ["result"],
)
DICOM_RECEIVER_RESTARTS = Counter(
    "cbmir_dicom_receiver_restarts_total",
    "Times the listener started its dcmtk SCP again after it died (CBMIR_DICOM_RECEIVER=dcmtk).",
)
DICOM_INSTANCES_RECEIVED = Counter(
    "cbmir_dicom_instances_received_total",
    "C-STORE requests answered, by status: success, out-of-resources, dataset-mismatch, "
    "cannot-understand, processing-failure.",
    ["status"],
)
DICOM_RECEIVED_BYTES = Counter(
    "cbmir_dicom_received_bytes_total",
    "Bytes of the DICOM data sets the listener received (refused ones included).",
)
DICOM_STORE_SECONDS = Histogram(
    "cbmir_dicom_store_duration_seconds",
    "C-STORE handling, from the data set received to the answer (parse check, fsync, rename).",
    buckets=_LATENCY_BUCKETS,
)
WATCH_FILES = Counter(
    "cbmir_watch_files_total",
    "Dropped files the folder watcher handled, by result: spooled, quarantined.",
    ["result"],
)
TASKS_SENT = Counter(
    "cbmir_tasks_sent_total",
    "Embedding tasks handed to the broker, by result: sent, backlog (kept until the broker is back).",
    ["result"],
)
SPOOL_RESENT = Counter(
    "cbmir_spool_resent_total",
    "Pending instances sent to the workers again: at the listener's start, or after waiting "
    "longer than CBMIR_RESEND_AFTER_S.",
)
QUARANTINED = Counter(
    "cbmir_instances_quarantined_total",
    "Objects moved into quarantine, by stage (listener, watcher, worker) and reason.",
    ["stage", "reason"],
)

# --- workers -------------------------------------------------------------------------------------

INSTANCES_INDEXED = Counter(
    "cbmir_instances_indexed_total",
    "Instances embedded and upserted into the index, by modality.",
    ["modality"],
)
TASKS = Counter(
    "cbmir_tasks_total",
    "Embedding tasks finished, by outcome: indexed, quarantined, erased, pending (retry budget spent), "
    "already-indexed, missing.",
    ["outcome"],
)
TASK_RETRIES = Counter(
    "cbmir_task_retries_total",
    "Embedding task retries, by cause: transient (index, broker or disk unavailable) or error (unexpected).",
    ["cause"],
)
WORKER_STAGE_SECONDS = Histogram(
    "cbmir_worker_stage_duration_seconds",
    "Time per task (a batch of instances) in each worker stage: decode, embed, upsert (the group write).",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)

# --- query service -------------------------------------------------------------------------------

SEARCH_REQUESTS = Counter(
    "cbmir_search_requests_total",
    "SearchSimilar calls, by query kind (dicom, image, sop_instance_uid; unknown when refused before "
    "it was read) and gRPC status code.",
    ["kind", "code"],
)
SEARCH_SECONDS = Histogram(
    "cbmir_search_duration_seconds",
    "SearchSimilar latency in the service, by query kind.",
    ["kind"],
    buckets=_LATENCY_BUCKETS,
)
INDEX_POINTS = Gauge(
    "cbmir_index_points",
    "Points in the index, by modality (refreshed by the query service every few seconds).",
    ["modality"],
    multiprocess_mode="livemostrecent",
)


def set_index_points(counts: Mapping[str, int]) -> None:
    """Record the index's point count per modality (every modality, zeros included)."""
    for modality in (*MODALITIES, *(m for m in counts if m not in MODALITIES)):
        INDEX_POINTS.labels(slug(modality)).set(counts.get(modality, 0))


class StageClock:
    """Times consecutive stages of one instance: each :meth:`lap` observes the time since the last."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Record the time since the previous lap (or the start) as ``stage``."""
        now = time.perf_counter()
        WORKER_STAGE_SECONDS.labels(stage).observe(now - self._last)
        self._last = now


# --- computed when scraped -----------------------------------------------------------------------


class SpoolView(Protocol):
    """What :class:`SpoolCollector` reads of the spool (``services.ingest.spool.Spool`` has it)."""

    def pending_since(self) -> list[tuple[float, Path]]:
        """(time spooled, path) of every pending instance, oldest first."""
        ...

    def quarantine_counts(self) -> Mapping[str, int]:
        """Quarantined objects per reason."""
        ...


class SpoolCollector(Collector):
    """Pending instances, the oldest one's age (the index lag) and the quarantine by reason, read
    from the spool folders at each scrape."""

    def __init__(self, spool: SpoolView):
        self._spool = spool

    def describe(self) -> Iterable[Metric]:
        """The metric families, without reading the spool (at registration)."""
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "cbmir_spool_pending_instances",
                "Instances received and acknowledged, not yet indexed or quarantined.",
            ),
            GaugeMetricFamily(
                "cbmir_spool_oldest_pending_age_seconds",
                "Age of the oldest pending instance: the index lag (0 when nothing is pending).",
            ),
            GaugeMetricFamily(
                "cbmir_quarantine_instances", "Objects in quarantine now, by reason.", labels=["reason"]
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        """Scan the spool now."""
        pending, oldest, quarantine = self._families()
        try:
            dated = self._spool.pending_since()
            reasons = self._spool.quarantine_counts()
        except OSError as exc:
            logger.warning("metrics: cannot read the spool: %s", exc.strerror or exc)
            return []
        pending.add_metric([], len(dated))
        oldest.add_metric([], max(0.0, time.time() - dated[0][0]) if dated else 0.0)
        merged: dict[str, int] = {}
        for reason, count in reasons.items():
            merged[slug(reason)] = merged.get(slug(reason), 0) + count
        for reason, count in sorted(merged.items()):
            quarantine.add_metric([reason], count)
        return [pending, oldest, quarantine]


class QueueCollector(Collector):
    """Embedding tasks waiting in the broker queue, asked of the broker at each scrape."""

    def __init__(self, broker: BrokerSettings):
        from services.core.broker import celery_app  # Celery only where it is used

        self._queue = broker.queue
        self._app: Celery = celery_app(broker, "cbmir-metrics")
        self._failing = False

    def describe(self) -> Iterable[Metric]:
        """The metric family, without asking the broker (at registration)."""
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "cbmir_queue_messages",
            "Embedding tasks waiting in the broker queue, not yet taken by a worker.",
            labels=["queue"],
        )

    def collect(self) -> Iterable[Metric]:
        """Ask the broker now; without an answer the family has no sample (and a warning is logged)."""
        from services.core.broker import queue_length

        family = self._family()
        try:
            family.add_metric([self._queue], queue_length(self._app, self._queue))
        except Exception as exc:  # noqa: BLE001 - kombu raises many transport-specific types
            if not self._failing:
                logger.warning(
                    "metrics: cannot read the queue length from the broker: %s", type(exc).__name__
                )
            self._failing = True
        else:
            self._failing = False
        return [family]


# --- serving ---------------------------------------------------------------------------------------


class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: WSGIServer, host: str):
        self._server = server
        self.host = host
        self.port = int(server.server_port)

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    settings: MetricsSettings,
    collectors: Iterable[Collector] = (),
    *,
    multiprocess_dir: Path | None = None,
) -> MetricsEndpoint | None:
    """Serve ``/metrics`` where ``settings`` say (None: ``CBMIR_METRICS_PORT`` is unset, nothing is
    served), with ``collectors`` added; logs the URL.

    Served: this process's metrics; with ``multiprocess_dir`` (or ``PROMETHEUS_MULTIPROC_DIR`` in
    this process's environment) the merged metrics of every process writing there instead.
    """
    if settings.port is None:
        return None
    folder = multiprocess_dir or (
        Path(os.environ[MULTIPROCESS_ENV]) if os.environ.get(MULTIPROCESS_ENV) else None
    )
    if folder is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(folder))
    else:
        registry = REGISTRY
    for collector in collectors:
        registry.register(collector)
    try:
        server, _ = start_http_server(settings.port, settings.host, registry)
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot bind the metrics endpoint {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    endpoint = MetricsEndpoint(server, settings.host)
    logger.info("metrics on %s", endpoint.url)
    return endpoint


def prepare_multiprocess_dir(folder: Path) -> Path:
    """Create ``folder`` for children's metric files and empty it (stale files of an earlier run)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    return folder


def forget_process(pid: int, folder: Path) -> None:
    """A child writing metrics into ``folder`` died: drop its live gauges (its counters stay)."""
    mark_process_dead(pid, str(folder))
