"""A small gRPC client for the query service (used by ``cbmir search``/``stats``, the demo, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from services.core.security import grpc_channel
from services.core.vocabulary import MODALITY_TO_PB, PB_TO_MODALITY
from services.dicom.decode import looks_like_dicom
from services.grpc_gen.cbmir.v1 import admin_pb2_grpc, search_pb2, search_pb2_grpc


class SearchClient:
    """``SimilarCases`` over one channel; calls raise ``grpc.RpcError`` with the service's status.

    ``token`` is sent as ``authorization: Bearer <token>``; ``tls_ca`` turns on TLS (the service's
    certificate must chain to it), with ``tls_cert``/``tls_key`` as the client certificate for mTLS.
    """

    def __init__(
        self,
        target: str,
        timeout_s: float = 30.0,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ):
        self._channel = grpc_channel(target, ca=tls_ca, cert=tls_cert, key=tls_key)
        self._stub = search_pb2_grpc.SimilarCasesStub(self._channel)
        self._admin = admin_pb2_grpc.IndexAdminStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Block until the channel connects."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def search(
        self,
        *,
        dicom: bytes | None = None,
        image: bytes | None = None,
        image_modality: str | None = None,
        sop_instance_uid: str | None = None,
        k: int = 5,
        modalities: Sequence[str] = (),
        exclude_same_study: bool = False,
    ) -> search_pb2.SearchSimilarResponse:
        """``SearchSimilar`` by DICOM bytes, picture bytes (with their modality) or an indexed UID."""
        request = search_pb2.SearchSimilarRequest(
            k=k, modalities=[MODALITY_TO_PB[m] for m in modalities], exclude_same_study=exclude_same_study
        )
        if dicom is not None:
            request.dicom = dicom
        elif image is not None:
            request.image.data = image
            request.image.modality = MODALITY_TO_PB.get(image_modality or "", search_pb2.MODALITY_UNSPECIFIED)
        elif sop_instance_uid is not None:
            request.sop_instance_uid = sop_instance_uid
        response: search_pb2.SearchSimilarResponse = self._stub.SearchSimilar(
            request, timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    def search_file(self, path: Path, **kwargs: Any) -> search_pb2.SearchSimilarResponse:
        """:meth:`search` with a file's bytes, as DICOM or as a picture by its content."""
        data = Path(path).read_bytes()
        if looks_like_dicom(data):
            return self.search(dicom=data, **kwargs)
        return self.search(image=data, **kwargs)

    def stats(self) -> search_pb2.GetIndexStatsResponse:
        """``GetIndexStats``."""
        response: search_pb2.GetIndexStatsResponse = self._stub.GetIndexStats(
            search_pb2.GetIndexStatsRequest(), timeout=self._timeout_s, metadata=self._metadata
        )
        return response

    def admin(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """Call ``cbmir.v1.IndexAdmin/<method>`` (admin role) with ``request``."""
        call = getattr(self._admin, method)
        return call(request, timeout=timeout_s or self._timeout_s, metadata=self._metadata)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def hit_dict(hit: search_pb2.Hit) -> dict[str, Any]:
    """A hit as a JSON-ready dict (modality by name)."""
    return {
        "sop_instance_uid": hit.sop_instance_uid,
        "study_instance_uid": hit.study_instance_uid,
        "series_instance_uid": hit.series_instance_uid,
        "sop_class_uid": hit.sop_class_uid,
        "modality": PB_TO_MODALITY.get(hit.modality, "unspecified"),
        "modality_code": hit.modality_code,
        "frame_number": hit.frame_number,
        "distance": round(float(hit.distance), 6),
    }


def stats_dict(stats: search_pb2.GetIndexStatsResponse) -> dict[str, Any]:
    """Index statistics as a JSON-ready dict (modalities by name)."""
    return {
        "total": stats.total,
        "per_modality": {PB_TO_MODALITY.get(m.modality, "unspecified"): m.count for m in stats.per_modality},
        "quarantined": stats.quarantined,
        "quarantine_reasons": {r.reason: r.count for r in stats.quarantine_reasons},
        "pending": stats.pending,
        "oldest_pending_age_s": stats.oldest_pending_age_s,
        "model_version": stats.model_version,
        "collection": stats.collection,
    }
