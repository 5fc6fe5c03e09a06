"""The gRPC query service (``cbmir query``): "find similar cases".

It serves ``cbmir.v1.SimilarCases`` (SearchSimilar, GetIndexStats), the standard health service
and server reflection. In the embedded default it is also the one process that owns the index,
and serves ``cbmir.v1.IndexWriter`` so that workers upsert through it.

Errors become gRPC status codes in exactly one place, :func:`grpc_code_for`; clients never see a
traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import replace
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from typing_extensions import override

from models.preprocess import decode_image_bytes, to_model_input
from models.runtime import OnnxEncoder
from services.core.config import QuerySettings
from services.core.errors import BackendUnavailable, CbmirError, ConfigError, InvalidInput, NotFound
from services.core.processes import run_until_stopped
from services.core.vocabulary import MODALITIES, MODALITY_TO_PB, OTHER, PB_TO_MODALITY
from services.dicom.decode import DecodeLimits, decode_for_embedding
from services.grpc_gen.cbmir.v1 import index_writer_pb2, index_writer_pb2_grpc, search_pb2, search_pb2_grpc
from services.index import IndexPoint, SearchHit, VectorIndex, open_index
from services.ingest.spool import Spool

logger = logging.getLogger(__name__)

DEFAULT_K = 5
MAX_K = 1000
MAX_QUERY_BYTES = 256 * 1024 * 1024


def grpc_code_for(exc: BaseException) -> grpc.StatusCode:
    """The one place cbmir errors become gRPC status codes."""
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, BackendUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


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
        except CbmirError as exc:
            context.abort(grpc_code_for(exc), str(exc))
        except Exception as exc:
            logger.exception("%s failed", method.__name__)
            context.abort(grpc_code_for(exc), f"internal error ({type(exc).__name__}); see the service log")

    return wrapper


class QueryEngine:
    """Turns a query (DICOM, picture, or UID) into a vector and searches the index."""

    def __init__(self, index: VectorIndex, encoder: OnnxEncoder, spool: Spool, limits: DecodeLimits):
        self.index = index
        self.encoder = encoder
        self.spool = spool
        self.limits = limits
        self.collection: str | None = None
        self._lock = threading.Lock()

    def ready_collection(self) -> str:
        """The collection, created on first use; raises BackendUnavailable while the store is down."""
        if self.collection is None:
            with self._lock:
                if self.collection is None:
                    self.collection = self.index.ensure_collection(self.encoder.dim, self.encoder.version)
        return self.collection

    def _embed_image(self, image: np.ndarray) -> np.ndarray:
        return self.encoder.embed(to_model_input(image, self.encoder.contract)[None])[0]

    def query_vector(self, request: search_pb2.SearchSimilarRequest) -> tuple[np.ndarray, str, str | None]:
        """Returns (vector, query modality, query study UID or None)."""
        kind = request.WhichOneof("query")
        if kind is None:
            raise InvalidInput("the request names no query: set dicom, image or sop_instance_uid")
        if kind == "dicom":
            if not request.dicom:
                raise InvalidInput("dicom is empty")
            header, frames = decode_for_embedding(bytes(request.dicom), frames="middle", limits=self.limits)
            return self._embed_image(frames[0].image), header.modality, header.study_instance_uid
        if kind == "image":
            if request.image.modality not in PB_TO_MODALITY:
                names = ", ".join(f"MODALITY_{name.upper()}" for name in MODALITIES)
                raise InvalidInput(f"image.modality must be set to one of {names}")
            if not request.image.data:
                raise InvalidInput("image.data is empty")
            picture = decode_image_bytes(bytes(request.image.data))
            return self._embed_image(picture), PB_TO_MODALITY[request.image.modality], None
        uid = request.sop_instance_uid.strip()
        if not uid:
            raise InvalidInput("sop_instance_uid is empty")
        vector, payload = self.index.find_sop(uid)
        return (
            np.asarray(vector, dtype=np.float32),
            payload.get("modality", OTHER),
            payload.get("study_instance_uid"),
        )

    def search(self, request: search_pb2.SearchSimilarRequest) -> search_pb2.SearchSimilarResponse:
        """Validate the request, embed or look up the query, search the index."""
        k = request.k or DEFAULT_K
        if not 1 <= k <= MAX_K:
            raise InvalidInput(f"k must be between 1 and {MAX_K}, got {k}")
        modalities = []
        for value in request.modalities:
            if value not in PB_TO_MODALITY:
                raise InvalidInput(f"unknown modality value {value} in modalities")
            modalities.append(PB_TO_MODALITY[value])
        self.ready_collection()
        vector, query_modality, study = self.query_vector(request)
        exclude = study if request.exclude_same_study else None
        if request.exclude_same_study and not study:
            raise InvalidInput("exclude_same_study needs a query with a study (DICOM or an indexed UID)")
        hits = self.index.search(vector.tolist(), k, modalities, exclude)
        return search_pb2.SearchSimilarResponse(
            hits=[_hit_message(hit) for hit in hits],
            model_version=self.encoder.version,
            query_modality=MODALITY_TO_PB.get(query_modality, MODALITY_TO_PB[OTHER]),
        )

    def stats(self) -> search_pb2.GetIndexStatsResponse:
        """Points per modality, quarantine by reason, pending instances, model and collection."""
        self.ready_collection()
        counts = self.index.counts_by_modality()
        reasons = self.spool.quarantine_counts()
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
            pending=len(self.spool.pending()),
        )


def _hit_message(hit: SearchHit) -> search_pb2.Hit:
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
    )


class SimilarCasesServicer(search_pb2_grpc.SimilarCasesServicer):
    """The public ``cbmir.v1.SimilarCases`` service."""

    def __init__(self, engine: QueryEngine):
        self._engine = engine

    @override
    @_guarded
    def SearchSimilar(
        self, request: search_pb2.SearchSimilarRequest, context: grpc.ServicerContext
    ) -> search_pb2.SearchSimilarResponse:
        return self._engine.search(request)

    @override
    @_guarded
    def GetIndexStats(
        self, request: search_pb2.GetIndexStatsRequest, context: grpc.ServicerContext
    ) -> search_pb2.GetIndexStatsResponse:
        return self._engine.stats()


class IndexWriterServicer(index_writer_pb2_grpc.IndexWriterServicer):
    """Workers' upserts into the embedded index this process owns."""

    def __init__(self, engine: QueryEngine, index: VectorIndex, model_version: str, dim: int):
        self._engine = engine
        self._index = index
        self._model_version = model_version
        self._dim = dim

    @override
    @_guarded
    def UpsertPoints(
        self, request: index_writer_pb2.UpsertPointsRequest, context: grpc.ServicerContext
    ) -> index_writer_pb2.UpsertPointsResponse:
        if request.model_version != self._model_version:
            raise ConfigError(
                f"worker model {request.model_version!r} differs from the index's {self._model_version!r}; "
                "run the same model everywhere or reindex"
            )
        points = []
        for point in request.points:
            if len(point.vector) != self._dim:
                raise InvalidInput(f"vector of {len(point.vector)} values, index holds {self._dim}")
            points.append(IndexPoint(point.point_id, list(point.vector), json.loads(point.payload_json)))
        self._engine.ready_collection()
        self._index.upsert(points)
        return index_writer_pb2.UpsertPointsResponse(upserted=len(points))


