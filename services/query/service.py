"""The gRPC query service (``cbmir query``): "find similar cases".

It serves ``cbmir.v1.SimilarCases`` (SearchSimilar, GetIndexStats, RenderInstance), the standard
health service and server reflection, behind the access policy of :mod:`services.core.security`
(API tokens and roles; TLS and mTLS when configured). Every search is written to the
``cbmir.audit`` log. In the embedded default it is also the one process that owns the index, and serves
``cbmir.v1.IndexWriter`` so that workers upsert through it: never on the public port, but on
``CBMIR_INDEX_WRITER`` (a Unix socket in the data folder by default).

Errors become gRPC status codes in exactly one place, :func:`services.core.grpc_status.grpc_code_for`;
clients never see a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image
from typing_extensions import override

from models.preprocess import decode_image_bytes, to_model_input
from models.runtime import EncoderSet
from services.core import metrics
from services.core.answers import DEFAULT_K, MAX_K
from services.core.config import MetricsSettings, QuerySettings
from services.core.errors import (
    BackendUnavailable,
    CbmirError,
    ConfigError,
    InvalidInput,
    NotFound,
    Unauthenticated,
)
from services.core.grpc_status import grpc_code_for
from services.core.logs import mask_values
from services.core.processes import run_until_stopped
from services.core.security import (
    ADMIN,
    SEARCH,
    AccessPolicy,
    bearer_token,
    grpc_server_credentials,
    is_loopback,
)
from services.core.vocabulary import (
    CLINICAL,
    LIBRARY,
    MODALITIES,
    MODALITY_TO_PB,
    OTHER,
    PB_TO_MODALITY,
    PB_TO_SOURCE,
    SOURCE_TO_PB,
    is_valid_uid,
)
from services.dicom.decode import DecodeLimits, decode_for_embedding
from services.dicom.render import check_thumbnail_size, display_base, png_of
from services.grpc_gen.cbmir.v1 import (
    admin_pb2_grpc,
    index_writer_pb2,
    index_writer_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from services.index import EdgeIndex, HitFilter, IndexPoint, SearchHit, VectorIndex, open_index
from services.index.base import belongs_to_model
from services.index.points import check_point
from services.ingest.dispatch import TaskDispatcher
from services.ingest.spool import Spool, spool_name_for
from services.query.admin import IndexMaintenance, make_servicer
from services.query.reindex import ReindexJob

logger = logging.getLogger(__name__)

# group_by STUDY: the first candidate pool is this many instances per study wanted; it grows by
# POOL_GROWTH until it holds enough studies or reaches MAX_POOL instances.
POOL_PER_STUDY = 4
POOL_GROWTH = 4
MAX_POOL = 20 * MAX_K
NO_PATIENT_KEYS = (
    "exclude_same_patient is unavailable: this site has set no CBMIR_PATIENT_KEY_SECRET, "
    "so the index holds no patient references"
)
# excluded instances, studies and patients with at most this many points are dropped from a larger
# candidate list rather than filtered by the engine (see QueryEngine._nearest)
POST_FILTER_MAX = 2000
# rendered thumbnails kept in memory (by ETag), and the decoded pictures they are scaled from
THUMBNAIL_CACHE_BYTES = 32 * 1024 * 1024
BASE_CACHE_BYTES = 64 * 1024 * 1024
RENDERS_AT_ONCE = 1  # decodes for thumbnails at once, beside the query decodes

Cached = TypeVar("Cached")


class ByteBudgetCache(Generic[Cached]):
    """A thread-safe LRU map that drops its oldest entries when their sizes add up past ``budget``."""

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[str, tuple[Cached, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Cached | None:
        """The entry (now the most recent), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key: str, value: Cached, size: int) -> None:
        """Keep ``value`` under ``key``, then drop the oldest entries while over the budget."""
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.budget and len(self._items) > 1:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped


audit = logging.getLogger("cbmir.audit")

# The role each public method needs; anything not listed needs admin. Health checks need none
# (probes carry no token); reflection needs a valid caller like any other call.
SEARCH_METHOD = "/cbmir.v1.SimilarCases/SearchSimilar"
METHOD_ROLES = {
    SEARCH_METHOD: SEARCH,
    "/cbmir.v1.SimilarCases/RenderInstance": SEARCH,
    "/cbmir.v1.SimilarCases/GetCaller": SEARCH,
    "/cbmir.v1.SimilarCases/GetIndexStats": ADMIN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": SEARCH,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": SEARCH,
}
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
SEARCH_SERVICE = search_pb2.DESCRIPTOR.services_by_name["SimilarCases"].full_name
# the health service's names for this server: the whole server, and the search service
HEALTH_NAMES = ("", SEARCH_SERVICE)


Servicer = TypeVar("Servicer")
Request = TypeVar("Request")
Response = TypeVar("Response")


def _guarded(
    method: Callable[[Servicer, Request, grpc.ServicerContext], Response],
) -> Callable[[Servicer, Request, grpc.ServicerContext], Response]:
    """Run an RPC; turn any exception into a status with a one-line message, never a traceback."""

    @functools.wraps(method)
    def wrapper(self: Servicer, request: Request, context: grpc.ServicerContext) -> Response:
        try:
            return method(self, request, context)
        except CbmirError as exc:  # the message, with any quoted value masked (a second net for PHI)
            context.abort(grpc_code_for(exc), mask_values(str(exc)))
        except Exception as exc:
            logger.exception("%s failed", method.__name__)
            context.abort(grpc_code_for(exc), f"internal error ({type(exc).__name__}); see the service log")

    return wrapper


