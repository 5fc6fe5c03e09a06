"""The embedded store: Qdrant's Rust engine in-process (``qdrant-edge-py``), one shard per modality.

WAL, payload indexes and HNSW graphs come with the engine. One process owns the whole index (the
query service); workers write through its ``IndexWriter`` RPC.

HNSW graphs are built by the owner in the background (:meth:`EdgeIndex.start_graph_builder`): the
engine's ``optimize()`` holds the GIL for the whole build (about 45 s for 250k 48-d points on 2 cores),
which would freeze every search of the process, so a shard is copied, optimised by a child process, and
swapped in; the writes made meanwhile are replayed into the copy first. Searches pause only for the swap
(closing the old shard, two renames and loading the new one: ~0.2 s).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from typing_extensions import override

from services.core.errors import BackendUnavailable, ConfigError, NotFound
from services.core.files import fsync_dir
from services.core.vocabulary import MODALITIES, OTHER
from services.index.base import (
    INDEXED_FIELDS,
    OVERSAMPLING,
    QUANTILE,
    HitFilter,
    HnswParams,
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

# a graph is rebuilt even while writes go on once its first unbuilt write is this many debounces old
OVERDUE_DEBOUNCES = 30
# after a failed build, the builder waits this long before it tries again
BUILD_RETRY_S = 60.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds ``services/``
_BUILD_CHILD = (
    "import sys; from services.index.edge import build_graphs_child; build_graphs_child(sys.argv[1:])"
)


class _BuildCancelled(Exception):
    """The index is closing: a graph build in progress was abandoned."""


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
        self,
        root: Path,
        alias: str,
        quantization: str = "none",
        indexing_threshold_kb: int | None = None,
        hnsw: HnswParams | None = None,
    ):
        import qdrant_edge

        self._qe = qdrant_edge
        self._root = Path(root)
        self._alias = alias
        self._quantization = quantization
        # vectors (KB) a segment holds before optimize() builds its HNSW graph and quantised codes;
        # None: derived from hnsw.min_points (or the engine's default when that is 0). Benchmarks
        # lower it to measure small real collections.
        self._indexing_threshold_kb = indexing_threshold_kb
        self._hnsw = hnsw or HnswParams()
        self._lock = threading.RLock()  # writes, opening shards, the alias file
        self._swap = _ReadWriteLock()  # searches (read) against a shard being swapped (write)
        self._shards: dict[tuple[str, str], Any] = {}  # qdrant_edge.EdgeShard (untyped)
        # graph builder: when each shard was last written, its first write not yet in a graph, the
        # writes made while a copy of it is being built (replayed into the copy), and shards whose
        # build left points outside a graph (their point count then), not retried until it grows
        self._last_write: dict[tuple[str, str], float] = {}
        self._first_unbuilt: dict[tuple[str, str], float] = {}
        self._journal: dict[tuple[str, str], list[Any]] = {}
        self._stuck: dict[tuple[str, str], int] = {}
        self._build_lock = threading.Lock()  # held for a whole graph build (see _build_shard)
        self._builder: threading.Thread | None = None
        self._stopping = threading.Event()
        # the alias file and the collections' meta files, as this process last read or wrote them:
        # it owns the index, so only its own writes (which update these) change them
        self._files_lock = threading.Lock()
        self._aliases_cache: dict[str, str] | None = None
        self._meta_cache: dict[str, Any] = {}
        (self._root / "shards").mkdir(parents=True, exist_ok=True)
        self._owner_lock: IO[str] | None = _take_owner_lock(self._root)
        _recover_swaps(self._root / "shards")

    # aliases ------------------------------------------------------------------------------------
    def _aliases_path(self) -> Path:
        return self._root / "aliases.json"

    def _aliases(self) -> dict[str, str]:
        """The alias file (a copy the caller may change), read from disk only the first time."""
        cached = self._aliases_cache
        if cached is None:
            with self._files_lock:  # not while a write replaces the file
                cached = self._aliases_cache
                if cached is None:
                    try:
                        cached = json.loads(self._aliases_path().read_text())
                    except FileNotFoundError:
                        return {}
                    self._aliases_cache = cached
        return dict(cached)

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        tmp = self._aliases_path().with_suffix(".tmp")
        with self._files_lock:
            self._aliases_cache = None  # read again should the write fail half-way
            with open(tmp, "w") as handle:
                json.dump(aliases, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._aliases_path())
            self._aliases_cache = dict(aliases)

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
            with self._files_lock:
                self._meta_cache.pop(collection, None)
                self._meta_path(collection).unlink(missing_ok=True)
        logger.info("dropped collection %s", collection)

    @override
    def current_collection(self) -> str | None:
        return self._aliases().get(self._alias)

    # collections and their per-modality shards ----------------------------------------------------
    def _meta_path(self, collection: str) -> Path:
        return self._root / "shards" / f"{collection}.json"

    def _meta(self, collection: str) -> Any:
        """The collection's meta file (JSON; not to be changed), read from disk only the first time;
        None while it is missing or unreadable."""
        meta = self._meta_cache.get(collection)
        if meta is not None:
            return meta
        with self._files_lock:  # not while create or drop writes it
            meta = self._meta_cache.get(collection)
            if meta is not None:
                return meta
            try:
                meta = json.loads(self._meta_path(collection).read_text())
            except (OSError, ValueError):
                return None
            self._meta_cache[collection] = meta
            return meta

    def _collection_dim(self, collection: str) -> int | None:
        meta = self._meta(collection)
        if meta is None:
            return None
        try:
            return int(meta["dim"])
        except (ValueError, KeyError):
            return None

    def _quantized(self, collection: str) -> bool:
        meta = self._meta(collection)
        return meta is not None and meta.get("quantization") == "int8"

    @override
    def create_collection(self, collection: str, dim: int) -> None:
        """A new, empty collection (its shards appear with their first points)."""
        if self._collection_dim(collection) is None:
            (self._root / "shards" / collection).mkdir(parents=True, exist_ok=True)
            meta = {"dim": dim, "partitioned_by": "modality", "quantization": self._quantization}
            with self._files_lock:
                self._meta_cache.pop(collection, None)  # read again should the write fail half-way
                self._meta_path(collection).write_text(json.dumps(meta))
                self._meta_cache[collection] = meta

    def _partitions(self, collection: str) -> list[str]:
        folder = self._root / "shards" / collection
        return [m for m in MODALITIES if (folder / m).is_dir()]

    def _shard(self, collection: str, modality: str, create: bool = False) -> Any:
        key = (collection, modality)
        shard = self._shards.get(key)  # an open shard needs no lock (writes may hold it long)
        if shard is not None:
            return shard
        with self._lock:
            if key in self._shards:
                return self._shards[key]
            qe = self._qe
            path = self._root / "shards" / collection / modality
            try:
                if path.is_dir() and any(path.iterdir()):
                    # with the current settings: they apply to the graphs built from now on
                    shard = qe.EdgeShard.load(str(path), self._config(collection))
                elif create:
                    if self._collection_dim(collection) is None:
                        raise NotFound(f"collection {collection} does not exist")
                    shard = qe.EdgeShard.create(str(path), self._config(collection))
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

    def _build_params(self, collection: str) -> dict[str, Any]:
        """What a shard of ``collection`` is opened with (also handed to the build child as JSON)."""
        dim = self._collection_dim(collection) or 0
        threshold = self._indexing_threshold_kb
        if threshold is None and self._hnsw.min_points > 0:
            # the engine counts KB of float32 vectors; a little under min_points so that a segment
            # of exactly min_points unbuilt points qualifies
            threshold = max(1, int(self._hnsw.min_points * dim * 4 * 0.9 / 1024))
        return {
            "dim": dim,
            "int8": self._quantized(collection),
            "m": self._hnsw.m,
            "ef_construct": self._hnsw.ef_construct,
            "indexing_threshold_kb": threshold,
            "full_scan_threshold_kb": self._hnsw.full_scan_kb(dim),
        }

    def _config(self, collection: str) -> Any:
        return _edge_config(self._qe, self._build_params(collection))

    def _apply(self, key: tuple[str, str], shard: Any, operation: Any) -> None:
        """One write into a shard (the caller holds the lock); journalled while a copy is built."""
        shard.update(operation)
        now = time.monotonic()
        self._last_write[key] = now
        self._first_unbuilt.setdefault(key, now)
        if key in self._journal:
            self._journal[key].append(operation)

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
                self._apply(
                    (collection, modality),
                    shard,
                    qe.UpdateOperation.upsert_points(
                        [qe.Point(p.point_id, [float(x) for x in p.vector], p.payload) for p in group]
                    ),
                )
                shard.flush()
                # an instance re-sent with another modality must not stay in its old partition
                ids = [p.point_id for p in group]
                for other in self._partitions(collection):
                    if other != modality:
                        stale = self._shard(collection, other)
                        if stale is not None and stale.retrieve(ids, with_payload=False, with_vector=False):
                            self._apply((collection, other), stale, qe.UpdateOperation.delete_points(ids))
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
        quantization = None
        if self._quantized(collection):
            quantization = qe.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING)
        # hnsw_ef only matters in segments with a graph; the others are scanned exactly
        params = qe.SearchParams(hnsw_ef=self._hnsw.ef, quantization=quantization)
        request = qe.QueryRequest(
            limit=int(k),
            query=qe.Query.Nearest([float(x) for x in vector]),
            with_payload=True,
            filter=flt,
            params=params,
        )
        hits = []
        with self._swap.read():
            for modality in wanted:
                shard = self._shard(collection, modality)
                if shard is not None:
                    hits += [
                        SearchHit(str(p.id), float(p.score), dict(p.payload or {}))
                        for p in shard.query(request)
                    ]
        hits.sort(key=lambda hit: hit.distance)
        return hits[: int(k)]

    @override
    def find_sop(
        self, sop_instance_uid: str, likely_modalities: Sequence[str] = ()
    ) -> tuple[list[float], dict[str, Any]]:
        with self._swap.read():
            return self._find_sop(sop_instance_uid, likely_modalities)

    def _find_sop(
        self, sop_instance_uid: str, likely_modalities: Sequence[str] = ()
    ) -> tuple[list[float], dict[str, Any]]:
        qe = self._qe
        collection = self._current()
        first = modality_filter_values(likely_modalities)
        order = [*first, *(m for m in self._partitions(collection) if m not in first)]
        shards = [s for m in order if (s := self._shard(collection, m)) is not None]
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
        with self._swap.read():
            for modality in self._partitions(collection):
                # unfiltered, the engine's estimate is its segments' live point counts, which is
                # exact; exact=True would visit every point (43 ms per 400k, holding the GIL, which
                # stalls every search in this process while the health loop refreshes the gauge)
                n = self._shard(collection, modality).count(qe.CountRequest(exact=False))
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
            offset = None
            while True:
                with self._swap.read(), self._lock:  # per page: the shard may be swapped between pages
                    shard = self._shard(collection, modality)
                    if shard is None:
                        break
                    records, offset = shard.scroll(
                        qe.ScrollRequest(
                            offset=offset, limit=1024, filter=flt, with_payload=True, with_vector=False
                        )
                    )
                for record in records:
                    yield str(record.id), dict(record.payload or {})
                if offset is None or not records:
                    break

    def count_points(self, field: str, value: str, modalities: Sequence[str] = ()) -> int:
        """How many points of the alias's collection have ``value`` in their payload ``field``,
        counted through its payload index in the shards of ``modalities`` only (empty: all)."""
        qe = self._qe
        collection = self._current()
        wanted = modality_filter_values(modalities) or MODALITIES
        request = qe.CountRequest(
            exact=True, filter=qe.Filter(must=[qe.FieldCondition(key=field, match=qe.MatchValue(value))])
        )
        count = 0
        with self._swap.read():
            for modality in wanted:
                shard = self._shard(collection, modality)
                if shard is not None:
                    count += int(shard.count(request))
        return count

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
                    self._apply(
                        (collection, modality), shard, qe.UpdateOperation.delete_points(list(point_ids))
                    )
                    shard.flush()

    def segment_counts(self) -> tuple[int, int]:
        """(segments, vectors in HNSW graphs), summed over the alias's shards; what optimize() changes."""
        collection = self._current()
        with self._swap.read():
            infos = [self._shard(collection, m).info() for m in self._partitions(collection)]
        return sum(i.segments_count for i in infos), sum(i.indexed_vectors_count for i in infos)

    def optimize(self) -> bool:
        """Build the HNSW graphs and merge segments in this process, blocking it (the engine holds the
        GIL throughout): for scripts. A serving process uses :meth:`build_graphs` or the builder."""
        collection = self._current()
        with self._lock:
            return any(bool(self._shard(collection, m).optimize()) for m in self._partitions(collection))

    # HNSW graphs, built out of process ------------------------------------------------------------
    def start_graph_builder(self) -> None:
        """Build graphs in the background from now on (a daemon thread; :meth:`close` stops it), for
        every modality whose shard has ``hnsw.min_points`` points outside a graph once its writes
        have paused for ``hnsw.debounce_s``. Nothing when ``hnsw.min_points`` is 0."""
        if self._hnsw.min_points <= 0 or self._builder is not None:
            return
        self._builder = threading.Thread(target=self._build_loop, name="hnsw-builder", daemon=True)
        self._builder.start()

    def _build_loop(self) -> None:
        interval = max(0.2, min(5.0, self._hnsw.debounce_s / 2))
        while not self._stopping.wait(interval):
            try:
                self._build_due()
            except _BuildCancelled:
                return
            except Exception:  # the engine raises plain Exception; searches go on without a graph
                logger.exception("building an HNSW graph failed; trying again in %.0f s", BUILD_RETRY_S)
                self._stopping.wait(BUILD_RETRY_S)

    def _build_due(self) -> None:
        """Build every shard that is due (enough unbuilt points, writes paused or overdue)."""
        debounce = self._hnsw.debounce_s
        collections = {c for c in (self.current_collection(), self.reindex_target()) if c is not None}
        for collection in sorted(collections):
            for modality in self._partitions(collection):
                key = (collection, modality)
                now = time.monotonic()
                quiet = now - self._last_write.get(key, -1e18) >= debounce
                overdue = now - self._first_unbuilt.get(key, now) >= OVERDUE_DEBOUNCES * debounce
                if not (quiet or overdue) or self._stopping.is_set():
                    continue
                with self._swap.read():
                    shard = self._shard(collection, modality)
                    info = shard.info() if shard is not None else None
                if info is None:
                    continue
                unbuilt = int(info.points_count) - int(info.indexed_vectors_count)
                if unbuilt < self._hnsw.min_points:
                    continue
                stuck = self._stuck.get(key)
                if stuck is not None and abs(int(info.points_count) - stuck) < self._hnsw.min_points:
                    continue
                self._build_shard(collection, modality, min_unbuilt=self._hnsw.min_points)

    def build_graphs(self, collection: str | None = None) -> int:
        """Build the graphs of every shard of ``collection`` (default: the alias's) that has points
        outside one, out of process as the builder does, blocking the caller only; searches and
        writes go on. Returns how many shards were rebuilt."""
        collection = collection or self._current()
        return sum(self._build_shard(collection, modality) for modality in self._partitions(collection))

    def _build_shard(self, collection: str, modality: str, min_unbuilt: int = 1) -> bool:
        """Build the graph of a shard that has at least ``min_unbuilt`` points outside one (checked
        again once this build's turn has come); False if not. One build at a time: the background
        builder and :meth:`build_graphs` would otherwise share the shard's copy."""
        with self._build_lock:
            if self._stopping.is_set():
                raise _BuildCancelled
            with self._swap.read():
                shard = self._shard(collection, modality)
                info = shard.info() if shard is not None else None
            if info is None or int(info.points_count) - int(info.indexed_vectors_count) < max(1, min_unbuilt):
                return False
            self._rebuild_shard(collection, modality)
            return True

    def _rebuild_shard(self, collection: str, modality: str) -> None:
        """Copy the shard, optimise the copy in a child process, replay the writes made meanwhile, swap."""
        key = (collection, modality)
        folder = self._root / "shards" / collection
        path, work, retired = (
            folder / modality,
            folder / f".{modality}.building",
            folder / f".{modality}.retired",
        )
        started = time.monotonic()
        built = None
        with self._lock:  # writes to this shard wait for the copy (about 1 s per 250k 48-d points)
            shard = self._shard(collection, modality)
            if shard is None:
                return
            shard.flush()
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(path, work)
            self._journal[key] = []
            self._first_unbuilt.pop(key, None)
            params = self._build_params(collection)
        try:
            self._run_build_child(work, params)
            with self._lock:  # the writes made during the build, into the built copy
                replay, self._journal[key] = self._journal[key], []
            built = self._qe.EdgeShard.load(str(work), _edge_config(self._qe, params))
            for operation in replay:
                built.update(operation)
            with self._swap.write(), self._lock:  # searches wait from here to the end (~0.2 s)
                for operation in self._journal.pop(key):
                    built.update(operation)
                built.flush()
                info = built.info()
                built.close()
                built = None
                if not self._meta_path(collection).is_file():  # dropped meanwhile
                    shutil.rmtree(work, ignore_errors=True)
                    return
                old = self._shards.pop(key, None)
                if old is not None:
                    old.close()
                shutil.rmtree(retired, ignore_errors=True)
                os.rename(path, retired)
                os.rename(work, path)
                fsync_dir(folder)
                # a failed load leaves the shard to be loaded again by the next call
                self._shard(collection, modality)
            shutil.rmtree(retired, ignore_errors=True)
        except BaseException:
            with self._lock:
                self._journal.pop(key, None)
                self._first_unbuilt.setdefault(key, started)
                if built is not None:
                    built.close()
                if not path.is_dir() and retired.is_dir():  # failed between the two renames
                    os.rename(retired, path)
            shutil.rmtree(work, ignore_errors=True)
            raise
        unbuilt = int(info.points_count) - int(info.indexed_vectors_count)
        if unbuilt >= self._hnsw.min_points > 0:
            self._stuck[key] = int(info.points_count)
            logger.warning(
                "HNSW build of %s/%s left %d points outside a graph", collection, modality, unbuilt
            )
        else:
            self._stuck.pop(key, None)
        logger.info(
            "built the HNSW graph of %s/%s: %d of %d points in graphs, %.1f s (%d writes replayed)",
            collection,
            modality,
            int(info.indexed_vectors_count),
            int(info.points_count),
            time.monotonic() - started,
            len(replay),
        )

    def _run_build_child(self, work: Path, params: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        child = subprocess.Popen(
            [sys.executable, "-c", _BUILD_CHILD, str(work), json.dumps(params)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        while True:
            try:
                output, _ = child.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self._stopping.is_set():
                    child.kill()
                    child.communicate()
                    raise _BuildCancelled from None
        if child.returncode:
            raise BackendUnavailable(
                f"building the HNSW graph of {work.parent.name}/{work.name} failed "
                f"(exit {child.returncode}): {output.strip()[-2000:]}"
            )

    @override
    def close(self) -> None:
        self._stopping.set()
        if self._builder is not None:
            self._builder.join(timeout=30)
            self._builder = None
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


class _ReadWriteLock:
    """Many readers (searches) or one writer (a shard swap); a waiting writer holds off new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._writing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _edge_config(qe: Any, params: dict[str, Any]) -> Any:
    """The engine's shard configuration for :meth:`EdgeIndex._build_params`."""
    quantization = None
    if params["int8"]:
        quantization = qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=QUANTILE, always_ram=True)
    optimizers = None
    if params["indexing_threshold_kb"] is not None:
        optimizers = qe.EdgeOptimizersConfig(indexing_threshold=int(params["indexing_threshold_kb"]))
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(
            size=int(params["dim"]), distance=qe.Distance.Euclid, quantization_config=quantization
        ),
        hnsw_config=qe.HnswIndexConfig(
            m=int(params["m"]),
            ef_construct=int(params["ef_construct"]),
            full_scan_threshold=int(params["full_scan_threshold_kb"]),
        ),
        optimizers=optimizers,
    )


def build_graphs_child(argv: Sequence[str]) -> None:
    """The build child: ``argv`` = shard copy, JSON of its parameters. Optimises it, at low priority."""
    import qdrant_edge as qe

    path, params = argv[0], json.loads(argv[1])
    os.nice(10)  # searches in the owner come first
    shard = qe.EdgeShard.load(path, _edge_config(qe, params))
    shard.optimize()
    shard.flush()
    shard.close()


def _recover_swaps(shards: Path) -> None:
    """Finish or undo a shard swap a crash cut short: a built copy that was not swapped in is dropped;
    a retired shard is dropped once its successor is in place, else it is put back."""
    for folder in (p for p in shards.iterdir() if p.is_dir()):
        for leftover in folder.glob(".*.building"):
            shutil.rmtree(leftover, ignore_errors=True)
        for retired in folder.glob(".*.retired"):
            live = folder / retired.name[1 : -len(".retired")]
            if live.is_dir():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.rename(retired, live)
                logger.warning("restored shard %s after an interrupted graph swap", live)


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
