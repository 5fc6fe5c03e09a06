"""A Qdrant server through qdrant-client (``QDRANT_URL``), or qdrant-client's local mode for a path.

Local mode is pure-Python brute force, kept for comparison and small set-ups. Failures are
classified by what the backend answered (HTTP status), never by the text of a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import override

from services.core.errors import BackendUnavailable, CbmirError, ConfigError, InvalidInput, NotFound
from services.core.vocabulary import MODALITIES
from services.index.base import (
    INDEXED_FIELDS,
    IndexPoint,
    SearchHit,
    VectorIndex,
    as_vector,
    collection_name,
    modality_filter_values,
    point_id,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class QdrantServerIndex(VectorIndex):
    """A Qdrant server through qdrant-client (``QDRANT_URL``), or qdrant-client's local path mode."""

    def __init__(
        self, alias: str, *, url: str | None = None, api_key: str | None = None, path: Path | None = None
    ):
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

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except CbmirError:
            raise
        except Exception as exc:
            raise classify_qdrant_error(exc) from exc

    def _alias_target(self) -> str | None:
        for item in self._call(self._client.get_aliases).aliases:
            if item.alias_name == self._alias:
                return item.collection_name
        return None

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
            )
            for field in INDEXED_FIELDS:
                self._call(
                    self._client.create_payload_index, collection, field, models.PayloadSchemaType.KEYWORD
                )

    @override
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
        models = self._models
        self._call(
            self._client.upsert,
            collection or self._read_target(),
            points=[
                models.PointStruct(id=p.point_id, vector=[float(x) for x in p.vector], payload=p.payload)
                for p in points
            ],
            wait=True,
        )

    def _filter(self, modalities: Sequence[str], exclude_study: str | None) -> Any:
        models = self._models
        must: list[Any] = []
        must_not: list[Any] = []
        values = modality_filter_values(modalities)
        if values:
            must.append(models.FieldCondition(key="modality", match=models.MatchAny(any=values)))
        if exclude_study:
            must_not.append(
                models.FieldCondition(key="study_instance_uid", match=models.MatchValue(value=exclude_study))
            )
        if not must and not must_not:
            return None
        return models.Filter(must=must or None, must_not=must_not or None)

    @override
    def search(
        self,
        vector: Sequence[float],
        k: int,
        modalities: Sequence[str] = (),
        exclude_study: str | None = None,
    ) -> list[SearchHit]:
        response = self._call(
            self._client.query_points,
            self._read_target(),
            query=[float(x) for x in vector],
            query_filter=self._filter(modalities, exclude_study),
            limit=int(k),
            with_payload=True,
        )
        return [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]

    @override
    def find_sop(self, sop_instance_uid: str) -> tuple[list[float], dict[str, Any]]:
        target = self._read_target()
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
