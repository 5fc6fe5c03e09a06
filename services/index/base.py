"""What every vector store offers the services: points, hits, and the :class:`VectorIndex` interface.

Collections are versioned (``<alias>--<model version>``) and reached through an alias, so a reindex
fills a new collection and then switches the alias atomically. Distances are Euclidean.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.core.errors import ConfigError
from services.core.vocabulary import MODALITIES

# Payload keys with a keyword index in every collection.
INDEXED_FIELDS = ("modality", "sop_instance_uid", "study_instance_uid")


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
class IndexPoint:
    """One vector and its PHI-free payload, under a deterministic point ID."""

    point_id: str
    vector: Sequence[float]
    payload: dict[str, Any]


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
        """Insert or replace ``points`` in ``collection`` (default: the alias's collection)."""

    @abstractmethod
    def search(
        self,
        vector: Sequence[float],
        k: int,
        modalities: Sequence[str] = (),
        exclude_study: str | None = None,
    ) -> list[SearchHit]:
        """The ``k`` nearest points, ascending distance, optionally within ``modalities``."""

    @abstractmethod
    def find_sop(self, sop_instance_uid: str) -> tuple[list[float], dict[str, Any]]:
        """The vector and payload of an indexed instance; raises NotFound."""

    @abstractmethod
    def counts_by_modality(self) -> dict[str, int]:
        """Points per modality in the alias's collection (modalities without points left out)."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release files, locks and connections."""


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
