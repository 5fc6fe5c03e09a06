"""The vector index: one interface (:class:`VectorIndex`), several ways to reach Qdrant.

* :class:`EdgeIndex` (``edge.py``): the embedded default, Qdrant's Rust engine in-process
  (``qdrant-edge-py``), one shard per modality. One process owns it (the query service).
* :class:`QdrantServerIndex` (``qdrant.py``): a Qdrant server (``QDRANT_URL``), or qdrant-client's
  local mode for a path.
* :class:`RemoteIndexWriter` (``writer.py``): what workers use in the embedded default; upserts
  travel over gRPC to the process that owns the :class:`EdgeIndex`.
* ``points.py``: the one definition of a point's payload, shared by workers and reindex.

:func:`open_index` picks the backend from the settings; callers reach the stores through this
package, not through the backend modules.
"""

from __future__ import annotations

from services.core.config import IndexSettings
from services.index.base import (
    CLINICAL,
    INDEXED_FIELDS,
    LIBRARY,
    HitFilter,
    HnswParams,
    IndexPoint,
    SearchHit,
    VectorIndex,
    collection_name,
    point_id,
)
from services.index.edge import EdgeIndex
from services.index.qdrant import QdrantServerIndex
from services.index.writer import RemoteIndexWriter

__all__ = [
    "CLINICAL",
    "INDEXED_FIELDS",
    "LIBRARY",
    "EdgeIndex",
    "HitFilter",
    "HnswParams",
    "IndexPoint",
    "QdrantServerIndex",
    "RemoteIndexWriter",
    "SearchHit",
    "VectorIndex",
    "collection_name",
    "open_index",
    "point_id",
]


def open_index(settings: IndexSettings) -> VectorIndex:
    """The index for the settings: the Qdrant server at ``QDRANT_URL``, else the embedded store, whose
    owner builds HNSW graphs in the background (:meth:`EdgeIndex.start_graph_builder`)."""
    hnsw = HnswParams(
        m=settings.hnsw_m,
        ef_construct=settings.hnsw_ef_construct,
        ef=settings.hnsw_ef,
        min_points=settings.hnsw_min_points,
        debounce_s=settings.hnsw_debounce_s,
        full_scan_points=settings.hnsw_full_scan_points,
    )
    if settings.qdrant_url:
        return QdrantServerIndex(
            settings.collection,
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key,
            quantization=settings.quantization,
            shards=settings.qdrant_shards,
            replicas=settings.qdrant_replicas,
            hnsw=hnsw,
        )
    index = EdgeIndex(
        settings.embedded_path, settings.collection, quantization=settings.quantization, hnsw=hnsw
    )
    index.start_graph_builder()
    return index
