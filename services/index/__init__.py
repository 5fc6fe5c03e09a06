"""The vector index adapter: one interface, three ways to reach Qdrant.

* :class:`EdgeIndex`: the embedded default, Qdrant's Rust engine in-process (``qdrant-edge-py``):
  WAL, payload index, HNSW after ``optimize()``. One process owns it (the query service).
* :class:`QdrantServerIndex`: a Qdrant server (``QDRANT_URL``), or qdrant-client's local mode for a
  path (pure-Python brute force; kept for comparison and small set-ups).
* :class:`RemoteIndexWriter`: what workers use in the embedded default: upserts travel over gRPC to
  the process that owns the :class:`EdgeIndex`.

Collections are versioned (``<alias>--<model version>``) and reached through an alias, so a reindex
fills a new collection and then switches the alias atomically. Distances are Euclidean.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.errors import BackendUnavailable, ConfigError, NotFound
from services.core.vocabulary import MODALITIES, OTHER

logger = logging.getLogger(__name__)

INDEXED_FIELDS = ("modality", "sop_instance_uid", "study_instance_uid")


def point_id(sop_instance_uid: str, frame_number: int | None = None) -> str:
    """Deterministic point ID: uuid5 (OID namespace) of the SOP Instance UID, plus ``/frame`` for
    the extra frames of a multi-frame object embedded frame by frame."""
    key = sop_instance_uid if not frame_number else f"{sop_instance_uid}/{frame_number}"
    return str(uuid.uuid5(uuid.NAMESPACE_OID, key))


def collection_name(alias: str, model_version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_version)
    return f"{alias}--{safe}"


@dataclass(frozen=True)
class IndexPoint:
    point_id: str
    vector: Sequence[float]
    payload: dict


@dataclass(frozen=True)
class SearchHit:
    point_id: str
    distance: float
    payload: dict


class VectorIndex(ABC):
    """What the workers and the query service need from a vector store."""

    @abstractmethod
    def ensure_collection(self, dim: int, model_version: str) -> str:
        """Create the versioned collection and point the alias at it if there is none yet."""

    @abstractmethod
    def create_collection(self, collection: str, dim: int) -> None:
        """A new, empty collection beside the current one (for a reindex)."""

    @abstractmethod
    def switch_alias(self, collection: str) -> None:
        """Point the alias at ``collection`` atomically."""

    @abstractmethod
    def current_collection(self) -> str | None: ...

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint], collection: str | None = None) -> None: ...

    @abstractmethod
    def search(
        self,
        vector: Sequence[float],
        k: int,
        modalities: Sequence[str] = (),
        exclude_study: str | None = None,
    ) -> list[SearchHit]: ...

    @abstractmethod
    def find_sop(self, sop_instance_uid: str) -> tuple[list[float], dict]:
        """The vector and payload of an indexed instance; raises NotFound."""

    @abstractmethod
    def counts_by_modality(self) -> dict[str, int]: ...

    def close(self) -> None:  # pragma: no cover - trivial default
        pass


def _modality_filter_values(modalities: Sequence[str]) -> list[str]:
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ConfigError(f"unknown modalities {unknown}")
    return sorted(set(modalities))


# ------------------------------------------------------------------------------------------------
class EdgeIndex(VectorIndex):
    """The embedded store: ``qdrant-edge-py`` shards under ``<data>/index``.

    A collection is one shard per modality (``shards/<collection>/<modality>``): a query filtered
    by modality scans only that modality's vectors instead of testing a filter on every point,
    and an unfiltered query merges the per-modality top-k. ``aliases.json`` maps the alias to a
    collection and is replaced atomically, which makes the alias switch of a reindex atomic. One
    process owns the whole index (an exclusive lock on ``.owner.lock``): a second one gets
    :class:`BackendUnavailable` with a clear message.
    """

    def __init__(self, root: Path, alias: str):
        import qdrant_edge  # noqa: F401  (fail early, clearly, if the engine is missing)

        self._qe = qdrant_edge
        self._root = Path(root)
        self._alias = alias
        self._lock = threading.RLock()
        self._shards: dict[tuple[str, str], object] = {}
        (self._root / "shards").mkdir(parents=True, exist_ok=True)
        self._owner_lock = _take_owner_lock(self._root)

    # aliases ------------------------------------------------------------------------------------
    def _aliases_path(self) -> Path:
        return self._root / "aliases.json"

    def _aliases(self) -> dict[str, str]:
        try:
            return json.loads(self._aliases_path().read_text())
        except FileNotFoundError:
            return {}

    def switch_alias(self, collection: str) -> None:
        """Point the alias at ``collection`` atomically (write temp, fsync, rename)."""
        aliases = self._aliases()
        aliases[self._alias] = collection
        tmp = self._aliases_path().with_suffix(".tmp")
        with open(tmp, "w") as handle:
            json.dump(aliases, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._aliases_path())
        logger.info("alias %s now points at %s", self._alias, collection)

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

    def create_collection(self, collection: str, dim: int) -> None:
        """A new, empty collection (its shards appear with their first points)."""
        if self._collection_dim(collection) is None:
            (self._root / "shards" / collection).mkdir(parents=True, exist_ok=True)
            self._meta_path(collection).write_text(json.dumps({"dim": dim, "partitioned_by": "modality"}))

    def _partitions(self, collection: str) -> list[str]:
        folder = self._root / "shards" / collection
        return [m for m in MODALITIES if (folder / m).is_dir()]

    def _shard(self, collection: str, modality: str, create: bool = False):
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
                    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Euclid))
                    shard = qe.EdgeShard.create(str(path), config)
                    for field in INDEXED_FIELDS:
                        shard.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
                else:
                    return None
            except (NotFound, ConfigError):
                raise
            except Exception as exc:  # the engine raises plain Exception
                raise BackendUnavailable(f"cannot open embedded index shard {path}: {exc}") from exc
            self._shards[key] = shard
            return shard

    def _current(self) -> str:
        collection = self.current_collection()
        if collection is None:
            raise NotFound("the index is empty: no collection has been created yet")
        return collection

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

    def upsert(self, points: Sequence[IndexPoint], collection: str | None = None) -> None:
        if not points:
            return
        qe = self._qe
        collection = collection or self._current()
        by_modality: dict[str, list[IndexPoint]] = {}
        for point in points:
            modality = point.payload.get("modality", OTHER)
            by_modality.setdefault(modality if modality in MODALITIES else OTHER, []).append(point)
        with self._lock:
            for modality, group in by_modality.items():
                shard = self._shard(collection, modality, create=True)
                shard.update(qe.UpdateOperation.upsert_points(
                    [qe.Point(p.point_id, [float(x) for x in p.vector], p.payload) for p in group]))
                shard.flush()
                # an instance re-sent with another modality must not stay in its old partition
                ids = [p.point_id for p in group]
                for other in self._partitions(collection):
                    if other != modality:
                        stale = self._shard(collection, other)
                        if stale is not None and stale.retrieve(ids, with_payload=False, with_vector=False):
                            stale.update(qe.UpdateOperation.delete_points(ids))
                            stale.flush()

    def search(self, vector, k, modalities=(), exclude_study=None) -> list[SearchHit]:
        qe = self._qe
        collection = self._current()
        wanted = _modality_filter_values(modalities) or MODALITIES
        flt = None
        if exclude_study:
            flt = qe.Filter(must_not=[qe.FieldCondition(key="study_instance_uid", match=qe.MatchValue(exclude_study))])
        request = qe.QueryRequest(limit=int(k), query=qe.Query.Nearest([float(x) for x in vector]),
                                  with_payload=True, filter=flt)
        hits = []
        for modality in wanted:
            shard = self._shard(collection, modality)
            if shard is not None:
                hits += [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in shard.query(request)]
        hits.sort(key=lambda hit: hit.distance)
        return hits[: int(k)]

    def find_sop(self, sop_instance_uid: str) -> tuple[list[float], dict]:
        qe = self._qe
        collection = self._current()
        shards = [s for m in self._partitions(collection) if (s := self._shard(collection, m)) is not None]
        for shard in shards:
            records = shard.retrieve([point_id(sop_instance_uid)], with_payload=True, with_vector=True)
            if records:
                return _as_vector(records[0].vector), dict(records[0].payload or {})
        flt = qe.Filter(must=[qe.FieldCondition(key="sop_instance_uid", match=qe.MatchValue(sop_instance_uid))])
        for shard in shards:  # an object embedded frame by frame: any of its frames
            found, _ = shard.scroll(qe.ScrollRequest(limit=1, filter=flt, with_payload=True, with_vector=True))
            if found:
                return _as_vector(found[0].vector), dict(found[0].payload or {})
        raise NotFound(f"SOP Instance UID {sop_instance_uid} is not indexed")

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

    def optimize(self) -> bool:
        """Build the HNSW graphs and merge segments (blocking)."""
        collection = self._current()
        return any(bool(self._shard(collection, m).optimize()) for m in self._partitions(collection))

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                try:
                    shard.flush()
                    shard.close()
                except Exception:  # closing is best effort
                    logger.exception("closing an edge shard failed")
            self._shards.clear()
            if self._owner_lock is not None:
                self._owner_lock.close()  # releases the flock
                self._owner_lock = None


def _take_owner_lock(root: Path):
    """One process owns the whole embedded index (all shards and the alias file)."""
    import fcntl

    handle = open(root / ".owner.lock", "a+")
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


def _as_vector(vector) -> list[float]:
    if isinstance(vector, dict):  # named vectors: the default one is ""
        vector = next(iter(vector.values()))
    return [float(x) for x in vector]


# ------------------------------------------------------------------------------------------------
class QdrantServerIndex(VectorIndex):
    """A Qdrant server through qdrant-client (``QDRANT_URL``), or qdrant-client's local path mode."""

    def __init__(self, alias: str, *, url: str | None = None, api_key: str | None = None, path: Path | None = None):
        from qdrant_client import QdrantClient, models

        self._models = models
        self._alias = alias
        self._local = url is None
        try:
            if url:
                self._client = QdrantClient(url=url, api_key=api_key, timeout=10)
            else:
                self._client = QdrantClient(path=str(path))
        except Exception as exc:
            raise BackendUnavailable(f"cannot open Qdrant ({url or path}): {exc}") from exc

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (NotFound, ConfigError):
            raise
        except Exception as exc:
            text = str(exc)
            if "Not found" in text or "not found" in text or "doesn't exist" in text:
                raise NotFound(f"Qdrant: {text[:300]}") from exc
            raise BackendUnavailable(f"Qdrant call failed: {type(exc).__name__}: {text[:300]}") from exc

    def _alias_target(self) -> str | None:
        for item in self._call(self._client.get_aliases).aliases:
            if item.alias_name == self._alias:
                return item.collection_name
        return None

    def current_collection(self) -> str | None:
        return self._alias_target()

    def create_collection(self, collection: str, dim: int) -> None:
        models = self._models
        if not self._call(self._client.collection_exists, collection):
            self._call(
                self._client.create_collection,
                collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.EUCLID),
            )
            for field in INDEXED_FIELDS:
                self._call(
                    self._client.create_payload_index, collection, field, models.PayloadSchemaType.KEYWORD
                )

    def switch_alias(self, collection: str) -> None:
        models = self._models
        ops = []
        if self._alias_target() is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._alias)))
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=self._alias)
            )
        )
        self._call(self._client.update_collection_aliases, ops)

    def ensure_collection(self, dim: int, model_version: str) -> str:
        current = self._alias_target()
        if current is None:
            current = collection_name(self._alias, model_version)
            self.create_collection(current, dim)
            self.switch_alias(current)
        info = self._call(self._client.get_collection, current)
        size = info.config.params.vectors.size
        if size != dim:
            raise ConfigError(f"collection {current} holds {size}-value vectors but the model makes {dim}: reindex")
        return current

    def upsert(self, points: Sequence[IndexPoint], collection: str | None = None) -> None:
        if not points:
            return
        models = self._models
        self._call(
            self._client.upsert,
            collection or self._alias,
            points=[models.PointStruct(id=p.point_id, vector=[float(x) for x in p.vector], payload=p.payload) for p in points],
            wait=True,
        )

    def _filter(self, modalities, exclude_study):
        models = self._models
        must, must_not = [], []
        values = _modality_filter_values(modalities)
        if values:
            must.append(models.FieldCondition(key="modality", match=models.MatchAny(any=values)))
        if exclude_study:
            must_not.append(models.FieldCondition(key="study_instance_uid", match=models.MatchValue(value=exclude_study)))
        if not must and not must_not:
            return None
        return models.Filter(must=must or None, must_not=must_not or None)

    def search(self, vector, k, modalities=(), exclude_study=None) -> list[SearchHit]:
        response = self._call(
            self._client.query_points,
            self._alias,
            query=[float(x) for x in vector],
            query_filter=self._filter(modalities, exclude_study),
            limit=int(k),
            with_payload=True,
        )
        return [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]

    def find_sop(self, sop_instance_uid: str) -> tuple[list[float], dict]:
        records = self._call(
            self._client.retrieve, self._alias, [point_id(sop_instance_uid)], with_payload=True, with_vectors=True
        )
        if not records:
            models = self._models
            flt = models.Filter(must=[models.FieldCondition(key="sop_instance_uid", match=models.MatchValue(value=sop_instance_uid))])
            records, _ = self._call(self._client.scroll, self._alias, scroll_filter=flt, limit=1, with_payload=True, with_vectors=True)
        if not records:
            raise NotFound(f"SOP Instance UID {sop_instance_uid} is not indexed")
        return _as_vector(records[0].vector), dict(records[0].payload or {})

    def counts_by_modality(self) -> dict[str, int]:
        models = self._models
        if self._alias_target() is None:
            return {}
        counts = {}
        for modality in MODALITIES:
            flt = models.Filter(must=[models.FieldCondition(key="modality", match=models.MatchValue(value=modality))])
            n = self._call(self._client.count, self._alias, count_filter=flt, exact=True).count
            if n:
                counts[modality] = int(n)
        return counts

    def close(self) -> None:
        self._client.close()


