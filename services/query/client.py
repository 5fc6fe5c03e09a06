"""A small gRPC client for the query service (used by ``cbmir search``/``stats``, the demo, tests)."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.core.vocabulary import MODALITY_TO_PB, PB_TO_MODALITY
from services.grpc_gen.cbmir.v1 import search_pb2, search_pb2_grpc


def looks_like_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


class SearchClient:
    def __init__(self, target: str, timeout_s: float = 30.0):
        self._channel = grpc.insecure_channel(target)
        self._stub = search_pb2_grpc.SimilarCasesStub(self._channel)
        self._timeout_s = timeout_s

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def search(
        self,
        *,
        dicom: bytes | None = None,
        image: bytes | None = None,
        image_modality: str | None = None,
        sop_instance_uid: str | None = None,
        k: int = 5,
        modalities=(),
        exclude_same_study: bool = False,
    ):
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
        return self._stub.SearchSimilar(request, timeout=self._timeout_s)

    def search_file(self, path: Path, **kwargs):
        data = Path(path).read_bytes()
        if looks_like_dicom(data):
            return self.search(dicom=data, **kwargs)
        return self.search(image=data, **kwargs)

    def stats(self):
        return self._stub.GetIndexStats(search_pb2.GetIndexStatsRequest(), timeout=self._timeout_s)

    def close(self) -> None:
        self._channel.close()


def hit_dict(hit) -> dict:
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


def stats_dict(stats) -> dict:
    return {
        "total": stats.total,
        "per_modality": {PB_TO_MODALITY.get(m.modality, "unspecified"): m.count for m in stats.per_modality},
        "quarantined": stats.quarantined,
        "quarantine_reasons": {r.reason: r.count for r in stats.quarantine_reasons},
        "pending": stats.pending,
        "model_version": stats.model_version,
        "collection": stats.collection,
    }
