"""What one worker process does with one spooled instance: decode, embed, upsert, archive.

Built once per worker process (the ONNX session included) and shared by its task threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from models.runtime import OnnxEncoder
from services.core import metrics
from services.core.config import WorkerSettings
from services.core.errors import StorageError
from services.dicom.decode import DecodeLimits, decode_for_embedding
from services.index import RemoteIndexWriter, VectorIndex, open_index
from services.index.points import index_points, model_inputs
from services.ingest.library import ReferenceLibrary
from services.ingest.spool import Spool
from workers.batching import MicroBatcher

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a task did with its instance (returned as the Celery task's result)."""

    status: str  # indexed | already-indexed | quarantined | missing
    spool_name: str
    points: int = 0

    def as_dict(self) -> dict:
        """The outcome as a JSON-ready dict."""
        return {"status": self.status, "spool_name": self.spool_name, "points": self.points}


class EmbeddingPipeline:
    """Per-process state: spool, encoder session, batcher, index writer."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.spool = Spool(settings.layout)
        self.library = ReferenceLibrary(settings.layout)
        self.encoder = OnnxEncoder(settings.model.model_path, device=settings.model.device)
        logger.info(
            "worker encoder %s version %s runs on %s",
            self.encoder.model_path.name,
            self.encoder.version,
            self.encoder.providers[0],
        )
        self.batcher = MicroBatcher(self.encoder.embed, settings.batch_size, settings.batch_wait_ms / 1000.0)
        self.limits = DecodeLimits.from_settings(settings.decode)
        self._remote: RemoteIndexWriter | None = None
        self._direct: VectorIndex | None = None
        if settings.index.embedded:
            self._remote = RemoteIndexWriter(
                settings.index.writer_target, token=settings.index.writer_token, tls=settings.tls
            )
        else:
            self._direct = open_index(settings.index)
            self._direct.ensure_collection(self.encoder.dim, self.encoder.version)

    # ------------------------------------------------------------------------------------------
    def locate(self, spool_name: str) -> Path | None:
        """The spooled file of a task, or None when it is no longer in incoming."""
        path = self.spool.incoming_path(spool_name)
        return path if path.exists() else None

    def outcome_without_file(self, spool_name: str) -> Outcome:
        """The task's object is gone from incoming: a duplicate delivery, or already handled."""
        if self.spool.archived_path(spool_name).exists():
            return Outcome("already-indexed", spool_name)
        if (self.settings.layout.quarantine / spool_name).exists():
            return Outcome("quarantined", spool_name)
        logger.warning("task for %s but no such spooled object", spool_name)
        return Outcome("missing", spool_name)

    def embed_and_upsert(self, path: Path) -> int | None:
        """Decode, preprocess, embed (batched) and upsert (each stage timed); raises cbmir errors.
        None: the instance was erased meanwhile (``cbmir delete``), and nothing was indexed."""
        clock = metrics.StageClock()
        header, frames = decode_for_embedding(
            path,
            frames=self.settings.decode.frames,
            limits=self.limits,
            patient_key_secret=self.settings.patient_key_secret,
        )
        clock.lap("decode")
        vectors = self.batcher.submit(model_inputs(frames, self.encoder.contract))
        clock.lap("embed")
        points = index_points(
            header,
            frames,
            vectors,
            model_version=self.encoder.version,
            spool_name=path.name,
            finding=self.library.finding_for(header.sop_instance_uid, path),
        )
        if self.spool.erased_recently(path.name):
            return None
        if self._remote is not None:
            self._remote.upsert(points, self.encoder.version)
        elif self._direct is not None:
            self._direct.upsert(points)
        clock.lap("upsert")
        metrics.INSTANCES_INDEXED.labels(metrics.slug(header.modality)).inc()
        return len(points)

    def archive(self, spool_name: str) -> None:
        """Move the indexed object from incoming to the archive."""
        self.spool.archive(spool_name)

    def quarantine(self, path: Path, reason: str, detail: str) -> None:
        """Keep an object that will not index, with its reason; it never leaves the spool otherwise."""
        try:
            self.spool.quarantine(path, reason=reason, detail=detail, stage="worker")
        except StorageError:
            logger.exception("could not quarantine %s; it stays in the spool", path.name)
            raise
        metrics.QUARANTINED.labels("worker", metrics.slug(reason)).inc()

    def close(self) -> None:
        """Stop the batcher and close the index connection (at worker shutdown)."""
        self.batcher.close()
        if self._remote is not None:
            self._remote.close()
        if self._direct is not None:
            self._direct.close()
