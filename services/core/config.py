"""Typed settings, one object per component, read from environment variables.

Every setting has a documented default (see the README's configuration table, generated from
``ENVIRONMENT``). Settings are built in each component's ``main()`` and passed down; nothing here
runs at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, cast

from services.core.errors import ConfigError

# How multi-frame objects are embedded: the central frame only, or every frame.
FramePolicy = Literal["middle", "all"]


# name -> (default, meaning). The README's configuration table lists exactly these.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "CBMIR_DATA_DIR": ("./var", "Spool, archive, quarantine, embedded index and embedded broker live here."),
    "CBMIR_BROKER_URL": (
        "(embedded SQLite under the data dir)",
        "Celery broker, e.g. redis://127.0.0.1:6379/0.",
    ),
    "CBMIR_QUEUE": ("cbmir.embed", "Celery queue the listener and watcher send to."),
    "CBMIR_AE_TITLE": ("CBMIR", "AE title of the DICOM listener."),
    "CBMIR_DICOM_HOST": ("0.0.0.0", "Address the DICOM listener binds."),
    "CBMIR_DICOM_PORT": ("11112", "Port of the DICOM listener (0 = any free port)."),
    "CBMIR_ALLOWED_AE_TITLES": (
        "(empty = allow all, with a warning)",
        "Comma-separated calling AE titles allowed to store.",
    ),
    "CBMIR_MAX_PDU": ("65536", "Maximum PDU the listener receives (0 = unlimited; dcmtk: at most 131072)."),
    "CBMIR_DICOM_RECEIVER": (
        "pynetdicom",
        (
            "Network side of the plain DICOM port: pynetdicom, or dcmtk (the native cbmir-dcmtk-scp, "
            "`make dcmtk-scp`; the TLS port stays pynetdicom)."
        ),
    ),
    "CBMIR_DICOM_TLS_PORT": (
        "(unset = no TLS listener)",
        "Port of a second, TLS-only DICOM listener (0 = any free port); needs CBMIR_TLS_CERT and _KEY.",
    ),
    "CBMIR_DICOM_TLS_ONLY": (
        "0",
        "1: serve DICOM on the TLS port only (no plain listener on CBMIR_DICOM_PORT).",
    ),
    "CBMIR_ASSOC_IDLE_TIMEOUT_S": ("30", "An association that sends nothing for this long is aborted."),
    "CBMIR_MIN_FREE_MB": (
        "512",
        "Below this free space on the data volume the listener answers 0xA700 and the index refuses writes.",
    ),
    "CBMIR_RESEND_AFTER_S": (
        "600",
        "The listener and the watcher re-send a spooled instance that is still not indexed after this long.",
    ),
    "CBMIR_GRPC_HOST": ("0.0.0.0", "Address the gRPC query service binds."),
    "CBMIR_GRPC_PORT": ("50051", "Port of the gRPC query service (0 = any free port)."),
    "CBMIR_GRPC_WORKERS": ("8", "Threads serving gRPC calls."),
    "CBMIR_API_TOKENS_FILE": (
        "(unset)",
        "Tokens file: a token per line, optionally with its role (search or admin); re-read on change.",
    ),
    "CBMIR_API_TOKENS": ("(unset)", "Comma-separated API tokens with the search role."),
    "CBMIR_ALLOW_ANONYMOUS": (
        "0",
        "1: serve callers without a token on a non-loopback address (warned about at start).",
    ),
    "CBMIR_TOKEN": (
        "(unset)",
        "Clients (search, stats, evaluate --server): the API token to send (or --token).",
    ),
    "CBMIR_TLS_CERT": (
        "(unset = no TLS)",
        "PEM certificate chain of this component (gRPC service, DICOM TLS listener, or mTLS client).",
    ),
    "CBMIR_TLS_KEY": ("(unset)", "PEM private key of CBMIR_TLS_CERT."),
    "CBMIR_TLS_CLIENT_CA": (
        "(unset = no client certificates)",
        "PEM CA bundle; callers must present a certificate it signed (mTLS, gRPC and DICOM).",
    ),
    "CBMIR_TLS_CA": ("(unset)", "Clients: PEM CA bundle that the service's certificate must chain to."),
    "CBMIR_QUERY_MAX_PIXELS": (
        "16777216",
        "Largest picture or DICOM frame a query may send (pixels), checked from its header.",
    ),
    "CBMIR_QUERY_MAX_BYTES": ("67108864", "Largest query message in bytes."),
    "CBMIR_QUERY_DECODES": ("2", "Query images decoded and embedded at the same time; others wait."),
    "CBMIR_QUERY_TIMEOUT_S": (
        "30",
        "Longest a search may take, waiting included, unless the caller sets less.",
    ),
    "CBMIR_INDEX_WRITER": (
        "unix:<data dir>/index-writer.sock",
        "Embedded mode: where the index owner serves IndexWriter for the workers (unix:PATH or HOST:PORT).",
    ),
    "CBMIR_WRITER_TOKEN": (
        "(unset)",
        "Secret between the workers and the index writer; required when CBMIR_INDEX_WRITER is HOST:PORT.",
    ),
    "QDRANT_URL": (
        "(unset = embedded store)",
        "Qdrant server URL; when set, workers and the query service use it directly.",
    ),
    "QDRANT_API_KEY": ("(unset)", "API key for the Qdrant server."),
    "CBMIR_COLLECTION": ("cbmir", "Collection alias that queries read; reindexing switches it atomically."),
    "CBMIR_QDRANT_SHARDS": (
        "1",
        "Qdrant server: shards of each new collection (spread over the cluster's nodes).",
    ),
    "CBMIR_QDRANT_REPLICAS": ("1", "Qdrant server: copies of each shard (2 or more survive a node's loss)."),
    "CBMIR_REINDEX_GRACE_S": (
        "86400",
        "How long the collection a reindex replaced is kept (to switch back) before it is dropped.",
    ),
    "CBMIR_QUANTIZATION": (
        "none",
        "none or int8: scalar quantisation of new collections (a reindex applies it); rescored searches.",
    ),
    "CBMIR_HNSW_M": (
        "48",
        "Embedded index: edges per node of the HNSW graphs the index owner builds in the background.",
    ),
    "CBMIR_HNSW_EF_CONSTRUCT": ("300", "Embedded index: candidates per insertion while building a graph."),
    "CBMIR_HNSW_EF": (
        "128",
        "Candidates per search in an HNSW graph (more: better recall, slower); embedded and server.",
    ),
    "CBMIR_HNSW_MIN_POINTS": (
        "20000",
        "Embedded index: points of a modality outside any graph before one is built for them; 0 = never.",
    ),
    "CBMIR_HNSW_DEBOUNCE_S": (
        "10",
        "Embedded index: quiet seconds after the last write before a graph is built (at most 30x longer).",
    ),
    "CBMIR_HNSW_FULL_SCAN_POINTS": (
        "10000",
        "A search scans a segment (or a filter's matches) of fewer vectors than this instead of its graph.",
    ),
    "CBMIR_MODEL_PATH": (
        "(the model shipped in models/weights)",
        (
            "The model the workers and the query service load: one ONNX encoder, or a routes file "
            '(`<name>.routes.json`) naming one encoder per modality (see "Data and models").'
        ),
    ),
    "CBMIR_DEVICE": ("auto", "auto, cpu or cuda: execution provider preference of onnxruntime."),
    "CBMIR_BATCH_SIZE": ("16", "Largest encoder batch a worker process forms from waiting tasks."),
    "CBMIR_BATCH_WAIT_MS": ("5", "How long a worker waits for more tasks to fill a batch."),
    "CBMIR_WORKER_CONCURRENCY": (
        "4",
        "Worker threads per worker process (tasks in flight that can share a batch).",
    ),
    "CBMIR_MAX_RETRIES": (
        "5",
        "Retries of a task that fails unexpectedly (a bug) before its instance is quarantined.",
    ),
    "CBMIR_RETRY_BACKOFF_S": ("2", "First retry delay in seconds; doubles each retry (capped at 120 s)."),
    "CBMIR_RETRY_BUDGET_S": (
        "21600",
        "How long a task retries a transient failure (index, broker or disk); it never quarantines.",
    ),
    "CBMIR_VISIBILITY_TIMEOUT_S": (
        "300",
        "Redis broker: an unacknowledged task is redelivered after this long.",
    ),
    "CBMIR_DISPATCH_BATCH": (
        "32",
        "Listener, its sweep and `cbmir reindex`: the most instances one embedding task carries.",
    ),
    "CBMIR_DISPATCH_WAIT_MS": (
        "20",
        "Listener: how long instances received after a first one are gathered into its task.",
    ),
    "CBMIR_FRAMES": ("middle", "Multi-frame objects: 'middle' embeds the central frame, 'all' every frame."),
    "CBMIR_MAX_ROWS": ("8192", "Largest image height accepted for decoding."),
    "CBMIR_MAX_COLUMNS": ("8192", "Largest image width accepted for decoding."),
    "CBMIR_MAX_FRAMES": ("2000", "Largest number of frames accepted for decoding."),
    "CBMIR_WATCH_DIR": ("(unset)", "Folder the file watcher takes dropped files from."),
    "CBMIR_PATIENT_KEY_SECRET": (
        "(unset = no patient keys)",
        "Site secret (16+ characters): points carry a keyed hash of Patient ID and issuer, never the ID.",
    ),
    "CBMIR_METRICS_PORT": (
        "(unset = no metrics endpoint)",
        "Port of the process's Prometheus /metrics endpoint (0 = any free port); serve: all parts on one.",
    ),
    "CBMIR_METRICS_HOST": ("127.0.0.1", "Address the /metrics endpoint binds."),
    "CBMIR_LOG_LEVEL": ("INFO", "Logging level."),
}


QUANTIZATIONS = ("none", "int8")
DICOM_RECEIVERS = ("pynetdicom", "dcmtk")


def _env(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "")
    return value if value.strip() else default


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = _env(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _env(env, name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = _env(env, name, "0").lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"{name} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "yes")


def _file(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name} names {path}, which is not a readable file")
    return path


def _secret(env: Mapping[str, str], name: str, min_length: int = 16) -> bytes | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if len(raw) < min_length:
        raise ConfigError(f"{name} must be at least {min_length} characters long")
    return raw.encode("utf-8")


def patient_key_secret(env: Mapping[str, str] | None = None) -> bytes | None:
    """``CBMIR_PATIENT_KEY_SECRET``, the site secret of patient keys (None when unset)."""
    return _secret(os.environ if env is None else env, "CBMIR_PATIENT_KEY_SECRET")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(env, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class DataLayout:
    """Where everything durable lives under the data directory."""

    root: Path

    @property
    def incoming(self) -> Path:
        """Received and acknowledged, waiting for a worker."""
        return self.root / "spool" / "incoming"

    @property
    def spool_tmp(self) -> Path:
        """Partial writes, on the same filesystem as incoming/ (atomic renames)."""
        return self.root / "spool" / "tmp"

    @property
    def attempts(self) -> Path:
        """One empty marker per pending instance a worker is working on, touched at each attempt."""
        return self.root / "spool" / "attempts"

    @property
    def archive(self) -> Path:
        """Indexed objects, kept so a reindex can embed them again."""
        return self.root / "archive"

    @property
    def quarantine(self) -> Path:
        """Objects that cannot be indexed, each with a reason file."""
        return self.root / "quarantine"

    @property
    def erased(self) -> Path:
        """One empty marker per instance erased lately: in-flight work for it must not index it."""
        return self.root / "erased"

    @property
    def library(self) -> Path:
        """The reference library's findings: one JSON record per imported instance
        (``cbmir library import``); the objects themselves are archived like any other."""
        return self.root / "library"

    @property
    def audit_log(self) -> Path:
        """Administrative changes (erasure, purge, repair): one JSON line each, no PHI."""
        return self.root / "audit" / "admin.jsonl"

    @property
    def metrics(self) -> Path:
        """``cbmir serve``: its children's Prometheus multiprocess files (emptied at each start)."""
        return self.root / "metrics"

    @property
    def index(self) -> Path:
        """The embedded index (qdrant-edge shards and the alias file)."""
        return self.root / "index"

    @property
    def broker(self) -> Path:
        """The embedded broker's SQLite file lives here."""
        return self.root / "broker"

    def embedded_broker_url(self) -> str:
        """The kombu URL of the embedded SQLite broker."""
        return f"sqla+sqlite:///{(self.broker / 'broker.sqlite').resolve()}"