@dataclass(frozen=True)
class Query:
    """A query turned into a vector, with what the exclusions need to know about it."""

    vector: np.ndarray
    modality: str
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    patient_key: str | None = None
    indexed: bool = False  # the query is itself an indexed instance


@dataclass
class _StudyGroup:
    best: SearchHit
    matching: int = 1


class QueryEngine:
    """Turns a query (DICOM, picture, or UID) into a vector and searches the index.

    Query images are bounded before they cost memory: the picture's or DICOM frame's size is read
    from its header and refused over ``max_pixels``; at most ``decodes`` images are decoded and
    embedded at once, and a call waits for its turn only until its deadline. Thumbnails of
    archived instances are decoded within ``render_limits`` (those the workers applied) in the
    same slots.
    """

    def __init__(
        self,
        index: VectorIndex,
        encoder: EncoderSet,
        spool: Spool,
        limits: DecodeLimits,
        *,
        decodes: int = 2,
        timeout_s: float = 30.0,
        alias: str = "",
        patient_key_secret: bytes | None = None,
        render_limits: DecodeLimits | None = None,
    ):
        self.index = index
        self.alias = alias
        self.encoder = encoder
        self.spool = spool
        self.limits = limits
        self.render_limits = render_limits or limits
        self.timeout_s = timeout_s
        self.patient_key_secret = patient_key_secret
        self.collection: str | None = None
        self._lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(decodes)
        self._thumbnails: ByteBudgetCache[search_pb2.RenderedInstance] = ByteBudgetCache(
            THUMBNAIL_CACHE_BYTES
        )
        self._bases: ByteBudgetCache[Image.Image] = ByteBudgetCache(BASE_CACHE_BYTES)
        self._render_slots = threading.BoundedSemaphore(RENDERS_AT_ONCE)

    def ready_collection(self) -> str:
        """The collection, created on first use; raises BackendUnavailable while the store is down."""
        if self.collection is None:
            with self._lock:
                if self.collection is None:
                    collection = self.index.ensure_collection(self.encoder.dim, self.encoder.version)
                    if self.alias and not belongs_to_model(collection, self.alias, self.encoder.version):
                        raise ConfigError(
                            f"the index ({collection}) holds vectors of another model than this service's "
                            f"{self.encoder.version}: run the model it was built with, or reindex"
                        )
                    self.collection = collection
        return self.collection

    def _embed_image(self, image: np.ndarray, modality: str) -> np.ndarray:
        encoder = self.encoder.for_modality(modality)
        return encoder.embed(to_model_input(image, encoder.contract)[None])[0]

    @contextlib.contextmanager
    def _decode_slot(self, deadline_s: float | None) -> Iterator[None]:
        """Wait for one of the decode slots until the call's deadline (or the service's limit)."""
        wait_s = self.timeout_s if deadline_s is None else max(0.0, min(self.timeout_s, deadline_s))
        if not self._decode_slots.acquire(timeout=wait_s):
            raise BackendUnavailable(f"busy: no query image slot came free within {wait_s:.1f} s; try again")
        try:
            yield
        finally:
            self._decode_slots.release()

    def _indexed_payload(self, sop_instance_uid: str, modality: str) -> dict[str, Any] | None:
        try:
            return self.index.find_sop(sop_instance_uid, [modality])[1]
        except NotFound:
            return None

    def query_vector(
        self, request: search_pb2.SearchSimilarRequest, deadline_s: float | None = None
    ) -> Query:
        """The query's vector, modality, and identity (study, instance, patient key, indexed or not)."""
        kind = request.WhichOneof("query")
        if kind is None:
            raise InvalidInput("the request names no query: set dicom, image or sop_instance_uid")
        if kind == "dicom":
            if not request.dicom:
                raise InvalidInput("dicom is empty")
            with self._decode_slot(deadline_s):
                header, frames = decode_for_embedding(
                    bytes(request.dicom),
                    frames="middle",
                    limits=self.limits,
                    eeg_render=self.encoder.eeg_render,
                )
                vector = self._embed_image(frames[0].image, header.modality)
            # the patient is the one the index knows for this instance, never one the upload names:
            # else a caller could learn which studies belong to any Patient ID it guesses
            stored = self._indexed_payload(header.sop_instance_uid, header.modality)
            return Query(
                vector,
                header.modality,
                header.study_instance_uid,
                header.sop_instance_uid,
                stored.get("patient_key") if stored else None,
                stored is not None,
            )
        if kind == "image":
            if request.image.modality not in PB_TO_MODALITY:
                names = ", ".join(f"MODALITY_{name.upper()}" for name in MODALITIES)
                raise InvalidInput(f"image.modality must be set to one of {names}")
            if not request.image.data:
                raise InvalidInput("image.data is empty")
            with self._decode_slot(deadline_s):
                picture = decode_image_bytes(bytes(request.image.data), max_pixels=self.limits.max_pixels)
                modality = PB_TO_MODALITY[request.image.modality]
                return Query(self._embed_image(picture, modality), modality)
        uid = request.sop_instance_uid.strip()
        if not uid:
            raise InvalidInput("sop_instance_uid is empty")
        if not is_valid_uid(uid):
            raise InvalidInput("sop_instance_uid is not a DICOM UID")
        # the filter's modalities first: a query is usually searched among its own
        found, payload = self.index.find_sop(uid, [PB_TO_MODALITY[v] for v in request.modalities])
        return Query(
            np.asarray(found, dtype=np.float32),
            payload.get("modality", OTHER),
            payload.get("study_instance_uid"),
            uid,
            payload.get("patient_key"),
            indexed=True,
        )

    def _hit_filter(self, request: search_pb2.SearchSimilarRequest, query: Query) -> tuple[HitFilter, bool]:
        """The filter the request asks for, and whether it leaves the query's own instance out."""
        modalities = self._searchable(query.modality, [PB_TO_MODALITY[value] for value in request.modalities])
        exclude_self = request.exclude_self if request.HasField("exclude_self") else query.indexed
        if request.exclude_same_study and not query.study_instance_uid:
            raise InvalidInput("exclude_same_study needs a query with a study (DICOM or an indexed UID)")
        exclude_patient = None
        if request.exclude_same_patient:  # the site secret is checked before the query is decoded
            if not query.indexed:  # a picture never is
                raise InvalidInput(
                    "exclude_same_patient needs an indexed query instance (its UID, or a DICOM whose "
                    "instance is indexed): the patient is the one the index holds for it"
                )
            if not query.patient_key:
                raise InvalidInput(
                    "exclude_same_patient: the query instance has no patient reference (no Patient ID, "
                    "or indexed before CBMIR_PATIENT_KEY_SECRET was set: reindex)"
                )
            exclude_patient = query.patient_key
        where = HitFilter(
            modalities=modalities,
            exclude_study=query.study_instance_uid if request.exclude_same_study else None,
            exclude_sops=[query.sop_instance_uid] if exclude_self and query.sop_instance_uid else [],
            exclude_patient=exclude_patient,
            source=PB_TO_SOURCE.get(request.source),
        )
        return where, bool(exclude_self and query.indexed)

    def _searchable(self, query_modality: str, requested: list[str]) -> list[str]:
        """The modalities a query may be compared with (empty: all).

        With one encoder per modality (a routed model), distances between two encoders' vectors
        mean nothing: a query is compared only with the modalities its own encoder embeds. With no
        filter, that is the search; a filter naming another encoder's modality is refused.
        """
        if not self.encoder.routed:
            return requested
        allowed = self.encoder.comparable(query_modality, MODALITIES)
        if not requested:
            return list(allowed)
        foreign = [m for m in requested if m not in allowed]
        if foreign:
            raise InvalidInput(
                f"query modality {query_modality} can only be compared with {', '.join(allowed)}: model "
                f"{self.encoder.version} embeds {', '.join(foreign)} with another encoder, whose "
                "distances are not comparable (a DICOM or indexed query's modality is its own, "
                "a picture's the one the request names)"
            )
        return requested

    def search(
        self, request: search_pb2.SearchSimilarRequest, deadline_s: float | None = None
    ) -> search_pb2.SearchSimilarResponse:
        """Validate the request, embed or look up the query, search the index, group and page."""
        k = request.k or DEFAULT_K
        if not 1 <= k <= MAX_K:
            raise InvalidInput(f"k must be between 1 and {MAX_K}, got {k}")
        if request.offset > MAX_K - k:
            raise InvalidInput(f"offset + k must be at most {MAX_K}, got {request.offset} + {k}")
        if not math.isfinite(request.max_distance) or request.max_distance < 0:
            raise InvalidInput("max_distance must be a finite number >= 0 (0: no cut-off)")
        for value in request.modalities:
            if value not in PB_TO_MODALITY:
                raise InvalidInput(f"unknown modality value {value} in modalities")
        if request.source != search_pb2.CASE_SOURCE_ANY and request.source not in PB_TO_SOURCE:
            raise InvalidInput(f"unknown source value {request.source}")
        if request.group_by not in (search_pb2.GROUP_BY_INSTANCE, search_pb2.GROUP_BY_STUDY):
            raise InvalidInput(f"unknown group_by value {request.group_by}")
        if request.exclude_same_patient and not self.patient_key_secret:
            raise ConfigError(NO_PATIENT_KEYS)  # before any decoding
        self.ready_collection()
        if request.WhichOneof("query") == "image" and request.image.modality in PB_TO_MODALITY:
            # refused before the picture costs a decode and an encoder call
            self._searchable(
                PB_TO_MODALITY[request.image.modality], [PB_TO_MODALITY[v] for v in request.modalities]
            )
        query = self.query_vector(request, deadline_s)
        where, excluded_self = self._hit_filter(request, query)
        wanted = request.offset + k + 1  # one more than the page: is there a next one?
        if request.group_by == search_pb2.GROUP_BY_STUDY:
            ranked = self._best_studies(query.vector, wanted, where, request.max_distance)
        else:
            ranked = [
                (hit, 0)
                for hit in sorted(self._nearest(query.vector, wanted, where), key=_rank)
                if not request.max_distance or hit.distance <= request.max_distance
            ]
        page = ranked[request.offset : request.offset + k]
        more = len(ranked) > request.offset + k and request.offset + k < MAX_K
        return search_pb2.SearchSimilarResponse(
            hits=[_hit_message(hit, matching) for hit, matching in page],
            model_version=self.encoder.version,
            query_modality=MODALITY_TO_PB.get(query.modality, MODALITY_TO_PB[OTHER]),
            next_offset=request.offset + k if more else 0,
            excluded_self=excluded_self,
            searched_modalities=[MODALITY_TO_PB[m] for m in where.modalities],
        )

    def _nearest(self, vector: np.ndarray, limit: int, where: HitFilter) -> list[SearchHit]:
        """The ``limit`` nearest points ``where`` admits.

        The excluded instances, study and patient are few points: the engine would test every
        candidate's payload against them, which costs more than the search itself. So when they
        hold at most POST_FILTER_MAX points (counted through their payload index, within the
        modalities searched: the others cannot be candidates), the search asks for that many more
        candidates and drops theirs here; otherwise the engine filters.

        The usual case, the query instance alone left out, skips even the count: an instance is one
        point unless it was embedded frame by frame, so the search asks for one more per instance
        and drops them. Only when more of its points were among the candidates and the page came up
        short are they counted and the search made again.
        """
        sops = {uid for uid in where.exclude_sops if uid}
        if sops and not where.exclude_study and not where.exclude_patient:
            asked = limit + len(sops)
            hits = self.index.search(vector.tolist(), asked, replace(where, exclude_sops=()))
            kept = [hit for hit in hits if hit.payload.get("sop_instance_uid") not in sops]
            if len(kept) >= limit or len(hits) < asked:  # a full page, or every admitted point
                return kept[:limit]
        exclusions: dict[str, set[str]] = {
            "sop_instance_uid": sops,
            "study_instance_uid": {where.exclude_study} if where.exclude_study else set(),
            "patient_key": {where.exclude_patient} if where.exclude_patient else set(),
        }
        dropped: list[tuple[str, set[str]]] = []
        extra = 0
        for field, values in exclusions.items():
            count = (
                self._count_points(field, values, POST_FILTER_MAX - extra, where.modalities)
                if values
                else None
            )
            if count is not None:  # None: none, or too many (the engine filters them)
                dropped.append((field, values))
                extra += count
        if not dropped:
            return self.index.search(vector.tolist(), limit, where)
        here = {field for field, _ in dropped}
        engine = replace(
            where,
            exclude_sops=() if "sop_instance_uid" in here else where.exclude_sops,
            exclude_study=None if "study_instance_uid" in here else where.exclude_study,
            exclude_patient=None if "patient_key" in here else where.exclude_patient,
        )
        hits = self.index.search(vector.tolist(), limit + extra, engine)
        return [h for h in hits if not any(h.payload.get(f) in values for f, values in dropped)][:limit]

    def _count_points(
        self, field: str, values: set[str], cap: int, modalities: Sequence[str] = ()
    ) -> int | None:
        """How many points of ``modalities`` (empty: any) have ``field`` in ``values``; None when it
        is more than ``cap``."""
        count = 0
        index = self.index
        if isinstance(index, EdgeIndex):  # counted by the engine, in the searched shards only
            for value in values:
                count += index.count_points(field, value, modalities)
                if count > cap:
                    return None
            return count
        wanted = set(modalities)
        for value in values:
            for _, payload in index.scroll(field=field, value=value):
                if wanted and payload.get("modality") not in wanted:
                    continue
                count += 1
                if count > cap:
                    return None
        return count

    def _best_studies(
        self, vector: np.ndarray, wanted: int, where: HitFilter, max_distance: float
    ) -> list[tuple[SearchHit, int]]:
        """Up to ``wanted`` studies by their best instance, each with its matching instances among
        the candidates: the pool of nearest instances grows until it holds enough studies, runs
        out of points, or reaches MAX_POOL."""
        pool = max(POOL_PER_STUDY * wanted, 64)
        while True:
            hits = self._nearest(vector, min(pool, MAX_POOL), where)
            studies: dict[str, _StudyGroup] = {}
            for hit in hits:
                if max_distance and hit.distance > max_distance:
                    break  # ascending: the rest are farther still
                study = str(hit.payload.get("study_instance_uid", hit.point_id))
                if study in studies:
                    studies[study].matching += 1
                else:
                    studies[study] = _StudyGroup(hit)
            exhausted = len(hits) < min(pool, MAX_POOL) or (
                bool(max_distance) and bool(hits) and hits[-1].distance > max_distance
            )
            if len(studies) >= wanted or exhausted or pool >= MAX_POOL:
                ranked = sorted(studies.values(), key=lambda group: _rank(group.best))
                return [(group.best, group.matching) for group in ranked[:wanted]]
            pool *= POOL_GROWTH

    def render(
        self, request: search_pb2.RenderInstanceRequest, deadline_s: float | None = None
    ) -> search_pb2.RenderedInstance:
        """A PNG thumbnail of an indexed instance, through the display pipeline the encoder sees."""
        uids = (request.study_instance_uid, request.series_instance_uid, request.sop_instance_uid)
        if not all(is_valid_uid(uid) for uid in uids):
            raise InvalidInput("study, series and SOP Instance UIDs must all be DICOM UIDs")
        size = check_thumbnail_size(request.max_size)
        self.ready_collection()
        _, payload = self.index.find_sop(request.sop_instance_uid)
        if (payload.get("study_instance_uid"), payload.get("series_instance_uid")) != uids[:2]:
            raise NotFound("no such instance in that study and series")
        path = self.spool.archived_path(str(payload.get("spool_name") or spool_name_for(uids[2])))
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFound("the instance is indexed but its object is not in the archive") from None
        # the EEG render is part of what is drawn: a model with another render is another picture
        version = f"{uids[2]}:{stat.st_size}:{stat.st_mtime_ns}:{self.encoder.eeg_render}"
        etag = hashlib.sha256(f"{version}:{size}".encode()).hexdigest()[:32]
        cached = self._thumbnails.get(etag)
        if cached is not None:
            return cached
        base = self._bases.get(version)
        if base is None:
            # one decode per stored object, in its own slot: thumbnails never take a query's slot,
            # and other sizes of the same instance are a downscale of the cached base
            wait_s = self.timeout_s if deadline_s is None else max(0.0, min(self.timeout_s, deadline_s))
            if not self._render_slots.acquire(timeout=wait_s):
                raise BackendUnavailable(
                    f"busy: no thumbnail slot came free within {wait_s:.1f} s; try again"
                )
            try:
                base = self._bases.get(version)
                if base is None:
                    _, frames = decode_for_embedding(
                        path,
                        frames="middle",
                        limits=self.render_limits,
                        eeg_render=self.encoder.eeg_render,
                    )
                    base = display_base(frames[0].image)
                    self._bases.put(version, base, base.width * base.height)
            finally:
                self._render_slots.release()
        png, width, height = png_of(base, size)
        rendered = search_pb2.RenderedInstance(png=png, etag=etag, width=width, height=height)
        self._thumbnails.put(etag, rendered, len(png))
        return rendered

    def stats(self) -> search_pb2.GetIndexStatsResponse:
        """Points per modality, quarantine by reason, pending instances (and the oldest one's age),
        the reference library by finding, model and collection."""
        self.ready_collection()
        counts = self.index.counts_by_modality()
        reasons = self.spool.quarantine_counts()
        pending = self.spool.pending_since()
        library = Counter(  # indexed library cases (an imported one may still wait, or be quarantined)
            (str(payload.get("modality", OTHER)), str(payload.get("finding", "")))
            for _, payload in self.index.scroll(field="source", value=LIBRARY)
        )
        return search_pb2.GetIndexStatsResponse(
            total=sum(counts.values()),
            per_modality=[
                search_pb2.ModalityCount(modality=MODALITY_TO_PB[name], count=count)
                for name, count in sorted(counts.items())
            ],
            quarantined=sum(reasons.values()),
            quarantine_reasons=[
                search_pb2.QuarantineReason(reason=r, count=c) for r, c in sorted(reasons.items())
            ],
            model_version=self.encoder.version,
            collection=self.collection,
            pending=len(pending),
            oldest_pending_age_s=round(max(0.0, time.time() - pending[0][0]), 1) if pending else 0.0,
            library=sum(library.values()),
            library_findings=[
                search_pb2.FindingCount(modality=MODALITY_TO_PB[modality], finding=finding, count=count)
                for (modality, finding), count in sorted(library.items())
            ],
        )


