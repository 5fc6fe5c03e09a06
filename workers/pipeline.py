"""What one worker process does with spooled instances: decode, embed, upsert, archive.

A task carries a batch of spool names; the batch is decoded one by one, embedded in encoder calls
of ``CBMIR_BATCH_SIZE`` rows and upserted in one index write. One instance's failure does not fail
the others. Each instance goes through the encoder (and preprocessing contract) of its normalised
modality (:class:`models.runtime.EncoderSet`).

Built once per worker process (the ONNX session included) and shared by its task threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.runtime import EncoderSet, OnnxEncoder
from services.core import metrics
from services.core.config import WorkerSettings
from services.core.errors import BackendUnavailable, ConfigError, InvalidInput, StorageError
from services.dicom.decode import DecodeLimits, InstanceHeader, decode_for_embedding
from services.index import RemoteIndexWriter, VectorIndex, open_index
from services.index.base import IndexPoint
from services.index.points import check_point, index_points, model_inputs
from services.ingest.library import ReferenceLibrary
from services.ingest.spool import Spool
from workers.batching import GroupWriter, MicroBatcher

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


# Failures that pass: the index owner or the broker is down, the disk is full, the model is being
# changed. They are retried (for the instances they hit; for the whole batch when they hit the
# shared encoder or write) and never quarantine.
TRANSIENT = (BackendUnavailable, StorageError, ConfigError)


@dataclass
class BatchResult:
    """What became of each instance of a batch (by spool name)."""

    indexed: dict[str, int] = field(default_factory=dict)  # name -> points written
    erased: list[str] = field(default_factory=list)  # erased (``cbmir delete``) meanwhile: not written
    invalid: dict[str, InvalidInput] = field(default_factory=dict)  # will never index: quarantine
    failed: dict[str, Exception] = field(default_factory=dict)  # unexpected: retried on its own
    transient: dict[str, Exception] = field(default_factory=dict)  # the disk or a backend: retry later


@dataclass(frozen=True)
class _Decoded:
    path: Path
    header: InstanceHeader
    frame_numbers: list[int]
    inputs: np.ndarray  # the encoder's input rows, one per frame (its modality's contract)


class EmbeddingPipeline:
    """Per-process state: spool, encoder sessions (one batcher each), index writer."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.spool = Spool(settings.layout)
        self.library = ReferenceLibrary(settings.layout)
        self.encoder = EncoderSet.load(settings.model.model_path, device=settings.model.device)
        logger.info(
            "worker model %s version %s: %s",
            self.encoder.model_path.name,
            self.encoder.version,
            ", ".join(f"{e.model_path.name} on {e.providers[0]}" for e in self.encoder.members()),
        )
        # one batcher per encoder session: concurrent tasks' rows of one encoder share its calls
        self.batchers = {
            encoder.model_path.name: MicroBatcher(
                encoder.embed, settings.batch_size, settings.batch_wait_ms / 1000.0
            )
            for encoder in self.encoder.members()
        }
        # the points of tasks finishing together go to the index in one write (one flush)
        self.writer: GroupWriter[IndexPoint] = GroupWriter(self._write_points, max_items=4096)
        self.limits = DecodeLimits.from_settings(settings.decode)
        self._warm_up()
        self._remote: RemoteIndexWriter | None = None
        self._direct: VectorIndex | None = None
        if settings.index.embedded:
            self._remote = RemoteIndexWriter(
                settings.index.writer_target, token=settings.index.writer_token, tls=settings.tls
            )
        else:
            self._direct = open_index(settings.index)
            self._direct.ensure_collection(self.encoder.dim, self.encoder.version)

    def _warm_up(self) -> None:
        """Run the encoder once and load the pixel decoders, so the first task does not pay for it."""
        import pydicom.pixels  # noqa: F401 - imported for its side effect: the decoders are loaded

        for encoder in self.encoder.members():
            encoder.embed(np.zeros((1, *encoder.input_shape), np.float32))

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
        """One instance through :meth:`embed_and_upsert_many`; raises its cbmir error. None: the
        instance was erased meanwhile (``cbmir delete``), and nothing was indexed."""
        result = self.embed_and_upsert_many([path])
        for failures in (result.invalid, result.failed, result.transient):
            if path.name in failures:
                raise failures[path.name]
        return result.indexed.get(path.name)

    def embed_and_upsert_many(self, paths: list[Path]) -> BatchResult:
        """Decode and preprocess each instance, embed them all in one call, upsert all their points
        in one call (each stage timed once per batch). An instance's own failure, transient or not,
        is reported in the result; a failure of the shared encoder or write raises."""
        clock, result = metrics.StageClock(), BatchResult()
        decoded = [item for path in paths if (item := self._decode(path, result)) is not None]
        clock.lap("decode")
        if not decoded:
            return result
        vectors = self._embed(decoded)
        clock.lap("embed")
        points = []
        for item, rows in zip(decoded, vectors, strict=True):
            if self.spool.erased_recently(item.path.name):
                result.erased.append(item.path.name)
                continue
            written = index_points(
                item.header,
                item.frame_numbers,
                rows,
                model_version=self.encoder.version,
                spool_name=item.path.name,
                finding=self.library.finding_for(item.header.sop_instance_uid, item.path),
            )
            try:  # what the index would refuse fails this instance only, not the shared write
                for point in written:
                    check_point(point, self.encoder.dim)
            except InvalidInput as exc:
                result.invalid[item.path.name] = exc
                continue
            points += written
            result.indexed[item.path.name] = len(written)
        if points:
            self.writer.submit(points)
        clock.lap("upsert")
        for item in decoded:
            if item.path.name in result.indexed:
                metrics.INSTANCES_INDEXED.labels(metrics.slug(item.header.modality)).inc()
        return result

    def _embed(self, decoded: list[_Decoded]) -> list[np.ndarray]:
        """Each instance's vectors: its modality's encoder, through that encoder's batcher."""
        step = self.settings.batch_size  # rows per encoder call: bounds the memory of a batch

        def run(encoder: OnnxEncoder, rows: np.ndarray) -> np.ndarray:
            batcher = self.batchers[encoder.model_path.name]
            return np.concatenate([batcher.submit(rows[j : j + step]) for j in range(0, len(rows), step)])

        return self.encoder.embed_each([d.inputs for d in decoded], [d.header.modality for d in decoded], run)

    def _write_points(self, points: list[IndexPoint]) -> None:
        # erasures checked again just before the write: a write can wait behind another group's write
        erased = {
            n for n in {str(p.payload.get("spool_name", "")) for p in points} if self.spool.erased_recently(n)
        }
        points = [p for p in points if str(p.payload.get("spool_name", "")) not in erased]
        if not points:
            return
        if self._remote is not None:
            self._remote.upsert(points, self.encoder.version)
        elif self._direct is not None:
            self._direct.upsert(points)

    def _decode(self, path: Path, result: BatchResult) -> _Decoded | None:
        """One instance's header and encoder input rows (frames are not kept: a batch of large
        images would hold them all); its own failure goes into ``result``."""
        try:
            header, frames = decode_for_embedding(
                path,
                frames=self.settings.decode.frames,
                limits=self.limits,
                patient_key_secret=self.settings.patient_key_secret,
                eeg_render=self.encoder.eeg_render,
            )
            inputs = model_inputs(frames, self.encoder.for_modality(header.modality).contract)
        except InvalidInput as exc:
            result.invalid[path.name] = exc
            return None
        except TRANSIENT as exc:
            result.transient[path.name] = exc
            return None
        except Exception as exc:  # noqa: BLE001 - a bug with this instance: handled on its own
            result.failed[path.name] = exc
            return None
        return _Decoded(path, header, [frame.frame_number for frame in frames], inputs)

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
        for batcher in self.batchers.values():
            batcher.close()
        self.writer.close()
        if self._remote is not None:
            self._remote.close()
        if self._direct is not None:
            self._direct.close()