# ------------------------------------------------------------------------------------------------
class RemoteIndexWriter:
    """Upserts through the index owner's ``cbmir.v1.IndexWriter`` gRPC service (embedded default)."""

    def __init__(self, target: str, timeout_s: float = 30.0):
        import grpc

        from services.grpc_gen.cbmir.v1 import index_writer_pb2, index_writer_pb2_grpc

        self._grpc = grpc
        self._pb2 = index_writer_pb2
        self._channel = grpc.insecure_channel(target)
        self._stub = index_writer_pb2_grpc.IndexWriterStub(self._channel)
        self._target = target
        self._timeout_s = timeout_s

    def upsert(self, points: Sequence[IndexPoint], model_version: str) -> None:
        pb2 = self._pb2
        request = pb2.UpsertPointsRequest(
            model_version=model_version,
            points=[
                pb2.IndexedPoint(point_id=p.point_id, vector=list(map(float, p.vector)), payload_json=json.dumps(p.payload))
                for p in points
            ],
        )
        try:
            self._stub.UpsertPoints(request, timeout=self._timeout_s, wait_for_ready=False)
        except self._grpc.RpcError as exc:
            code = exc.code()
            if code == self._grpc.StatusCode.FAILED_PRECONDITION:
                raise ConfigError(f"index owner refused the upsert: {exc.details()}") from exc
            raise BackendUnavailable(f"index owner at {self._target} unavailable: {code.name} {exc.details()}") from exc

    def close(self) -> None:
        self._channel.close()


def open_index(settings) -> VectorIndex:
    """The index for an :class:`~services.core.config.IndexSettings` (server URL, else embedded)."""
    if settings.qdrant_url:
        return QdrantServerIndex(settings.collection, url=settings.qdrant_url, api_key=settings.qdrant_api_key)
    return EdgeIndex(settings.embedded_path, settings.collection)


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until true or the timeout passes (used by the demo and tests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def as_float32(vectors: Iterable[Sequence[float]]) -> np.ndarray:
    return np.asarray(list(vectors), dtype=np.float32)