def _rank(hit: SearchHit) -> tuple[float, str, int]:
    """Ascending distance; equal distances (duplicate images) in UID order, so pages never overlap."""
    payload = hit.payload
    return hit.distance, str(payload.get("sop_instance_uid", "")), int(payload.get("frame_number", 1) or 1)


def _hit_message(hit: SearchHit, matching_instances: int = 0) -> search_pb2.Hit:
    payload = hit.payload
    return search_pb2.Hit(
        sop_instance_uid=payload.get("sop_instance_uid", ""),
        study_instance_uid=payload.get("study_instance_uid", ""),
        series_instance_uid=payload.get("series_instance_uid", ""),
        sop_class_uid=payload.get("sop_class_uid", ""),
        modality=MODALITY_TO_PB.get(payload.get("modality", OTHER), MODALITY_TO_PB[OTHER]),
        modality_code=payload.get("modality_code", ""),
        frame_number=int(payload.get("frame_number", 1) or 1),
        distance=float(hit.distance),
        finding=str(payload.get("finding", "")),
        source=SOURCE_TO_PB[LIBRARY if payload.get("source") == LIBRARY else CLINICAL],
        matching_instances=matching_instances,
        study_date=str(payload.get("study_date", "")),
    )


class _Outcome:
    """The status a call ends with (its gRPC code's name), for its audit line and metrics."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK.name

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Note the code of an exception that leaves the block (and let it go on)."""
        try:
            yield
        except CbmirError as exc:
            self.code = grpc_code_for(exc).name
            raise
        except Exception:
            self.code = grpc.StatusCode.INTERNAL.name
            raise