@dataclass(frozen=True)
class TlsSettings:
    """PEM files: this component's certificate and key, the CA its callers' certificates must be
    signed by (mTLS), and the CA it trusts when it is the client."""

    cert: Path | None
    key: Path | None
    client_ca: Path | None
    ca: Path | None

    @property
    def enabled(self) -> bool:
        """Whether this component has a certificate (serves TLS, or shows it as a client)."""
        return self.cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsSettings:
        """From ``CBMIR_TLS_CERT``, ``CBMIR_TLS_KEY``, ``CBMIR_TLS_CLIENT_CA``, ``CBMIR_TLS_CA``."""
        cert, key = _file(env, "CBMIR_TLS_CERT"), _file(env, "CBMIR_TLS_KEY")
        if (cert is None) != (key is None):
            raise ConfigError("CBMIR_TLS_CERT and CBMIR_TLS_KEY go together: set both or neither")
        client_ca = _file(env, "CBMIR_TLS_CLIENT_CA")
        if client_ca is not None and cert is None:
            raise ConfigError(
                "CBMIR_TLS_CLIENT_CA needs CBMIR_TLS_CERT and CBMIR_TLS_KEY (mTLS is TLS first)"
            )
        return cls(cert=cert, key=key, client_ca=client_ca, ca=_file(env, "CBMIR_TLS_CA"))


