"""The JSON shapes of the API's answers, and its thumbnail limits: one definition for the query
service, the HTTP gateway and the command line.

Modalities and sources by name, the study date as YYYY-MM-DD, empty strings as null, and each
hit's thumbnail as its DICOMweb ``rendered`` path.
"""

from __future__ import annotations

from typing import Any

from services.core.vocabulary import PB_TO_MODALITY, PB_TO_SOURCE, is_valid_uid
from services.grpc_gen.cbmir.v1 import search_pb2

# SearchSimilarRequest.k: hits per page (0 asks for DEFAULT_K), and offset + k at most MAX_K
DEFAULT_K = 5
MAX_K = 1000
# RenderInstanceRequest.max_size: the longest side of a thumbnail, in pixels (0 asks for the default)
MIN_THUMBNAIL = 1
MAX_THUMBNAIL = 1024
DEFAULT_THUMBNAIL = 256


def iso_date(value: str) -> str | None:
    """DICOM DA (YYYYMMDD) as an ISO date (YYYY-MM-DD); None when absent or not a date."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"


def rendered_path(study: str, series: str, instance: str, root: str = "") -> str:
    """Where the gateway serves an instance's thumbnail (the DICOMweb ``rendered`` resource)."""
    return f"{root}/studies/{study}/series/{series}/instances/{instance}/rendered"


def hit_json(hit: search_pb2.Hit, root: str = "") -> dict[str, Any]:
    """A hit as JSON: modality and source by name, the study date as YYYY-MM-DD, its thumbnail's path."""
    uids = (hit.study_instance_uid, hit.series_instance_uid, hit.sop_instance_uid)
    return {
        "sop_instance_uid": hit.sop_instance_uid,
        "study_instance_uid": hit.study_instance_uid,
        "series_instance_uid": hit.series_instance_uid,
        "sop_class_uid": hit.sop_class_uid,
        "modality": PB_TO_MODALITY.get(hit.modality),
        "modality_code": hit.modality_code,
        "frame_number": hit.frame_number,
        "distance": round(float(hit.distance), 6),
        "finding": hit.finding or None,
        "source": PB_TO_SOURCE.get(hit.source),
        "matching_instances": hit.matching_instances,
        "study_date": iso_date(hit.study_date),
        "rendered": rendered_path(*uids, root) if all(map(is_valid_uid, uids)) else None,
    }


def search_json(response: search_pb2.SearchSimilarResponse, root: str = "") -> dict[str, Any]:
    """A search's answer as JSON."""
    return {
        "hits": [hit_json(hit, root) for hit in response.hits],
        "model_version": response.model_version,
        "query_modality": PB_TO_MODALITY.get(response.query_modality),
        "next_offset": response.next_offset or None,
        "excluded_self": response.excluded_self,
        "searched_modalities": [
            PB_TO_MODALITY[m] for m in response.searched_modalities if m in PB_TO_MODALITY
        ],
    }


def stats_json(stats: search_pb2.GetIndexStatsResponse) -> dict[str, Any]:
    """Index statistics as JSON (modalities by name)."""
    return {
        "total": stats.total,
        "per_modality": {PB_TO_MODALITY.get(m.modality, "unspecified"): m.count for m in stats.per_modality},
        "quarantined": stats.quarantined,
        "quarantine_reasons": {r.reason: r.count for r in stats.quarantine_reasons},
        "pending": stats.pending,
        "oldest_pending_age_s": stats.oldest_pending_age_s,
        "model_version": stats.model_version,
        "collection": stats.collection,
        "library": stats.library,
        "library_findings": [
            {
                "modality": PB_TO_MODALITY.get(f.modality, "unspecified"),
                "finding": f.finding,
                "count": f.count,
            }
            for f in stats.library_findings
        ],
    }