class SimilarCasesServicer(search_pb2_grpc.SimilarCasesServicer):
    """The public ``cbmir.v1.SimilarCases`` service; every search is written to the audit log."""

    def __init__(self, engine: QueryEngine, policy: AccessPolicy):
        self._engine = engine
        self._policy = policy

    @override
    @_guarded
    def SearchSimilar(
        self, request: search_pb2.SearchSimilarRequest, context: grpc.ServicerContext
    ) -> search_pb2.SearchSimilarResponse:
        started = time.monotonic()
        caller = self._policy.authorize(context.invocation_metadata(), SEARCH)  # checked already: who
        outcome, hits = _Outcome(), 0
        try:
            with outcome.watch():
                response = self._engine.search(request, context.time_remaining())
            hits = len(response.hits)
            return response
        finally:
            kind = request.WhichOneof("query") or "none"
            metrics.SEARCH_REQUESTS.labels(kind, outcome.code).inc()
            metrics.SEARCH_SECONDS.labels(kind).observe(time.monotonic() - started)
            # who, what kind of query, how many asked and found, how it ended; never the query itself
            audit.info(
                "search caller=%s kind=%s k=%d modalities=%d hits=%d status=%s ms=%.1f",
                caller.token_id,
                request.WhichOneof("query") or "none",
                request.k or DEFAULT_K,
                len(request.modalities),
                hits,
                outcome.code,
                (time.monotonic() - started) * 1000,
            )

    @override
    @_guarded
    def GetIndexStats(
        self, request: search_pb2.GetIndexStatsRequest, context: grpc.ServicerContext
    ) -> search_pb2.GetIndexStatsResponse:
        return self._engine.stats()

    @override
    @_guarded
    def RenderInstance(
        self, request: search_pb2.RenderInstanceRequest, context: grpc.ServicerContext
    ) -> search_pb2.RenderedInstance:
        caller = self._policy.authorize(context.invocation_metadata(), SEARCH)
        outcome = _Outcome()
        try:
            with outcome.watch():
                return self._engine.render(request, context.time_remaining())
        finally:
            audit.info("render caller=%s size=%d status=%s", caller.token_id, request.max_size, outcome.code)

    @override
    @_guarded
    def GetCaller(
        self, request: search_pb2.GetCallerRequest, context: grpc.ServicerContext
    ) -> search_pb2.Caller:
        caller = self._policy.authorize(context.invocation_metadata(), SEARCH)
        return search_pb2.Caller(token_id=caller.token_id, role=caller.role)


