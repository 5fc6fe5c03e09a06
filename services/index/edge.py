"""The embedded store: Qdrant's Rust engine in-process (``qdrant-edge-py``), one shard per modality.

WAL, payload indexes and HNSW (after :meth:`EdgeIndex.optimize`) come with the engine. One process
owns the whole index (the query service); workers write through its ``IndexWriter`` RPC.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from typing_extensions import override

from services.core.errors import BackendUnavailable, ConfigError, NotFound
from services.core.vocabulary import MODALITIES, OTHER
from services.index.base import (
    INDEXED_FIELDS,
    OVERSAMPLING,
    QUANTILE,
    HitFilter,
    IndexPoint,
    SearchHit,
    VectorIndex,
    as_vector,
    check_droppable,
    collection_name,
    dual_write_targets,
    modality_filter_values,
    point_id,
)

logger = logging.getLogger(__name__)


class EdgeIndex(VectorIndex):
    """The embedded store: ``qdrant-edge-py`` shards under ``<data>/index``.

    A collection is one shard per modality (``shards/<collection>/<modality>``): a query filtered
    by modality scans only that modality's vectors instead of testing a filter on every point,
    and an unfiltered query merges the per-modality top-k. ``aliases.json`` maps the alias to a
    collection and is replaced atomically, which makes the alias switch of a reindex atomic. One
    process owns the whole index (an exclusive lock on ``.owner.lock``): a second one gets
    :class:`BackendUnavailable` with a clear message.
    """

    def __init__(
        self, root: Path, alias: str, quantization: str = "none", indexing_threshold_kb: int | None = None
    ):
        import qdrant_edge

        self._qe = qdrant_edge
        self._root = Path(root)
        self._alias = alias
        self._quantization = quantization
        # vectors (KB) a segment holds before optimize() builds its HNSW graph and quantised codes;
        # None: the engine's default. Benchmarks lower it to measure small real collections.
        self._indexing_threshold_kb = indexing_threshold_kb
        self._lock = threading.RLock()
        self._shards: dict[tuple[str, str], Any] = {}  # qdrant_edge.EdgeShard (untyped)
        (self._root / "shards").mkdir(parents=True, exist_ok=True)
        self._owner_lock: IO[str] | None = _take_owner_lock(self._root)

    # aliases ------------------------------------------------------------------------------------
    def _aliases_path(self) -> Path:
        return self._root / "aliases.json"

    def _aliases(self) -> dict[str, str]:
        try:
            return json.loads(self._aliases_path().read_text())
        except FileNotFoundError:
            return {}

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        tmp = self._aliases_path().with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump(aliases, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._aliases_path())

    @override
    def switch_alias(self, collection: str) -> None:
        """Point the alias at ``collection`` atomically (write temp, fsync, rename); a reindex that
        built it is over in the same write."""
        with self._lock:
            aliases = self._aliases()
            aliases[self._alias] = collection
            if aliases.get(self._next_key) == collection:
                del aliases[self._next_key]
            self._write_aliases(aliases)
        logger.info("alias %s now points at %s", self._alias, collection)

    @property
    def _next_key(self) -> str:
        return f"{self._alias}@reindex"

    @override
    def reindex_target(self) -> str | None:
        return self._aliases().get(self._next_key)

    @override
    def set_reindex_target(self, collection: str | None) -> None:
        with self._lock:
            aliases = self._aliases()
            if collection is None:
                aliases.pop(self._next_key, None)
            else:
                aliases[self._next_key] = collection
            self._write_aliases(aliases)

    @override
    def drop_collection(self, collection: str) -> None:
        with self._lock:
            check_droppable(collection, self._alias, self.current_collection(), self.reindex_target())
            for key in [k for k in self._shards if k[0] == collection]:
                shard = self._shards.pop(key)
                shard.close()
            shutil.rmtree(self._root / "shards" / collection, ignore_errors=True)
            self._meta_path(collection).unlink(missing_ok=True)
        logger.info("dropped collection %s", collection)

    @override
    def current_collection(self) -> str | None:
        return self._aliases().get(self._alias)

    # collections and their per-modality shards ----------------------------------------------------
    def _meta_path(self, collection: str) -> Path:
        return self._root / "shards" / f"{collection}.json"

    def _collection_dim(self, collection: str) -> int | None:
        try:
            return int(json.loads(self._meta_path(collection).read_text())["dim"])
        except (OSError, ValueError, KeyError):
            return None

    def _quantized(self, collection: str) -> bool:
        try:
            return json.loads(self._meta_path(collection).read_text()).get("quantization") == "int8"
        except (OSError, ValueError):
            return False

    @override
    def create_collection(self, collection: str, dim: int) -> None:
        """A new, empty collection (its shards appear with their first points)."""
        if self._collection_dim(collection) is None:
            (self._root / "shards" / collection).mkdir(parents=True, exist_ok=True)
            meta = {"dim": dim, "partitioned_by": "modality", "quantization": self._quantization}
            self._meta_path(collection).write_text(json.dumps(meta))

    def _partitions(self, collection: str) -> list[str]:
        folder = self._root / "shards" / collection
        return [m for m in MODALITIES if (folder / m).is_dir()]

    def _shard(self, collection: str, modality: str, create: bool = False) -> Any:
        key = (collection, modality)
        with self._lock:
            if key in self._shards:
                return self._shards[key]
            qe = self._qe
            path = self._root / "shards" / collection / modality
            try:
                if path.is_dir() and any(path.iterdir()):
                    shard = qe.EdgeShard.load(str(path))
                elif create:
                    dim = self._collection_dim(collection)
                    if dim is None:
                        raise NotFound(f"collection {collection} does not exist")
                    quantization = None
                    if self._quantized(collection):
                        quantization = qe.ScalarQuantizationConfig(
                            qe.ScalarType.Int8, quantile=QUANTILE, always_ram=True
                        )
                    optimizers = None
                    if self._indexing_threshold_kb is not None:
                        optimizers = qe.EdgeOptimizersConfig(indexing_threshold=self._indexing_threshold_kb)
                    config = qe.EdgeConfig(
                        vectors=qe.EdgeVectorParams(
                            size=dim, distance=qe.Distance.Euclid, quantization_config=quantization
                        ),
                        optimizers=optimizers,
                    )
                    shard = qe.EdgeShard.create(str(path), config)
                    for field in INDEXED_FIELDS:
                        shard.update(
                            qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword)
                        )
                else:
                    return None
            except (NotFound, ConfigError):
                raise
            except Exception as exc:  # the engine raises plain Exception
                raise BackendUnavailable(f"cannot open embedded index shard {path}: {exc}") from exc
            self._shards[key] = shard
            return shard

    def _current(self, aliases: dict[str, str] | None = None) -> str:
        collection = (aliases if aliases is not None else self._aliases()).get(self._alias)
        if collection is None:
            raise NotFound("the index is empty: no collection has been created yet")
        return collection

    @override
    def ensure_collection(self, dim: int, model_version: str) -> str:
        with self._lock:
            current = self.current_collection()
            if current is None:
                current = collection_name(self._alias, model_version)
                self.create_collection(current, dim)
                self.switch_alias(current)
            size = self._collection_dim(current)
            if size is not None and size != dim:
                raise ConfigError(
                    f"collection {current} holds {size}-value vectors but the model makes {dim}: reindex"
                )
            return current

    @override
    def upsert(self, points: Sequence[IndexPoint], collection: str | None = None) -> None:
        if not points:
            return
        if collection is None:
            with self._lock:
                aliases = self._aliases()  # one read of the alias file per live write
                current = self._current(aliases)
                for target in dual_write_targets(current, aliases.get(self._next_key), self._alias, points):
                    self.upsert(points, target)
            return
        qe = self._qe
        by_modality: dict[str, list[IndexPoint]] = {}
        for point in points:
            modality = point.payload.get("modality", OTHER)
            by_modality.setdefault(modality if modality in MODALITIES else OTHER, []).append(point)
        with self._lock:
            for modality, group in by_modality.items():
                shard = self._shard(collection, modality, create=True)
                shard.update(
                    qe.UpdateOperation.upsert_points(
                        [qe.Point(p.point_id, [float(x) for x in p.vector], p.payload) for p in group]
                    )
                )
                shard.flush()
                # an instance re-sent with another modality must not stay in its old partition
                ids = [p.point_id for p in group]
                for other in self._partitions(collection):
                    if other != modality:
                        stale = self._shard(collection, other)
                        if stale is not None and stale.retrieve(ids, with_payload=False, with_vector=False):
                            stale.update(qe.UpdateOperation.delete_points(ids))
                            stale.flush()

    @override
    def search(self, vector: Sequence[float], k: int, where: HitFilter | None = None) -> list[SearchHit]:
        qe = self._qe
        where = where or HitFilter()
        collection = self._current()
        wanted = modality_filter_values(where.modalities) or MODALITIES
        must = [qe.FieldCondition(key=key, match=qe.MatchValue(value)) for key, value in where.requirements()]
        must_not = [
            qe.FieldCondition(key=key, match=qe.MatchValue(value)) for key, value in where.exclusions()
        ]
        flt = qe.Filter(must=must or None, must_not=must_not or None) if must or must_not else None
        params = None
        if self._quantized(collection):
            params = qe.SearchParams(
                quantization=qe.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING)
            )
        request = qe.QueryRequest(
            limit=int(k),
            query=qe.Query.Nearest([float(x) for x in vector]),
            with_payload=True,
            filter=flt,
            params=params,
        )
        hits = []
        for modality in wanted:
            shard = self._shard(collection, modality)
            if shard is not None:
                hits += [
                    SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in shard.query(request)
                ]
        hits.sort(key=lambda hit: hit.distance)
        return hits[: int(k)]

    @override
    def find_sop(self, sop_instance_uid: str) -> tuple[list[float], dict[str, Any]]:
        qe = self._qe
        collection = self._current()
        shards = [s for m in self._partitions(collection) if (s := self._shard(collection, m)) is not None]
        for shard in shards:
            records = shard.retrieve([point_id(sop_instance_uid)], with_payload=True, with_vector=True)
            if records:
                return as_vector(records[0].vector), dict(records[0].payload or {})
        flt = qe.Filter(
            must=[qe.FieldCondition(key="sop_instance_uid", match=qe.MatchValue(sop_instance_uid))]
        )
        for shard in shards:  # an object embedded frame by frame: any of its frames
            found, _ = shard.scroll(
                qe.ScrollRequest(limit=1, filter=flt, with_payload=True, with_vector=True)
            )
            if found:
                return as_vector(found[0].vector), dict(found[0].payload or {})
        raise NotFound(f"SOP Instance UID {sop_instance_uid} is not indexed")

    @override
    def counts_by_modality(self) -> dict[str, int]:
        qe = self._qe
        collection = self.current_collection()
        if collection is None:
            return {}
        counts = {}
        for modality in self._partitions(collection):
            n = self._shard(collection, modality).count(qe.CountRequest(exact=True))
            if n:
                counts[modality] = int(n)
        return counts

    @override
    def collections(self) -> list[str]:
        prefix = f"{self._alias}--"
        folder = self._root / "shards"
        return sorted(p.stem for p in folder.glob(f"{prefix}*.json") if p.stem.startswith(prefix))

    @override
    def scroll(
        self, collection: str | None = None, *, field: str | None = None, value: str | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        qe = self._qe
        collection = collection or self._current()
        flt = None
        if field is not None:
            flt = qe.Filter(must=[qe.FieldCondition(key=field, match=qe.MatchValue(value))])
        for modality in self._partitions(collection):
            shard = self._shard(collection, modality)
            if shard is None:
                continue
            offset = None
            while True:
                with self._lock:
                    records, offset = shard.scroll(
                        qe.ScrollRequest(
                            offset=offset, limit=1024, filter=flt, with_payload=True, with_vector=False
                        )
                    )
                for record in records:
                    yield str(record.id), dict(record.payload or {})
                if offset is None or not records:
                    break

    @override
    def delete_points(self, point_ids: Sequence[str], collection: str | None = None) -> None:
        if not point_ids:
            return
        qe = self._qe
        collection = collection or self._current()
        with self._lock:
            for modality in self._partitions(collection):
                shard = self._shard(collection, modality)
                if shard is not None:
                    shard.update(qe.UpdateOperation.delete_points(list(point_ids)))
                    shard.flush()

    def segment_counts(self) -> tuple[int, int]:
        """(segments, vectors in HNSW graphs), summed over the alias's shards; what optimize() changes."""
        collection = self._current()
        infos = [self._shard(collection, m).info() for m in self._partitions(collection)]
        return sum(i.segments_count for i in infos), sum(i.indexed_vectors_count for i in infos)

    def optimize(self) -> bool:
        """Build the HNSW graphs and merge segments (blocking)."""
        collection = self._current()
        return any(bool(self._shard(collection, m).optimize()) for m in self._partitions(collection))

    @override
    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                try:
                    shard.flush()
                    shard.close()
                except Exception:  # closing is best effort, each shard on its own
                    logger.exception("closing an edge shard failed")
            self._shards.clear()
            if self._owner_lock is not None:
                self._owner_lock.close()  # releases the flock
                self._owner_lock = None


def _take_owner_lock(root: Path) -> IO[str]:
    """One process owns the whole embedded index (all shards and the alias file)."""
    handle = open(root / ".owner.lock", "a+")  # noqa: SIM115 - held open for the owner's lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise BackendUnavailable(
            f"the embedded index at {root} is open in another process (pid {owner}); one process owns it "
            "(the query service) and workers write through it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
