"""The pluggable ranking step of evaluation, and its offline numpy implementation.

A :class:`Retriever` is anything with::

    index(items: Sequence[Record]) -> None
        # make these database items searchable (replaces any previous database)
    search(item: Record, k: int) -> list[str]
        # keys (Record.key, i.e. the manifest path) of the k nearest database items, best first.
        # The query's own key is never returned, even when the query is also a database item.

and optionally ``search_many(items, k) -> list[list[str]]`` (same result, batched). Items are
:class:`models.data.Record` (``key``, absolute ``path``, ``modality``, ``label``, ``split``).
The offline :class:`NumpyRetriever` embeds each picture with ``models.data.load_picture`` ->
``models.preprocess.to_model_input`` -> ``OnnxEncoder.embed`` (the encoder and contract of the
picture's modality, when the model is an :class:`~models.runtime.EncoderSet` with one encoder per
modality) and ranks the whole database (no modality filter) by exact Euclidean distance computed in
float64, ties broken by database order (the order given to ``index``). With several encoders, a
query is ranked only against the database items its own encoder embedded, since distances across
encoders mean nothing (the service does the same). A service-backed retriever (ingest + gRPC
search) must index the same pictures with the same encoders and search without filters to give the
same numbers; float32 distance arithmetic in a vector store may swap exact near-ties.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from models.data import Record, load_picture
from models.preprocess import to_model_input

if TYPE_CHECKING:
    from models.runtime import EncoderSet, OnnxEncoder

logger = logging.getLogger(__name__)


@runtime_checkable
class Retriever(Protocol):
    def index(self, items: Sequence[Record]) -> None: ...

    def search(self, item: Record, k: int) -> list[str]: ...


def rank_euclidean(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    exclude: Sequence[int | None] | None = None,
    block: int = 256,
) -> np.ndarray:
    """Indices ``(Q, min(k, N'))`` of the k nearest database rows per query (float64, stable).

    ``exclude[q]`` is a database index never returned for query q (the query itself), or None.
    """
    db = np.asarray(database, dtype=np.float64)
    qs = np.asarray(queries, dtype=np.float64)
    db_sq = np.einsum("ij,ij->i", db, db)
    depth = min(k, len(db) - (1 if exclude is not None and any(e is not None for e in exclude) else 0))
    depth = max(depth, 0)
    out = np.empty((len(qs), depth), dtype=np.int64)
    for start in range(0, len(qs), block):
        chunk = qs[start : start + block]
        dist = db_sq[None, :] - 2.0 * chunk @ db.T + np.einsum("ij,ij->i", chunk, chunk)[:, None]
        np.maximum(dist, 0.0, out=dist)
        if exclude is not None:
            for row, q in enumerate(range(start, start + len(chunk))):
                if exclude[q] is not None:
                    dist[row, exclude[q]] = np.inf
        order = np.argsort(dist, axis=1, kind="stable")[:, :depth]
        out[start : start + len(chunk)] = order
    return out


class NumpyRetriever:
    """Offline brute-force retriever over ONNX embeddings (see module docstring)."""

    def __init__(self, encoder: OnnxEncoder | EncoderSet, batch_size: int = 64, progress: bool = False):
        from models.runtime import EncoderSet

        self.encoder = encoder if isinstance(encoder, EncoderSet) else EncoderSet(encoder)
        self.batch_size = batch_size
        self.progress = progress
        self.keys: list[str] = []
        self.modalities: list[str] = []
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        self._position: dict[str, int] = {}

    def embed_items(self, items: Sequence[Record]) -> np.ndarray:
        """Embeddings ``(N, dim)`` of items' pictures through the shared preprocessing."""
        out = np.empty((len(items), self.encoder.dim), dtype=np.float32)
        starts: Iterable[int] = range(0, len(items), self.batch_size)
        if self.progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="embed", unit="batch", leave=False)
        for start in starts:
            chunk = items[start : start + self.batch_size]
            rows = [
                to_model_input(
                    load_picture(it.path, it.modality, eeg_render=self.encoder.eeg_render),
                    self.encoder.for_modality(it.modality).contract,
                )[None]
                for it in chunk
            ]
            vectors = self.encoder.embed_each(rows, [it.modality for it in chunk])
            out[start : start + len(chunk)] = np.concatenate(vectors)
        return out

    def index_embeddings(
        self, keys: Sequence[str], embeddings: np.ndarray, modalities: Sequence[str] | None = None
    ) -> None:
        """Make these embeddings the database (``modalities``: one per key, needed with several encoders)."""
        if len(set(keys)) != len(keys):
            raise ValueError("database keys must be unique")
        self.modalities = list(modalities) if modalities is not None else []
        self.keys = list(keys)
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self._position = {key: i for i, key in enumerate(self.keys)}

    def index(self, items: Sequence[Record]) -> None:
        self.index_embeddings(
            [it.key for it in items], self.embed_items(items), [it.modality for it in items]
        )

    def search_embeddings(
        self, keys: Sequence[str], embeddings: np.ndarray, k: int, modalities: Sequence[str] | None = None
    ) -> list[list[str]]:
        order = self.search_indices(keys, embeddings, k, modalities)
        return [[self.keys[i] for i in row if i >= 0] for row in order]

    def search_indices(
        self, keys: Sequence[str], embeddings: np.ndarray, k: int, modalities: Sequence[str] | None = None
    ) -> np.ndarray:
        """Like :meth:`search_embeddings`, as indices into the indexed order.

        With several encoders, each query (of ``modalities``, one per query) is ranked against the
        database items of its own encoder only; a row shorter than the others ends with -1.
        """
        exclude = [self._position.get(key) for key in keys]
        if not self.encoder.routed:
            return rank_euclidean(embeddings, self.embeddings, k, exclude)
        if modalities is None or len(modalities) != len(keys) or len(self.modalities) != len(self.keys):
            raise ValueError(
                "a model with several encoders ranks within each encoder: give the queries' modalities, "
                "and index the database with index(items)"
            )
        from models.data import MODALITIES

        # any modality outside the trained ones (the service's "other") goes with the default encoder
        vocabulary = tuple(dict.fromkeys([*MODALITIES, *self.modalities, *modalities]))
        groups: dict[tuple[str, ...], list[int]] = {}
        for q, modality in enumerate(modalities):
            groups.setdefault(self.encoder.comparable(modality, vocabulary), []).append(q)
        out = np.full((len(keys), min(k, len(self.keys))), -1, dtype=np.int64)
        database_modalities = np.array(self.modalities, dtype=object)
        for allowed, members in groups.items():
            rows = np.flatnonzero(np.isin(database_modalities, list(allowed)))
            position = {int(row): j for j, row in enumerate(rows)}
            own = [None if (e := exclude[q]) is None else position.get(e) for q in members]
            order = rank_euclidean(embeddings[members], self.embeddings[rows], k, own)
            out[members, : order.shape[1]] = rows[order]
        return out

    def search_many(self, items: Sequence[Record], k: int) -> list[list[str]]:
        return self.search_embeddings(
            [it.key for it in items], self.embed_items(items), k, [it.modality for it in items]
        )

    def search(self, item: Record, k: int) -> list[str]:
        return self.search_many([item], k)[0]