class IndexWriterServicer(index_writer_pb2_grpc.IndexWriterServicer):
    """Workers' upserts into the embedded index this process owns: checked point by point, and
    refused (UNAVAILABLE, so the workers retry) while the data volume is almost full."""

    def __init__(
        self,
        engine: QueryEngine,
        index: VectorIndex,
        model_version: str,
        dim: int,
        data_dir: Path,
        min_free_mb: int,
    ):
        self._engine = engine
        self._index = index
        self._model_version = model_version
        self._dim = dim
        self._data_dir = data_dir
        self._min_free_mb = min_free_mb

    @override
    @_guarded
    def UpsertPoints(
        self, request: index_writer_pb2.UpsertPointsRequest, context: grpc.ServicerContext
    ) -> index_writer_pb2.UpsertPointsResponse:
        if request.model_version != self._model_version:
            raise ConfigError(
                f"worker model {request.model_version} differs from the index model {self._model_version}; "
                "run the same model everywhere or reindex"
            )
        points = []
        for point in request.points:
            try:
                payload = json.loads(point.payload_json)
            except ValueError:
                raise InvalidInput(f"point {point.point_id}: the payload is not JSON") from None
            candidate = IndexPoint(point.point_id, list(point.vector), payload)
            check_point(candidate, self._dim)
            if not self._engine.spool.erased_recently(str(payload.get("spool_name", ""))):
                points.append(candidate)  # an instance erased meanwhile is not indexed again
        require_free_space(self._data_dir, self._min_free_mb, "the embedded index")
        self._engine.ready_collection()
        self._index.upsert(points)
        return index_writer_pb2.UpsertPointsResponse(upserted=len(points))


