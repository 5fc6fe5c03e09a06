"""Turning a decoded instance into index points: the one definition of the payload.

Shared by the workers (live ingest) and ``cbmir reindex`` (re-embedding the archive). The payload
is PHI-free by construction: it is built only from the header's UIDs and codes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from models.preprocess import PreprocessContract, to_model_input
from services.dicom.decode import DecodedFrame, InstanceHeader
from services.index import IndexPoint, point_id


def model_inputs(frames: Sequence[DecodedFrame], contract: PreprocessContract) -> np.ndarray:
    """The encoder's input batch for the frames, through the one preprocessing function."""
    return np.stack([to_model_input(frame.image, contract) for frame in frames])


def index_points(
    header: InstanceHeader,
    frames: Sequence[DecodedFrame],
    vectors: np.ndarray,
    *,
    model_version: str,
    spool_name: str,
    ingested_at: float | None = None,
) -> list[IndexPoint]:
    """One point per embedded frame; the point ID is uuid5 of the SOP Instance UID (plus the frame
    number for the second and later frames of an object embedded frame by frame)."""
    now = time.time() if ingested_at is None else ingested_at
    multi = len(frames) > 1
    points = []
    for frame, vector in zip(frames, vectors, strict=True):
        payload = {
            "modality": header.modality,
            "modality_code": header.modality_code,
            "study_instance_uid": header.study_instance_uid,
            "series_instance_uid": header.series_instance_uid,
            "sop_instance_uid": header.sop_instance_uid,
            "sop_class_uid": header.sop_class_uid,
            "frame_number": int(frame.frame_number),
            "model_version": model_version,
            "ingested_at": now,
            "spool_name": spool_name,
        }
        frame_key = frame.frame_number if multi and frame.frame_number > 1 else None
        points.append(IndexPoint(point_id(header.sop_instance_uid, frame_key), vector.tolist(), payload))
    return points
