"""Turning a decoded instance into index points: the one definition of the payload.

Shared by the workers (live ingest) and ``cbmir reindex`` (re-embedding the archive). The payload
is PHI-free by construction: it is built only from the header's UIDs and codes.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

import numpy as np

from models.preprocess import PreprocessContract, to_model_input
from services.core.errors import InvalidInput
from services.core.patients import PATIENT_KEY_PATTERN
from services.core.vocabulary import DICOM_MODALITY_TERMS, FINDING_PATTERN, MODALITIES, is_valid_uid
from services.dicom.decode import STUDY_DATE, DecodedFrame, InstanceHeader
from services.index import LIBRARY, IndexPoint, point_id


def model_inputs(frames: Sequence[DecodedFrame], contract: PreprocessContract) -> np.ndarray:
    """The encoder's input batch for the frames, through the one preprocessing function."""
    return np.stack([to_model_input(frame.image, contract) for frame in frames])


def index_points(
    header: InstanceHeader,
    frame_numbers: Sequence[int],
    vectors: np.ndarray,
    *,
    model_version: str,
    spool_name: str,
    ingested_at: float | None = None,
    finding: str | None = None,
) -> list[IndexPoint]:
    """One point per embedded frame (``frame_numbers``: 1-based, one per row of ``vectors``); the
    point ID is uuid5 of the SOP Instance UID (plus the frame number for the second and later
    frames of an object embedded frame by frame). ``finding``: the instance is in the reference
    library with this verified finding (``source`` = library)."""
    now = time.time() if ingested_at is None else ingested_at
    multi = len(frame_numbers) > 1
    points = []
    for frame_number, vector in zip(frame_numbers, vectors, strict=True):
        payload = {
            "modality": header.modality,
            "modality_code": header.modality_code,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "frame_number": int(frame_number),
            "model_version": model_version,
            "ingested_at": now,
            "spool_name": spool_name,
        }
        if header.patient_key:
            payload["patient_key"] = header.patient_key
        if header.study_date:
            payload["study_date"] = header.study_date
        if finding:
            payload["finding"] = finding
            payload["source"] = LIBRARY
        frame_key = frame_number if multi and frame_number > 1 else None
        points.append(IndexPoint(point_id(header.sop_instance_uid, frame_key), vector.tolist(), payload))
    return points


# The payload schema: key -> (type, required). Nothing else may be stored with a point.
PAYLOAD_FIELDS: dict[str, tuple[type, bool]] = {
    "modality": (str, True),
    "sop_instance_uid": (str, True),
    "study_instance_uid": (str, True),
    "series_instance_uid": (str, True),
    "sop_class_uid": (str, True),
    "frame_number": (int, True),
    "modality_code": (str, False),
    "model_version": (str, False),
    "ingested_at": (float, False),
    "spool_name": (str, False),
    "patient_key": (str, False),
    "study_date": (str, False),
    "finding": (str, False),
    "source": (str, False),
}
MAX_FRAME_NUMBER = 2**32 - 1  # a Hit's frame_number is a uint32
_UID_FIELDS = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "sop_class_uid")
# a spool file's name: its SOP Instance UID, or "x" and a hash when that is not a valid UID
_SPOOL_NAME = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)*|x[0-9a-f]{40})\.[a-z0-9]{1,8}$")


def check_point(point: IndexPoint, dim: int) -> None:
    """Refuse (InvalidInput) a point that the index must never hold: a vector of another length or
    with NaN/infinite values, a payload key outside :data:`PAYLOAD_FIELDS` (which is how PHI would
    get in), a malformed value, or a point ID that is not the one of its SOP Instance UID and frame
    (which is how one instance would overwrite another's point)."""
    vector = np.asarray(point.vector, dtype=np.float64)
    if vector.shape != (dim,):
        raise InvalidInput(f"point {point.point_id}: vector of {vector.size} values, the index holds {dim}")
    if not np.isfinite(vector).all():
        raise InvalidInput(f"point {point.point_id}: the vector has NaN or infinite values")
    payload = point.payload
    if not isinstance(payload, dict):
        raise InvalidInput(f"point {point.point_id}: the payload is not an object")
    unknown = sorted(set(payload) - set(PAYLOAD_FIELDS))
    if unknown:
        raise InvalidInput(f"point {point.point_id}: payload keys outside the schema: {unknown[:5]}")
    for key, (kind, required) in PAYLOAD_FIELDS.items():
        if key not in payload:
            if required:
                raise InvalidInput(f"point {point.point_id}: payload lacks {key}")
            continue
        value = payload[key]
        valid = (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is float
            else (isinstance(value, kind) and not isinstance(value, bool))
        )
        if (
            not valid
            or (isinstance(value, str) and len(value) > 128)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise InvalidInput(f"point {point.point_id}: payload {key} is not a valid {kind.__name__}")
    for key in _UID_FIELDS:
        if not is_valid_uid(payload[key]):
            raise InvalidInput(f"point {point.point_id}: payload {key} is not a DICOM UID")
    if payload.get("modality_code", "") not in DICOM_MODALITY_TERMS | {""}:
        raise InvalidInput(f"point {point.point_id}: payload modality_code is not a DICOM Modality term")
    if "patient_key" in payload and not PATIENT_KEY_PATTERN.match(payload["patient_key"]):
        raise InvalidInput(f"point {point.point_id}: payload patient_key is not a keyed patient reference")
    if "study_date" in payload and not STUDY_DATE.match(payload["study_date"]):
        raise InvalidInput(f"point {point.point_id}: payload study_date is not a DICOM date (YYYYMMDD)")
    if "finding" in payload and not FINDING_PATTERN.match(payload["finding"]):
        raise InvalidInput(f"point {point.point_id}: payload finding is not a finding label")
    if payload.get("source", LIBRARY) != LIBRARY or ("source" in payload) != ("finding" in payload):
        raise InvalidInput(f"point {point.point_id}: payload source must be {LIBRARY}, with a finding")
    if not _SPOOL_NAME.match(payload.get("spool_name", "0.dcm")):
        raise InvalidInput(f"point {point.point_id}: payload spool_name is not a spool file name")
    if payload["modality"] not in MODALITIES:
        raise InvalidInput(f"point {point.point_id}: payload modality must be one of {', '.join(MODALITIES)}")
    frame = payload["frame_number"]
    if not 1 <= frame <= MAX_FRAME_NUMBER:
        raise InvalidInput(f"point {point.point_id}: payload frame_number must be 1 to {MAX_FRAME_NUMBER}")
    uid = payload["sop_instance_uid"]
    if point.point_id not in (point_id(uid), point_id(uid, frame)):
        raise InvalidInput(f"point {point.point_id}: the point ID is not the one of its SOP Instance UID")