class _CallGate(grpc.ServerInterceptor):
    """Refuses a call before any work is done when :meth:`check` raises a cbmir error; calls to a
    method the server does not have pass on (UNIMPLEMENTED)."""

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Raise Unauthenticated or PermissionDenied to refuse the call."""
        raise NotImplementedError

    @override
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        try:
            self.check(method, handler_call_details.invocation_metadata)
        except CbmirError as exc:
            logger.warning("refused %s: %s", method, exc)
            return _refusal(handler, exc)
        return handler


class AccessInterceptor(_CallGate):
    """Every call but the health checks needs the role its method asks for (:data:`METHOD_ROLES`);
    a caller without it gets UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, policy: AccessPolicy):
        self._policy = policy

    @override
    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        if not method.startswith(OPEN_METHOD_PREFIXES):
            try:
                self._policy.authorize(metadata, METHOD_ROLES.get(method, ADMIN))
            except CbmirError as exc:
                if method == SEARCH_METHOD:  # refused before the request was read: its kind is unknown
                    metrics.SEARCH_REQUESTS.labels("unknown", grpc_code_for(exc).name).inc()
                raise


class WriterTokenInterceptor(_CallGate):
    """The index writer's own secret (``CBMIR_WRITER_TOKEN``): every call must carry it."""

    def __init__(self, token: str):
        self._token = token.encode()

    @override
    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        sent = bearer_token(metadata) or ""
        if not hmac.compare_digest(sent.encode(), self._token):
            raise Unauthenticated("the writer token is missing or wrong")