@dataclass(frozen=True)
class AccessSettings:
    """Who may call the public gRPC API: the token sources and the anonymous rule."""

    tokens_file: Path | None
    tokens: tuple[str, ...]
    allow_anonymous: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AccessSettings:
        """From ``CBMIR_API_TOKENS_FILE``, ``CBMIR_API_TOKENS``, ``CBMIR_ALLOW_ANONYMOUS``."""
        tokens = tuple(t.strip() for t in env.get("CBMIR_API_TOKENS", "").split(",") if t.strip())
        return cls(
            tokens_file=_file(env, "CBMIR_API_TOKENS_FILE"),
            tokens=tokens,
            allow_anonymous=_flag(env, "CBMIR_ALLOW_ANONYMOUS"),
        )


@dataclass(frozen=True)
class IndexSettings:
    """Which vector store to use and how to reach it."""

    collection: str
    qdrant_url: str | None
    qdrant_api_key: str | None
    embedded_path: Path
    writer_target: str
    writer_token: str | None
    quantization: str = "none"  # "none" or "int8": scalar quantisation of new collections
    reindex_grace_s: float = 86400.0  # how long a collection replaced by a reindex is kept
    qdrant_shards: int = 1  # a Qdrant server's shards per new collection
    qdrant_replicas: int = 1  # and copies of each shard
    # HNSW graphs (see services.index.base.HnswParams): built by the embedded index's owner in the
    # background once hnsw_min_points points of a modality are outside any graph
    hnsw_m: int = 48
    hnsw_ef_construct: int = 300
    hnsw_ef: int = 128  # search-time candidates
    hnsw_min_points: int = 20000  # 0: never build
    hnsw_debounce_s: float = 10.0
    hnsw_full_scan_points: int = 10000  # fewer vectors than this are scanned, not searched in a graph

    @property
    def embedded(self) -> bool:
        """Whether the index is the embedded store (no ``QDRANT_URL``)."""
        return not self.qdrant_url

    @classmethod
    def from_env(cls, env: Mapping[str, str], layout: DataLayout) -> IndexSettings:
        """From ``CBMIR_COLLECTION``, ``QDRANT_URL``, ``QDRANT_API_KEY``, ``CBMIR_INDEX_WRITER``, the
        quantisation, the Qdrant server's layout and the ``CBMIR_HNSW_*`` graph settings."""
        return cls(
            collection=_env(env, "CBMIR_COLLECTION", "cbmir"),
            qdrant_url=env.get("QDRANT_URL") or None,
            qdrant_api_key=env.get("QDRANT_API_KEY") or None,
            embedded_path=layout.index,
            writer_target=_env(env, "CBMIR_INDEX_WRITER", f"unix:{layout.root / 'index-writer.sock'}"),
            writer_token=env.get("CBMIR_WRITER_TOKEN") or None,
            quantization=_choice(env, "CBMIR_QUANTIZATION", "none", QUANTIZATIONS),
            reindex_grace_s=_float(env, "CBMIR_REINDEX_GRACE_S", 86400.0),
            qdrant_shards=_int(env, "CBMIR_QDRANT_SHARDS", 1, minimum=1),
            qdrant_replicas=_int(env, "CBMIR_QDRANT_REPLICAS", 1, minimum=1),
            hnsw_m=_int(env, "CBMIR_HNSW_M", 48, minimum=4),
            hnsw_ef_construct=_int(env, "CBMIR_HNSW_EF_CONSTRUCT", 300, minimum=4),
            hnsw_ef=_int(env, "CBMIR_HNSW_EF", 128, minimum=1),
            hnsw_min_points=_int(env, "CBMIR_HNSW_MIN_POINTS", 20000),
            hnsw_debounce_s=_float(env, "CBMIR_HNSW_DEBOUNCE_S", 10.0),
            hnsw_full_scan_points=_int(env, "CBMIR_HNSW_FULL_SCAN_POINTS", 10000, minimum=1),
        )


