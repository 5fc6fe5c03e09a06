"""What every vector store offers the services: points, hits, and the :class:`VectorIndex` interface.

Collections are versioned (``<alias>--<model version>``) and reached through an alias, so a reindex
fills a new collection and then switches the alias atomically. Distances are Euclidean.
"""

from __future__ import annotations

import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import ConfigError
from services.core.vocabulary import CLINICAL, LIBRARY, MODALITIES

# Payload keys with a keyword index in every collection.
INDEXED_FIELDS = (
    "modality",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "patient_key",
    "source",
)
# The payload ``source`` of a reference-library point is LIBRARY; a point without one is CLINICAL.
# Scalar quantisation: int8 codes searched first, then the best OVERSAMPLING x k candidates rescored
# with the full float32 vectors, so the order of the answer is exact among the candidates.
QUANTILE = 0.99
OVERSAMPLING = 2.0

# How stale a writer's view of "is a reindex building a new collection?" may be (server mode
# caches it per process); a reindex waits this long after naming its target before it starts.
REINDEX_TARGET_TTL_S = 2.0

# Payload keys an administrator may select points by (erasure): each is a keyword index.
SELECTABLE_FIELDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "patient_key")


def point_id(sop_instance_uid: str, frame_number: int | None = None) -> str:
    """Deterministic point ID: uuid5 (OID namespace) of the SOP Instance UID, plus ``/frame`` for
    the extra frames of a multi-frame object embedded frame by frame."""
    key = sop_instance_uid if not frame_number else f"{sop_instance_uid}/{frame_number}"
    return str(uuid.uuid5(uuid.NAMESPACE_OID, key))