def _refusal(handler: grpc.RpcMethodHandler | None, exc: CbmirError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only answers ``exc``'s status."""
    code, details = grpc_code_for(exc), str(exc)

    def refuse(request: object, context: grpc.ServicerContext) -> NoReturn:
        context.abort(code, details)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def require_free_space(folder: Path, min_free_mb: int, what: str) -> None:
    """BackendUnavailable (retry later) when the volume of ``folder`` has less than ``min_free_mb``
    free: an index that writes its memory-mapped files on a full disk dies (SIGBUS)."""
    if min_free_mb <= 0:
        return
    usage = shutil.disk_usage(folder)
    if usage.free < min_free_mb * 1024 * 1024:
        raise BackendUnavailable(
            f"{what} refuses writes: {usage.free / 2**20:.0f} MB free on the data volume, "
            f"CBMIR_MIN_FREE_MB is {min_free_mb}"
        )


def _bind(server: grpc.Server, address: str, tls: grpc.ServerCredentials | None, what: str) -> int:
    """Bind ``address`` (TLS when ``tls`` is given); BackendUnavailable when it is taken or invalid.
    SO_REUSEPORT is off, so a port a live service holds cannot be shared."""
    try:
        port = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        port = 0
    if port == 0 and not address.startswith("unix:"):
        raise BackendUnavailable(f"cannot bind {what} {address}: it is in use or not an address of this host")
    return port


def _writer_address(target: str) -> tuple[str, Path | None]:
    """(gRPC bind address, Unix socket path or None) of ``CBMIR_INDEX_WRITER``."""
    if not target.startswith("unix:"):
        return target, None
    path = Path(target.removeprefix("unix:").removeprefix("//"))
    if len(str(path).encode()) > 100:
        raise ConfigError(
            f"the index writer's socket path is too long for a Unix socket: {path}; "
            "use a shorter CBMIR_DATA_DIR or set CBMIR_INDEX_WRITER=HOST:PORT with CBMIR_WRITER_TOKEN"
        )
    return f"unix:{path}", path


class QueryServer:
    """The public gRPC server (search, stats, health, reflection) with its index and encoder, and, in
    the embedded default, the private index writer on its own address; ``port`` is the bound port."""

    def __init__(self, settings: QuerySettings):
        self.settings = settings
        self.policy = AccessPolicy.for_service(settings.access, settings.host)
        self.encoder = EncoderSet.load(settings.model.model_path, device=settings.model.device)
        self.index = open_index(settings.index)
        limits = replace(
            DecodeLimits.from_settings(settings.decode),
            max_pixels=settings.query_max_pixels,
            max_inflated_bytes=settings.query_max_bytes,  # a deflated query inflates within its budget
        )
        self.engine = QueryEngine(
            self.index,
            self.encoder,
            Spool(settings.layout),
            limits,
            decodes=settings.query_decodes,
            timeout_s=settings.query_timeout_s,
            alias=settings.index.collection,
            patient_key_secret=settings.patient_key_secret,
            render_limits=DecodeLimits.from_settings(settings.decode),
        )
        try:
            self.engine.ready_collection()
        except BackendUnavailable as exc:  # keep serving: calls answer UNAVAILABLE until it is back
            logger.error("index backend unavailable at start: %s", exc)
        self._dispatcher: TaskDispatcher | None = None
        self._dispatcher_lock = threading.Lock()
        self.maintenance = IndexMaintenance(
            self.index,
            self.engine.spool,
            model_version=self.encoder.version,
            send=self._send,
            patient_key_secret=settings.patient_key_secret,
        )
        self.reindex = ReindexJob.for_settings(
            self.index,
            self.engine.spool,
            self.encoder,
            settings.index,
            settings.decode,
            settings.patient_key_secret,
            on_switch=self._switched,
            erasure_lock=self.maintenance.lock,
        )
        self.health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
            interceptors=[AccessInterceptor(self.policy)],
            options=[
                ("grpc.max_receive_message_length", settings.query_max_bytes),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),  # a second service must not share the port of a live one
            ],
        )
        search_pb2_grpc.add_SimilarCasesServicer_to_server(
            SimilarCasesServicer(self.engine, self.policy), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        # Admin only (METHOD_ROLES lists it nowhere, so it needs the admin role); not in reflection.
        admin_pb2_grpc.add_IndexAdminServicer_to_server(
            make_servicer(
                self.maintenance, self.reindex, _guarded, lambda md: self.policy.authorize(md, ADMIN).token_id
            ),
            self._server,
        )
        public = [SEARCH_SERVICE, health.SERVICE_NAME]
        reflection.enable_server_reflection([*public, reflection.SERVICE_NAME], self._server)
        address = f"{settings.host}:{settings.port}"
        tls = grpc_server_credentials(settings.tls) if settings.tls.enabled else None
        self.port = _bind(self._server, address, tls, "gRPC port")
        self._writer: grpc.Server | None = None
        self._writer_socket: Path | None = None
        if settings.index.embedded:
            self._writer = self._writer_server(settings)
        self._stop = threading.Event()

    def _writer_server(self, settings: QuerySettings) -> grpc.Server:
        """The private IndexWriter: a Unix socket only this user may use, or TCP with the writer
        token (TLS, with client certificates when CBMIR_TLS_CLIENT_CA is set, if configured)."""
        address, socket_path = _writer_address(settings.index.writer_target)
        token = settings.index.writer_token
        if socket_path is None and not token:
            raise ConfigError(
                f"the index writer on {address} (TCP) needs CBMIR_WRITER_TOKEN; or leave CBMIR_INDEX_WRITER "
                "at its default, a Unix socket in the data folder"
            )
        if socket_path is None and not settings.tls.enabled and not is_loopback(address.rsplit(":", 1)[0]):
            raise ConfigError(
                f"the index writer on {address} would take the writer token in plain text over the network: "
                "set CBMIR_TLS_CERT and CBMIR_TLS_KEY, or bind it to a loopback address"
            )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="writer"),
            interceptors=[WriterTokenInterceptor(token)] if token else [],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        index_writer_pb2_grpc.add_IndexWriterServicer_to_server(
            IndexWriterServicer(
                self.engine,
                self.index,
                self.encoder.version,
                self.encoder.dim,
                settings.layout.root,
                settings.min_free_mb,
            ),
            server,
        )
        tls = None
        if socket_path is not None:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            socket_path.unlink(missing_ok=True)  # stale: this process owns the index (its lock is held)
            self._writer_socket = socket_path
        elif settings.tls.enabled:
            tls = grpc_server_credentials(settings.tls)
        _bind(server, address, tls, "index writer")
        return server

    def _switched(self, collection: str) -> None:
        """A reindex switched the alias: stats name the new collection."""
        self.engine.collection = collection

    def _send(self, spool_name: str) -> bool:
        """Hand a spooled instance to the workers (an admin repair or requeue)."""
        if self.settings.broker is None:
            return False
        with self._dispatcher_lock:
            if self._dispatcher is None:
                self._dispatcher = TaskDispatcher(self.settings.broker)
        return self._dispatcher.embed(spool_name)

    def start(self) -> int:
        """Start serving (and the index writer); returns the public port. Health says NOT_SERVING
        until the index has answered (opening a large index or a slow Qdrant can take seconds;
        grpc's health servicer would say SERVING for the server's own name meanwhile)."""
        for name in HEALTH_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.start()
        if self._writer is not None:
            self._writer.start()
            if self._writer_socket is not None:
                self._writer_socket.chmod(0o600)
        threading.Thread(target=self._watch_backend, name="health", daemon=True).start()
        if self.settings.index.embedded and self.reindex.interrupted:
            logger.info("a reindex into %s was cut short; resuming it", self.reindex.state.target)
            self.reindex.start_background()
        logger.info(
            "gRPC query service on %s:%d%s (collection %s, model %s on %s, index %s%s)",
            self.settings.host,
            self.port,
            " with TLS" if self.settings.tls.enabled else "",
            self.engine.collection,
            self.encoder.version,
            ", ".join(f"{e.model_path.name} {e.providers[0]}" for e in self.encoder.members()),
            "embedded" if self.settings.index.embedded else "server",
            f", index writer on {self.settings.index.writer_target}" if self._writer is not None else "",
        )
        return self.port

    def _watch_backend(self, interval_s: float = 5.0) -> None:
        """Health says SERVING only while the index answers; the index points gauge follows it."""
        status: int | None = None
        tick = -1
        while True:
            tick += 1
            now: int
            try:
                if not self.settings.index.embedded:
                    self.engine.collection = None  # another process may have switched the alias
                self.engine.ready_collection()
                metrics.set_index_points(self.index.counts_by_modality())
                now = health_pb2.HealthCheckResponse.SERVING
            except CbmirError as exc:
                now = health_pb2.HealthCheckResponse.NOT_SERVING
                if status != now:
                    logger.error("index backend unavailable: %s", exc)
            if now != status:
                for name in HEALTH_NAMES:
                    self.health.set(name, now)
                status = now
            if now == health_pb2.HealthCheckResponse.SERVING and not self.reindex.running and tick % 12 == 0:
                try:
                    self.reindex.drop_old()  # collections a reindex replaced, once their grace is over
                except CbmirError as exc:
                    logger.warning("could not drop an old collection: %s", exc)
            if self._stop.wait(interval_s):
                return

    def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING, finish calls in flight for ``grace_s``, close the index."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self._writer is not None:
            self._writer.stop(grace_s).wait()
        self._server.stop(grace_s).wait()
        if self._dispatcher is not None:
            self._dispatcher.close()
        self.index.close()
        if self._writer_socket is not None:
            self._writer_socket.unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir query``."""
    parser.add_argument("--port", type=int, help="override CBMIR_GRPC_PORT (0: any free port)")


def run(args: argparse.Namespace) -> int:
    """``cbmir query``: serve (and its metrics, with CBMIR_METRICS_PORT) until SIGINT or SIGTERM."""
    settings = QuerySettings.from_env()
    metrics_settings = MetricsSettings.from_env()
    if args.port is not None:
        settings = replace(settings, port=args.port)
    server = QueryServer(settings)
    # the spool's state (pending, index lag, quarantine) is read when scraped; the point counts are
    # the gauge _watch_backend refreshes
    endpoint = metrics.serve_metrics(metrics_settings, [metrics.SpoolCollector(server.engine.spool)])

    def stop() -> None:
        server.stop()
        if endpoint is not None:
            endpoint.close()

    return run_until_stopped(lambda: f"cbmir query: gRPC on {settings.host}:{server.start()}", stop)