@dataclass(frozen=True)
class BrokerSettings:
    """Celery broker and queue."""

    url: str
    queue: str
    visibility_timeout_s: int
    dispatch_batch: int = 32  # instances per task at most (CBMIR_DISPATCH_BATCH)
    dispatch_wait_ms: int = 20  # how long a sender gathers instances for one task (CBMIR_DISPATCH_WAIT_MS)

    @property
    def embedded(self) -> bool:
        """Whether the broker is the embedded one (kombu's SQL or filesystem transport)."""
        return self.url.startswith(("sqla+", "filesystem"))

    def transport_options(self) -> dict:
        """kombu transport options: the visibility timeout only where the transport has one."""
        if self.url.startswith(("redis", "rediss", "sentinel")):
            # kombu scans for unacknowledged messages every `interval` s but by default acts on
            # only every 10th scan; scan at least twice per timeout and act on every scan, so a
            # task of a killed worker comes back within about 1.5 x the timeout.
            return {
                "visibility_timeout": self.visibility_timeout_s,
                "unacked_restore_interval": max(1, min(10, self.visibility_timeout_s // 2)),
                "unacked_restore_throttle": 1,
            }
        return {}

    @classmethod
    def from_env(cls, env: Mapping[str, str], layout: DataLayout) -> BrokerSettings:
        """From ``CBMIR_BROKER_URL``, ``CBMIR_QUEUE``, ``CBMIR_VISIBILITY_TIMEOUT_S``,
        ``CBMIR_DISPATCH_BATCH``, ``CBMIR_DISPATCH_WAIT_MS``."""
        return cls(
            url=_env(env, "CBMIR_BROKER_URL", layout.embedded_broker_url()),
            queue=_env(env, "CBMIR_QUEUE", "cbmir.embed"),
            visibility_timeout_s=_int(env, "CBMIR_VISIBILITY_TIMEOUT_S", 300, minimum=1),
            dispatch_batch=_int(env, "CBMIR_DISPATCH_BATCH", 32, minimum=1),
            dispatch_wait_ms=_int(env, "CBMIR_DISPATCH_WAIT_MS", 20),
        )


@dataclass(frozen=True)
class ModelSettings:
    """Which model to load (an ONNX encoder, or a ``.routes.json`` set of one encoder per modality),
    and where to run it."""

    model_path: Path | None
    device: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ModelSettings:
        """From ``CBMIR_MODEL_PATH`` and ``CBMIR_DEVICE``."""
        path = env.get("CBMIR_MODEL_PATH") or None
        return cls(
            model_path=Path(path) if path else None,
            device=_choice(env, "CBMIR_DEVICE", "auto", ("auto", "cpu", "cuda")),
        )


@dataclass(frozen=True)
class DecodeSettings:
    """Limits and frame policy for turning DICOM into images."""

    frames: FramePolicy
    max_rows: int
    max_columns: int
    max_frames: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DecodeSettings:
        """From ``CBMIR_FRAMES`` and ``CBMIR_MAX_ROWS``/``_COLUMNS``/``_FRAMES``."""
        return cls(
            frames=cast(FramePolicy, _choice(env, "CBMIR_FRAMES", "middle", ("middle", "all"))),
            max_rows=_int(env, "CBMIR_MAX_ROWS", 8192, minimum=1),
            max_columns=_int(env, "CBMIR_MAX_COLUMNS", 8192, minimum=1),
            max_frames=_int(env, "CBMIR_MAX_FRAMES", 2000, minimum=1),
        )


@dataclass(frozen=True)
class MetricsSettings:
    """Where a process serves its Prometheus metrics (``/metrics``); ``port`` None: nowhere."""

    host: str
    port: int | None

    @property
    def enabled(self) -> bool:
        """Whether the process serves a metrics endpoint."""
        return self.port is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MetricsSettings:
        """From ``CBMIR_METRICS_PORT`` (unset: no endpoint) and ``CBMIR_METRICS_HOST``."""
        env = os.environ if env is None else env
        port = _int(env, "CBMIR_METRICS_PORT", 0) if env.get("CBMIR_METRICS_PORT", "").strip() else None
        if port is not None and port > 65535:
            raise ConfigError(f"CBMIR_METRICS_PORT must be a port (0..65535), got {port}")
        return cls(host=_env(env, "CBMIR_METRICS_HOST", "127.0.0.1"), port=port)


def _data_layout(env: Mapping[str, str]) -> DataLayout:
    return DataLayout(Path(_env(env, "CBMIR_DATA_DIR", "./var")).expanduser().resolve())


@dataclass(frozen=True)
class ListenerSettings:
    """The DICOM C-STORE listener (``cbmir scp``)."""

    layout: DataLayout
    broker: BrokerSettings
    ae_title: str
    host: str
    port: int
    allowed_ae_titles: frozenset[str]
    max_pdu: int
    tls: TlsSettings
    tls_port: int | None
    tls_only: bool
    idle_timeout_s: int
    min_free_mb: int
    resend_after_s: int
    receiver: str = "pynetdicom"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ListenerSettings:
        """The listener's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        layout = _data_layout(env)
        ae_title = _env(env, "CBMIR_AE_TITLE", "CBMIR")
        if not 0 < len(ae_title) <= 16:
            raise ConfigError(f"CBMIR_AE_TITLE must be 1..16 characters, got {ae_title!r}")
        allowed = {t.strip() for t in env.get("CBMIR_ALLOWED_AE_TITLES", "").split(",") if t.strip()}
        tls = TlsSettings.from_env(env)
        tls_port = (
            _int(env, "CBMIR_DICOM_TLS_PORT", 0) if env.get("CBMIR_DICOM_TLS_PORT", "").strip() else None
        )
        if tls_port is not None and not tls.enabled:
            raise ConfigError("CBMIR_DICOM_TLS_PORT needs CBMIR_TLS_CERT and CBMIR_TLS_KEY")
        tls_only = _flag(env, "CBMIR_DICOM_TLS_ONLY")
        if tls_only and tls_port is None:
            raise ConfigError("CBMIR_DICOM_TLS_ONLY=1 needs CBMIR_DICOM_TLS_PORT (and a certificate)")
        return cls(
            layout=layout,
            broker=BrokerSettings.from_env(env, layout),
            ae_title=ae_title,
            host=_env(env, "CBMIR_DICOM_HOST", "0.0.0.0"),
            port=_int(env, "CBMIR_DICOM_PORT", 11112),
            allowed_ae_titles=frozenset(allowed),
            max_pdu=_int(env, "CBMIR_MAX_PDU", 65536),
            tls=tls,
            tls_port=tls_port,
            tls_only=tls_only,
            idle_timeout_s=_int(env, "CBMIR_ASSOC_IDLE_TIMEOUT_S", 30, minimum=1),
            min_free_mb=_int(env, "CBMIR_MIN_FREE_MB", 512),
            resend_after_s=_int(env, "CBMIR_RESEND_AFTER_S", 600, minimum=1),
            receiver=_choice(env, "CBMIR_DICOM_RECEIVER", "pynetdicom", DICOM_RECEIVERS),
        )


@dataclass(frozen=True)
class WorkerSettings:
    """The Celery embedding workers (``cbmir worker``)."""

    layout: DataLayout
    broker: BrokerSettings
    index: IndexSettings
    model: ModelSettings
    decode: DecodeSettings
    batch_size: int
    batch_wait_ms: int
    concurrency: int
    max_retries: int
    retry_backoff_s: float
    retry_budget_s: int
    tls: TlsSettings
    patient_key_secret: bytes | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """The worker's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        layout = _data_layout(env)
        return cls(
            layout=layout,
            broker=BrokerSettings.from_env(env, layout),
            index=IndexSettings.from_env(env, layout),
            model=ModelSettings.from_env(env),
            decode=DecodeSettings.from_env(env),
            batch_size=_int(env, "CBMIR_BATCH_SIZE", 16, minimum=1),
            batch_wait_ms=_int(env, "CBMIR_BATCH_WAIT_MS", 5),
            concurrency=_int(env, "CBMIR_WORKER_CONCURRENCY", 4, minimum=1),
            max_retries=_int(env, "CBMIR_MAX_RETRIES", 5),
            retry_backoff_s=_float(env, "CBMIR_RETRY_BACKOFF_S", 2.0),
            retry_budget_s=_int(env, "CBMIR_RETRY_BUDGET_S", 21600),
            tls=TlsSettings.from_env(env),
            patient_key_secret=patient_key_secret(env),
        )


@dataclass(frozen=True)
class QuerySettings:
    """The gRPC query service (``cbmir query``), which also owns an embedded index."""

    layout: DataLayout
    index: IndexSettings
    model: ModelSettings
    decode: DecodeSettings
    host: str
    port: int
    max_workers: int
    access: AccessSettings
    tls: TlsSettings
    min_free_mb: int
    query_max_pixels: int
    query_max_bytes: int
    query_decodes: int
    query_timeout_s: float
    broker: BrokerSettings | None = None  # where admin repairs send work (None: not at all)
    patient_key_secret: bytes | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> QuerySettings:
        """The query service's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        layout = _data_layout(env)
        return cls(
            layout=layout,
            index=IndexSettings.from_env(env, layout),
            model=ModelSettings.from_env(env),
            decode=DecodeSettings.from_env(env),
            host=_env(env, "CBMIR_GRPC_HOST", "0.0.0.0"),
            port=_int(env, "CBMIR_GRPC_PORT", 50051),
            max_workers=_int(env, "CBMIR_GRPC_WORKERS", 8, minimum=1),
            access=AccessSettings.from_env(env),
            tls=TlsSettings.from_env(env),
            min_free_mb=_int(env, "CBMIR_MIN_FREE_MB", 512),
            query_max_pixels=_int(env, "CBMIR_QUERY_MAX_PIXELS", 16_777_216, minimum=1),
            query_max_bytes=_int(env, "CBMIR_QUERY_MAX_BYTES", 64 * 1024 * 1024, minimum=1024),
            query_decodes=_int(env, "CBMIR_QUERY_DECODES", 2, minimum=1),
            query_timeout_s=_float(env, "CBMIR_QUERY_TIMEOUT_S", 30.0),
            broker=BrokerSettings.from_env(env, layout),
            patient_key_secret=patient_key_secret(env),
        )


@dataclass(frozen=True)
class WatcherSettings:
    """The file watcher (``cbmir watch``)."""

    layout: DataLayout
    broker: BrokerSettings
    watch_dir: Path | None
    settle_s: float = field(default=1.0)
    resend_after_s: int = field(default=600)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WatcherSettings:
        """The watcher's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        layout = _data_layout(env)
        watch = env.get("CBMIR_WATCH_DIR") or None
        return cls(
            layout=layout,
            broker=BrokerSettings.from_env(env, layout),
            watch_dir=Path(watch).expanduser().resolve() if watch else None,
            resend_after_s=_int(env, "CBMIR_RESEND_AFTER_S", 600, minimum=1),
        )


@dataclass(frozen=True)
class LibrarySettings:
    """``cbmir library``: the data folder the library's findings and objects go into, and the
    broker that tells the workers."""

    layout: DataLayout
    broker: BrokerSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LibrarySettings:
        """The library command's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        layout = _data_layout(env)
        return cls(layout=layout, broker=BrokerSettings.from_env(env, layout))


__all__ = [
    "ENVIRONMENT",
    "AccessSettings",
    "BrokerSettings",
    "DataLayout",
    "DecodeSettings",
    "IndexSettings",
    "LibrarySettings",
    "ListenerSettings",
    "MetricsSettings",
    "ModelSettings",
    "QuerySettings",
    "TlsSettings",
    "WatcherSettings",
    "WorkerSettings",
    "replace",
]


# --- the browser gateway (``cbmir gateway``) -------------------------------------------------------

GATEWAY_ENVIRONMENT: dict[str, tuple[str, str]] = {
    "CBMIR_HTTP_HOST": ("127.0.0.1", "Address the HTTP gateway (`cbmir gateway`, the panel) binds."),
    "CBMIR_HTTP_PORT": (
        "8080",
        "Port of the HTTP gateway (0 = any free port); `cbmir serve`: set, it runs the gateway too.",
    ),
    "CBMIR_QUERY_TARGET": ("127.0.0.1:50051", "HOST:PORT of the gRPC query service the gateway calls."),
    "CBMIR_QUERY_SERVER_NAME": (
        "(unset = the target's host)",
        (
            "With TLS to the query service: the name its certificate must carry, when the gateway "
            "reaches it by another address (127.0.0.1 in the same pod)."
        ),
    ),
    "CBMIR_HTTP_CORS_ORIGINS": (
        "(unset = no CORS headers)",
        "Comma-separated browser origins allowed to call the gateway from another site.",
    ),
    "CBMIR_HTTP_TLS_CERT": ("(unset = plain HTTP)", "PEM certificate chain of the gateway's HTTPS."),
    "CBMIR_HTTP_TLS_KEY": ("(unset)", "PEM private key of CBMIR_HTTP_TLS_CERT."),
    "CBMIR_HTTP_ALLOW_PLAINTEXT": (
        "0",
        "1: serve plain HTTP on a non-loopback address (behind a TLS-terminating ingress; warned about).",
    ),
}
ENVIRONMENT.update(GATEWAY_ENVIRONMENT)


@dataclass(frozen=True)
class GatewaySettings:
    """The HTTP gateway (``cbmir gateway``): where it listens (HTTP or HTTPS, CORS), and the gRPC
    query service it passes calls to (with the client side of ``tls``: CA, and a certificate for
    mTLS). ``query_max_bytes`` bounds uploads; ``timeout_s`` is each call's deadline. On a
    non-loopback address calls without a token are refused unless ``CBMIR_ALLOW_ANONYMOUS=1``: the
    query service takes callers from loopback, as the gateway is, to be its operator."""

    host: str
    port: int
    query_target: str
    cors_origins: tuple[str, ...]
    https_cert: Path | None
    https_key: Path | None
    allow_plaintext: bool
    tls: TlsSettings
    query_max_bytes: int
    timeout_s: float
    allow_anonymous: bool = False  # on a non-loopback address, pass on calls without a token too
    query_server_name: str | None = None  # TLS: the name the query service's certificate carries

    @property
    def https(self) -> bool:
        """Whether the gateway serves HTTPS itself."""
        return self.https_cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewaySettings:
        """The gateway's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        port = _int(env, "CBMIR_HTTP_PORT", 8080)
        if port > 65535:
            raise ConfigError(f"CBMIR_HTTP_PORT must be a port (0..65535), got {port}")
        cert, key = _file(env, "CBMIR_HTTP_TLS_CERT"), _file(env, "CBMIR_HTTP_TLS_KEY")
        if (cert is None) != (key is None):
            raise ConfigError("CBMIR_HTTP_TLS_CERT and CBMIR_HTTP_TLS_KEY go together: set both or neither")
        target = _env(env, "CBMIR_QUERY_TARGET", "127.0.0.1:50051").strip()
        host, _, target_port = target.rpartition(":")
        if not host or not target_port.isdigit() or any(c.isspace() for c in target):
            raise ConfigError(f"CBMIR_QUERY_TARGET must be HOST:PORT, got {target!r}")
        origins = tuple(o.strip() for o in env.get("CBMIR_HTTP_CORS_ORIGINS", "").split(",") if o.strip())
        return cls(
            host=_env(env, "CBMIR_HTTP_HOST", "127.0.0.1"),
            port=port,
            query_target=target,
            cors_origins=origins,
            https_cert=cert,
            https_key=key,
            allow_plaintext=_flag(env, "CBMIR_HTTP_ALLOW_PLAINTEXT"),
            tls=TlsSettings.from_env(env),
            query_max_bytes=_int(env, "CBMIR_QUERY_MAX_BYTES", 64 * 1024 * 1024, minimum=1024),
            timeout_s=_float(env, "CBMIR_QUERY_TIMEOUT_S", 30.0),
            allow_anonymous=_flag(env, "CBMIR_ALLOW_ANONYMOUS"),
            query_server_name=env.get("CBMIR_QUERY_SERVER_NAME", "").strip() or None,
        )


__all__ += ["GATEWAY_ENVIRONMENT", "GatewaySettings"]