class QueryServer:
    """The gRPC server with its index and encoder; ``port`` is the bound port."""

    def __init__(self, settings: QuerySettings):
        self.settings = settings
        self.encoder = OnnxEncoder(settings.model.model_path, device=settings.model.device)
        self.index = open_index(settings.index)
        limits = DecodeLimits.from_settings(settings.decode)
        self.engine = QueryEngine(self.index, self.encoder, Spool(settings.layout), limits)
        try:
            self.engine.ready_collection()
        except BackendUnavailable as exc:  # keep serving: calls answer UNAVAILABLE until it is back
            logger.error("index backend unavailable at start: %s", exc)
        self.health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_QUERY_BYTES),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        search_pb2_grpc.add_SimilarCasesServicer_to_server(SimilarCasesServicer(self.engine), self._server)
        services = [search_pb2.DESCRIPTOR.services_by_name["SimilarCases"].full_name, health.SERVICE_NAME]
        if settings.index.embedded:
            index_writer_pb2_grpc.add_IndexWriterServicer_to_server(
                IndexWriterServicer(self.engine, self.index, self.encoder.version, self.encoder.dim),
                self._server,
            )
            services.append(index_writer_pb2.DESCRIPTOR.services_by_name["IndexWriter"].full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], self._server)
        self.port = self._server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise BackendUnavailable(f"cannot bind gRPC port {settings.host}:{settings.port}")

    def start(self) -> int:
        """Start serving; returns the bound port."""
        self._server.start()
        for name in ("", "cbmir.v1.SimilarCases"):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "gRPC query service on %s:%d (collection %s, model %s on %s, index %s)",
            self.settings.host,
            self.port,
            self.engine.collection,
            self.encoder.version,
            self.encoder.providers[0],
            "embedded" if self.settings.index.embedded else "server",
        )
        return self.port

    def stop(self, grace_s: float = 2.0) -> None:
        """Report NOT_SERVING, finish calls in flight for ``grace_s``, close the index."""
        self.health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
        self.index.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``cbmir query``."""
    parser.add_argument("--port", type=int, help="override CBMIR_GRPC_PORT (0: any free port)")


def run(args: argparse.Namespace) -> int:
    """``cbmir query``: serve until SIGINT or SIGTERM."""
    settings = QuerySettings.from_env()
    if args.port is not None:
        settings = replace(settings, port=args.port)
    server = QueryServer(settings)
    return run_until_stopped(lambda: f"cbmir query: gRPC on {settings.host}:{server.start()}", server.stop)
