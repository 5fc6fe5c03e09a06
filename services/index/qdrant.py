"""A Qdrant server through qdrant-client (``QDRANT_URL``), or qdrant-client's local mode for a path.

Local mode is pure-Python brute force, kept for comparison and small set-ups. Failures are
classified by what the backend answered (HTTP status), never by the text of a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import override

from services.core.errors import BackendUnavailable, CbmirError, ConfigError, InvalidInput, NotFound
from services.core.vocabulary import MODALITIES
from services.index.base import (
    INDEXED_FIELDS,
    OVERSAMPLING,
    QUANTILE,
    REINDEX_TARGET_TTL_S,
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

T = TypeVar("T")


class QdrantServerIndex(VectorIndex):
    """A Qdrant server through qdrant-client (``QDRANT_URL``), or qdrant-client's local path mode."""

    def __init__(
        self,
        alias: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        path: Path | None = None,
        quantization: str = "none",
        shards: int = 1,
        replicas: int = 1,
        hnsw: HnswParams | None = None,
    ):
        from qdrant_client import QdrantClient, models

        self._models = models
        self._alias = alias
        self._quantization = quantization
        # the server builds its HNSW graphs itself (its own indexing threshold); m, ef_construct and
        # the search-time ef come from the settings
        self._hnsw = hnsw or HnswParams()
        self._layout = {} if url is None else {"shard_number": shards, "replication_factor": replicas}
        self._next_cached: str | None = None
        self._current_cached: str | None = None
        self._next_checked_at = -1e9
        self._local = url is None
        try:
            if url:
                self._client = QdrantClient(url=url, api_key=api_key, timeout=10)
            else:
                self._client = QdrantClient(path=str(path))
        except Exception as exc:
            raise BackendUnavailable(f"cannot open Qdrant ({url or path}): {exc}") from exc

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except CbmirError:
            raise
        except Exception as exc:
            raise classify_qdrant_error(exc) from exc

    def _aliases(self) -> dict[str, str]:
        return {
            item.alias_name: item.collection_name for item in self._call(self._client.get_aliases).aliases
        }

    def _alias_target(self) -> str | None:
        return self._aliases().get(self._alias)

    @property
    def _next_alias(self) -> str:
        return f"{self._alias}--reindex"

    def _live_targets(self) -> tuple[str | None, str | None]:
        """(the alias's collection, a reindex's), read from the server at most every
        REINDEX_TARGET_TTL_S per process: live writes ask for every batch."""
        now = time.monotonic()
        if now - self._next_checked_at > REINDEX_TARGET_TTL_S:
            aliases = self._aliases()
            self._current_cached = aliases.get(self._alias)
            self._next_cached = aliases.get(self._next_alias)
            self._next_checked_at = now
        return self._current_cached, self._next_cached

    @override
    def reindex_target(self) -> str | None:
        return self._live_targets()[1]

    @override
    def set_reindex_target(self, collection: str | None) -> None:
        models = self._models
        ops: list[Any] = []
        if self._aliases().get(self._next_alias) is not None:
            ops.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._next_alias))
            )
        if collection is not None:
            ops.append(
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=collection, alias_name=self._next_alias)
                )
            )
        if ops:
            self._call(self._client.update_collection_aliases, ops)
        self._next_checked_at = -1e9

    @override
    def drop_collection(self, collection: str) -> None:
        aliases = self._aliases()
        check_droppable(collection, self._alias, aliases.get(self._alias), aliases.get(self._next_alias))
        self._call(self._client.delete_collection, collection)
        logger.info("dropped collection %s", collection)

    @override
    def current_collection(self) -> str | None:
        return self._alias_target()

    def _read_target(self) -> str:
        """The alias to read or write. A server answers 404 for a missing one (NotFound by status);
        local mode raises a plain ValueError, so there the alias is checked first."""
        if self._local and self._alias_target() is None:
            raise NotFound("the index is empty: no collection has been created yet")
        return self._alias

    @override
    def create_collection(self, collection: str, dim: int) -> None:
        models = self._models
        if not self._call(self._client.collection_exists, collection):
            self._call(
                self._client.create_collection,
                collection,
                vectors_config=models.VectorParams(size=dim, distance=models.Distance.EUCLID),
                hnsw_config=models.HnswConfigDiff(
                    m=self._hnsw.m,
                    ef_construct=self._hnsw.ef_construct,
                    full_scan_threshold=self._hnsw.full_scan_kb(dim),
                ),
                **self._layout,
                quantization_config=(
                    models.ScalarQuantization(
                        scalar=models.ScalarQuantizationConfig(
                            type=models.ScalarType.INT8, quantile=QUANTILE, always_ram=True
                        )
                    )
                    if self._quantization == "int8"
                    else None
                ),
            )
            for field in INDEXED_FIELDS:
                self._call(
                    self._client.create_payload_index, collection, field, models.PayloadSchemaType.KEYWORD
                )

    @override
    def switch_alias(self, collection: str) -> None:
        """One atomic alias update; a reindex that built ``collection`` is over in the same update."""
        models = self._models
        ops: list[Any] = []
        aliases = self._aliases()
        if aliases.get(self._next_alias) == collection:
            ops.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._next_alias))
            )
        if aliases.get(self._alias) is not None:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self._alias)))
        ops.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=self._alias)
            )
        )
        self._call(self._client.update_collection_aliases, ops)
        self._next_checked_at = -1e9  # this process sees its own switch at once

    @override
    def ensure_collection(self, dim: int, model_version: str) -> str:
        current = self._alias_target()
        if current is None:
            current = collection_name(self._alias, model_version)
            self.create_collection(current, dim)
            self.switch_alias(current)
        info = self._call(self._client.get_collection, current)
        vectors = info.config.params.vectors
        size = vectors.size if isinstance(vectors, self._models.VectorParams) else None
        if size != dim:
            raise ConfigError(
                f"collection {current} holds {size}-value vectors but the model makes {dim}: reindex"
            )
        return current

    @override
    def upsert(self, points: Sequence[IndexPoint], collection: str | None = None) -> None:
        if not points:
            return
        if collection is None:
            current, target = self._live_targets()
            if current is None:
                self._next_checked_at = -1e9  # created since the last look?
                current, target = self._live_targets()
            if current is None:
                raise NotFound("the index is empty: no collection has been created yet")
            for name in dual_write_targets(current, target, self._alias, points):
                self.upsert(points, name)
            return
        models = self._models
        self._call(
            self._client.upsert,
            collection,
            points=[
                models.PointStruct(id=p.point_id, vector=[float(x) for x in p.vector], payload=p.payload)
                for p in points
            ],
            wait=True,
        )

    def _filter(self, where: HitFilter) -> Any:
        models = self._models
        must: list[Any] = [
            models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in where.requirements()
        ]
        must_not: list[Any] = [
            models.FieldCondition(key=key, match=models.MatchValue(value=value))
            for key, value in where.exclusions()
        ]
        values = modality_filter_values(where.modalities)
        if values:
            must.append(models.FieldCondition(key="modality", match=models.MatchAny(any=values)))
        if not must and not must_not:
            return None
        return models.Filter(must=must or None, must_not=must_not or None)

    @override
    def search(self, vector: Sequence[float], k: int, where: HitFilter | None = None) -> list[SearchHit]:
        response = self._call(
            self._client.query_points,
            self._read_target(),
            query=[float(x) for x in vector],
            query_filter=self._filter(where or HitFilter()),
            limit=int(k),
            with_payload=True,
            # ignored by a collection without quantisation
            search_params=self._models.SearchParams(
                hnsw_ef=self._hnsw.ef,
                quantization=self._models.QuantizationSearchParams(rescore=True, oversampling=OVERSAMPLING),
            ),
        )
        return [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]

    @override
    def find_sop(
        self, sop_instance_uid: str, likely_modalities: Sequence[str] = ()
    ) -> tuple[list[float], dict[str, Any]]:
        target = self._read_target()  # one collection: the hint has nothing to order
        records = self._call(
            self._client.retrieve, target, [point_id(sop_instance_uid)], with_payload=True, with_vectors=True
        )
        if not records:
            models = self._models
            flt = models.Filter(
                must=[
                    models.FieldCondition(
                        key="sop_instance_uid", match=models.MatchValue(value=sop_instance_uid)
                    )
                ]
            )
            records, _ = self._call(
                self._client.scroll, target, scroll_filter=flt, limit=1, with_payload=True, with_vectors=True
            )
        if not records:
            raise NotFound(f"SOP Instance UID {sop_instance_uid} is not indexed")
        return as_vector(records[0].vector), dict(records[0].payload or {})

    @override
    def counts_by_modality(self) -> dict[str, int]:
        models = self._models
        if self._alias_target() is None:
            return {}
        counts = {}
        for modality in MODALITIES:
            flt = models.Filter(
                must=[models.FieldCondition(key="modality", match=models.MatchValue(value=modality))]
            )
            n = self._call(self._client.count, self._alias, count_filter=flt, exact=True).count
            if n:
                counts[modality] = int(n)
        return counts

    @override
    def collections(self) -> list[str]:
        prefix = f"{self._alias}--"
        names = [c.name for c in self._call(self._client.get_collections).collections]
        return sorted(name for name in names if name.startswith(prefix))

    @override
    def scroll(
        self, collection: str | None = None, *, field: str | None = None, value: str | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        models = self._models
        target = collection or self._read_target()
        flt = None
        if field is not None:
            flt = models.Filter(must=[models.FieldCondition(key=field, match=models.MatchValue(value=value))])
        offset = None
        while True:
            records, offset = self._call(
                self._client.scroll,
                target,
                scroll_filter=flt,
                limit=1024,
                offset=offset,
                with_payload=True,
                with_vectors=False,
            )
            for record in records:
                yield str(record.id), dict(record.payload or {})
            if offset is None or not records:
                return

    @override
    def delete_points(self, point_ids: Sequence[str], collection: str | None = None) -> None:
        if not point_ids:
            return
        models = self._models
        self._call(
            self._client.delete,
            collection or self._read_target(),
            points_selector=models.PointIdsList(points=list(point_ids)),
            wait=True,
        )

    @override
    def close(self) -> None:
        self._client.close()


# HTTP statuses of a Qdrant server and what they mean for the caller.
_STATUS_ERRORS: dict[int, type[CbmirError]] = {
    400: InvalidInput,  # malformed request, e.g. a vector of the wrong dimension
    401: ConfigError,  # QDRANT_API_KEY missing or wrong
    403: ConfigError,
    404: NotFound,  # no such collection, alias or point
    409: ConfigError,  # already exists in another shape
    422: InvalidInput,
}


def classify_qdrant_error(exc: Exception) -> CbmirError:
    """A qdrant-client failure as a cbmir error, by the status the server answered.

    No answer at all (connection refused, timeout, a 5xx, 408 or 429) is :class:`BackendUnavailable`:
    retrying may help. Known 4xx statuses map through :data:`_STATUS_ERRORS`; an unknown 4xx is a
    :class:`ConfigError`. Anything without a status (e.g. local mode's own errors) is treated as
    unavailable, so callers retry rather than give up on an instance.
    """
    from qdrant_client.http.exceptions import UnexpectedResponse

    detail = f"{type(exc).__name__}: {str(exc)[:300]}"
    if isinstance(exc, UnexpectedResponse) and exc.status_code is not None:
        status = exc.status_code
        if status in _STATUS_ERRORS:
            return _STATUS_ERRORS[status](f"Qdrant answered {status}: {detail}")
        if 400 <= status < 500 and status not in (408, 429):
            return ConfigError(f"Qdrant answered {status}: {detail}")
        return BackendUnavailable(f"Qdrant answered {status}: {detail}")
    return BackendUnavailable(f"Qdrant call failed: {detail}")
