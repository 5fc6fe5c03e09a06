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
    "CBMIR_MAX_PDU": ("65536", "Maximum PDU the listener receives (0 = unlimited)."),
    "CBMIR_GRPC_HOST": ("0.0.0.0", "Address the gRPC query service binds."),
    "CBMIR_GRPC_PORT": ("50051", "Port of the gRPC query service (0 = any free port)."),
    "CBMIR_GRPC_WORKERS": ("8", "Threads serving gRPC calls."),
    "CBMIR_INDEX_WRITER": (
        "127.0.0.1:50051",
        "Embedded mode: gRPC address of the index owner that workers upsert through.",
    ),
    "QDRANT_URL": (
        "(unset = embedded store)",
        "Qdrant server URL; when set, workers and the query service use it directly.",
    ),
    "QDRANT_API_KEY": ("(unset)", "API key for the Qdrant server."),
    "CBMIR_COLLECTION": ("cbmir", "Collection alias that queries read; reindexing switches it atomically."),
    "CBMIR_MODEL_PATH": (
        "(the encoder shipped in models/weights)",
        "ONNX encoder the workers and the query service load.",
    ),
    "CBMIR_DEVICE": ("auto", "auto | cpu | cuda: execution provider preference of onnxruntime."),
    "CBMIR_BATCH_SIZE": ("16", "Largest encoder batch a worker process forms from waiting tasks."),
    "CBMIR_BATCH_WAIT_MS": ("5", "How long a worker waits for more tasks to fill a batch."),
    "CBMIR_WORKER_CONCURRENCY": (
        "4",
        "Worker threads per worker process (tasks in flight that can share a batch).",
    ),
    "CBMIR_MAX_RETRIES": ("5", "Retries of a failing task before its instance is quarantined."),
    "CBMIR_RETRY_BACKOFF_S": ("2", "First retry delay in seconds; doubles each retry (capped at 120 s)."),
    "CBMIR_VISIBILITY_TIMEOUT_S": (
        "300",
        "Redis broker: an unacknowledged task is redelivered after this long.",
    ),
    "CBMIR_FRAMES": ("middle", "Multi-frame objects: 'middle' embeds the central frame, 'all' every frame."),
    "CBMIR_MAX_ROWS": ("8192", "Largest image height accepted for decoding."),
    "CBMIR_MAX_COLUMNS": ("8192", "Largest image width accepted for decoding."),
    "CBMIR_MAX_FRAMES": ("2000", "Largest number of frames accepted for decoding."),
    "CBMIR_WATCH_DIR": ("(unset)", "Folder the file watcher takes dropped files from."),
    "CBMIR_LOG_LEVEL": ("INFO", "Logging level."),
}


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
    def archive(self) -> Path:
        """Indexed objects, kept so a reindex can embed them again."""
        return self.root / "archive"

    @property
    def quarantine(self) -> Path:
        """Objects that cannot be indexed, each with a reason file."""
        return self.root / "quarantine"

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
class IndexSettings:
    """Which vector store to use and how to reach it."""

    collection: str
    qdrant_url: str | None
    qdrant_api_key: str | None
    embedded_path: Path
    writer_target: str

    @property
    def embedded(self) -> bool:
        """Whether the index is the embedded store (no ``QDRANT_URL``)."""
        return not self.qdrant_url

    @classmethod
    def from_env(cls, env: Mapping[str, str], layout: DataLayout) -> IndexSettings:
        """From ``CBMIR_COLLECTION``, ``QDRANT_URL``, ``QDRANT_API_KEY``, ``CBMIR_INDEX_WRITER``."""
        return cls(
            collection=_env(env, "CBMIR_COLLECTION", "cbmir"),
            qdrant_url=env.get("QDRANT_URL") or None,
            qdrant_api_key=env.get("QDRANT_API_KEY") or None,
            embedded_path=layout.index,
            writer_target=_env(env, "CBMIR_INDEX_WRITER", "127.0.0.1:50051"),
        )


@dataclass(frozen=True)
class BrokerSettings:
    """Celery broker and queue."""

    url: str
    queue: str
    visibility_timeout_s: int

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
        """From ``CBMIR_BROKER_URL``, ``CBMIR_QUEUE``, ``CBMIR_VISIBILITY_TIMEOUT_S``."""
        return cls(
            url=_env(env, "CBMIR_BROKER_URL", layout.embedded_broker_url()),
            queue=_env(env, "CBMIR_QUEUE", "cbmir.embed"),
            visibility_timeout_s=_int(env, "CBMIR_VISIBILITY_TIMEOUT_S", 300, minimum=1),
        )


@dataclass(frozen=True)
class ModelSettings:
    """Which encoder to load, and where to run it."""

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ListenerSettings:
        """The listener's settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        layout = _data_layout(env)
        ae_title = _env(env, "CBMIR_AE_TITLE", "CBMIR")
        if not 0 < len(ae_title) <= 16:
            raise ConfigError(f"CBMIR_AE_TITLE must be 1..16 characters, got {ae_title!r}")
        allowed = {t.strip() for t in env.get("CBMIR_ALLOWED_AE_TITLES", "").split(",") if t.strip()}
        return cls(
            layout=layout,
            broker=BrokerSettings.from_env(env, layout),
            ae_title=ae_title,
            host=_env(env, "CBMIR_DICOM_HOST", "0.0.0.0"),
            port=_int(env, "CBMIR_DICOM_PORT", 11112),
            allowed_ae_titles=frozenset(allowed),
            max_pdu=_int(env, "CBMIR_MAX_PDU", 65536),
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
        )


@dataclass(frozen=True)
class WatcherSettings:
    """The file watcher (``cbmir watch``)."""

    layout: DataLayout
    broker: BrokerSettings
    watch_dir: Path | None
    settle_s: float = field(default=1.0)

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
        )


__all__ = [
    "ENVIRONMENT",
    "BrokerSettings",
    "DataLayout",
    "DecodeSettings",
    "IndexSettings",
    "ListenerSettings",
    "ModelSettings",
    "QuerySettings",
    "WatcherSettings",
    "WorkerSettings",
    "replace",
]