def collection_name(alias: str, model_version: str) -> str:
    """The versioned collection name for an alias and a model version."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_version)
    return f"{alias}--{safe}"


@dataclass(frozen=True)
class HnswParams:
    """HNSW graphs: ``m`` edges per node, ``ef_construct`` candidates per insertion, ``ef`` candidates
    per search. The embedded index's owner builds a modality's graph in the background (out of
    process) once ``min_points`` of its points are outside any graph (0: never) and its writes have
    paused for ``debounce_s`` (or 30 x that long has passed since the first unbuilt write).
    The defaults come from ``benchmarks/search.py --million`` (the shipped model's real embeddings
    plus jittered copies, 1M points): with m=16 recall@10 stayed at 0.87-0.92 for ef 32-128 (the
    near-duplicates of an archive defeat a sparse graph); m=48, ef_construct=300 reach >= 0.99 at
    ef=128.
    A search scans a segment of fewer than ``full_scan_points`` vectors (or a filter's matches, when
    fewer) exactly instead of walking its graph. Qdrant counts this in KB (10,000 by default: 53,333
    vectors at 48 dimensions, so a 32k-point shard with a graph was scanned on every search);
    a scan costs about 0.05 ms per 1,000 48-d vectors here, so 10,000 points cost about a graph
    search. Graphs built before keep the threshold they were built with."""

    m: int = 48
    ef_construct: int = 300
    ef: int = 128
    min_points: int = 20000
    debounce_s: float = 10.0
    full_scan_points: int = 10000

    def full_scan_kb(self, dim: int) -> int:
        """``full_scan_points`` as the engine counts it: KB of float32 vectors of ``dim``."""
        return max(1, math.ceil(self.full_scan_points * dim * 4 / 1024))


@dataclass(frozen=True)
class IndexPoint:
    """One vector and its PHI-free payload, under a deterministic point ID."""

    point_id: str
    vector: Sequence[float]
    payload: dict[str, Any]


@dataclass(frozen=True)
class HitFilter:
    """Which points a search may return: within ``modalities`` (empty: all), from ``source``
    (``library``, ``clinical`` or None for both), and none of the excluded study, instances or
    patient (the keyed patient reference)."""

    modalities: Sequence[str] = ()
    exclude_study: str | None = None
    exclude_sops: Sequence[str] = ()
    exclude_patient: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.source not in (None, LIBRARY, CLINICAL):
            raise ConfigError(f"source must be {LIBRARY} or {CLINICAL}, got {self.source!r}")

    def exclusions(self) -> list[tuple[str, str]]:
        """(payload key, value) pairs no hit may have."""
        pairs = [("sop_instance_uid", uid) for uid in self.exclude_sops if uid]
        if self.exclude_study:
            pairs.append(("study_instance_uid", self.exclude_study))
        if self.exclude_patient:
            pairs.append(("patient_key", self.exclude_patient))
        if self.source == CLINICAL:
            pairs.append(("source", LIBRARY))
        return pairs

    def requirements(self) -> list[tuple[str, str]]:
        """(payload key, value) pairs every hit must have (besides the modality)."""
        return [("source", LIBRARY)] if self.source == LIBRARY else []


@dataclass(frozen=True)
class SearchHit:
    """A point found by a search, with its Euclidean distance to the query."""

    point_id: str
    distance: float
    payload: dict[str, Any]


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
    def current_collection(self) -> str | None:
        """The collection the alias points at, or None before the first one exists."""

    @abstractmethod
    def upsert(self, points: Sequence[IndexPoint], collection: str | None = None) -> None:
        """Insert or replace ``points`` in ``collection``. Without one it is a live write: into the
        alias's collection and, while a reindex builds one (:meth:`reindex_target`), into that one
        too when the points' model made it (:func:`dual_write_targets`)."""

    @abstractmethod
    def search(self, vector: Sequence[float], k: int, where: HitFilter | None = None) -> list[SearchHit]:
        """The ``k`` nearest points that ``where`` admits, ascending distance."""

    @abstractmethod
    def find_sop(
        self, sop_instance_uid: str, likely_modalities: Sequence[str] = ()
    ) -> tuple[list[float], dict[str, Any]]:
        """The vector and payload of an indexed instance; raises NotFound. ``likely_modalities``
        (a hint, e.g. a search's filter) are looked in first where the store is split by modality."""

    @abstractmethod
    def counts_by_modality(self) -> dict[str, int]:
        """Points per modality in the alias's collection (modalities without points left out)."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Every collection of this alias (``<alias>--...``): the current one, a reindex's new one,
        old ones not dropped yet."""

    @abstractmethod
    def scroll(
        self, collection: str | None = None, *, field: str | None = None, value: str | None = None
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(point ID, payload) of every point of ``collection`` (default: the alias's), or of those
        whose payload ``field`` equals ``value``; no vectors."""

    @abstractmethod
    def delete_points(self, point_ids: Sequence[str], collection: str | None = None) -> None:
        """Delete these points from ``collection`` (default: the alias's); unknown IDs are ignored."""

    @abstractmethod
    def reindex_target(self) -> str | None:
        """The collection a reindex is building (live writes go there too), or None."""

    @abstractmethod
    def set_reindex_target(self, collection: str | None) -> None:
        """Name (or, with None, forget) the collection a reindex builds."""

    @abstractmethod
    def drop_collection(self, collection: str) -> None:
        """Delete a collection that neither the alias nor a reindex uses (ConfigError otherwise)."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release files, locks and connections."""


def belongs_to_model(collection: str, alias: str, model_version: str) -> bool:
    """Whether ``collection`` holds vectors of ``model_version`` (``<alias>--<version>[--<time>]``)."""
    prefix = collection_name(alias, model_version)
    return collection == prefix or collection.startswith(prefix + "--")


def dual_write_targets(
    current: str, target: str | None, alias: str, points: Sequence[IndexPoint]
) -> list[str]:
    """Where a live write goes: the alias's collection, plus a reindex's new collection when it
    belongs to the points' model (``<alias>--<model version>``, optionally ``--<time>``). Points of
    another model are not written into a reindex's collection (the reindex embeds their objects
    itself), and never into the alias's: after a reindex to a new model, a writer still running the
    old one gets ConfigError (workers retry it) until it runs the new model."""
    versions = {str(p.payload.get("model_version", "")) for p in points}
    version = versions.pop() if len(versions) == 1 else ""
    if not version:
        return [current] if not target or target == current else [current, target]

    if current.startswith(f"{alias}--") and not belongs_to_model(current, alias, version):
        raise ConfigError(
            f"the index ({current}) holds vectors of another model than this writer's {version}: "
            "run the model the index was built with, or reindex"
        )
    targets = [current]
    if target and target != current and belongs_to_model(target, alias, version):
        targets.append(target)
    return targets


def check_droppable(collection: str, alias: str, current: str | None, target: str | None) -> None:
    """ConfigError unless ``collection`` belongs to ``alias`` and is neither in use nor being built."""
    if not collection.startswith(f"{alias}--"):
        raise ConfigError(f"{collection} is not a collection of {alias}")
    if collection in (current, target):
        raise ConfigError(f"{collection} is in use (the alias or a reindex points at it)")


def modality_filter_values(modalities: Sequence[str]) -> list[str]:
    """The distinct, known modalities of a filter, sorted; unknown names are a configuration error."""
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ConfigError(f"unknown modalities {unknown}")
    return sorted(set(modalities))


def as_vector(vector: Any) -> list[float]:
    """A stored vector as a list of floats (named vectors: the default, unnamed one)."""
    if isinstance(vector, dict):
        vector = next(iter(vector.values()))
    return [float(x) for x in vector]
