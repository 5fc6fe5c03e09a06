"""A small gRPC client for the query service (used by ``cbmir search``/``stats``, the demo, tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from services.core.security import grpc_channel
from services.core.vocabulary import GROUP_BY_TO_PB, MODALITY_TO_PB, SOURCE_TO_PB
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
        exclude_self: bool | None = None,
        exclude_same_patient: bool = False,
        group_by: str = "instance",
        max_distance: float = 0.0,
        offset: int = 0,
        source: str | None = None,
    ) -> search_pb2.SearchSimilarResponse:
        """``SearchSimilar`` by DICOM bytes, picture bytes (with their modality) or an indexed UID.
        ``group_by`` is ``instance`` or ``study``; ``source`` is ``library``, ``clinical`` or None
        (both); ``exclude_self`` None leaves the service's default (an indexed query is left out)."""
        request = search_pb2.SearchSimilarRequest(
            k=k,
            modalities=[MODALITY_TO_PB[m] for m in modalities],
            exclude_same_study=exclude_same_study,
            exclude_same_patient=exclude_same_patient,
            group_by=GROUP_BY_TO_PB[group_by],
            max_distance=max_distance,
            offset=offset,
            source=SOURCE_TO_PB[source] if source else search_pb2.CASE_SOURCE_ANY,
        )
        if exclude_self is not None:
            request.exclude_self = exclude_self
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

    def render(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str, max_size: int = 0
    ) -> search_pb2.RenderedInstance:
        """``RenderInstance``: a PNG thumbnail of an indexed instance."""
        response: search_pb2.RenderedInstance = self._stub.RenderInstance(
            search_pb2.RenderInstanceRequest(
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                sop_instance_uid=sop_instance_uid,
                max_size=max_size,
            ),
            timeout=self._timeout_s,
            metadata=self._metadata,
        )
        return response

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
