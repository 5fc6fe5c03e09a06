"""The JSON of the HTTP API and its translation to and from ``cbmir.v1`` messages.

Names come from the shared vocabulary (modalities and sources, :mod:`services.core.vocabulary`) and
the proto's ``GroupBy`` enum, never written out here. Uploaded bytes are checked before they are
decoded: a base64 text's length against the byte budget, then the bytes' signature (a DICOM Part 10
file, PNG or JPEG) before the query service decodes them.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from services.core.answers import DEFAULT_K, MAX_K
from services.core.errors import InvalidInput
from services.core.vocabulary import (
    GROUP_BY_TO_PB,
    MODALITIES,
    MODALITY_TO_PB,
    SOURCE_TO_PB,
)
from services.gateway.errors import PayloadTooLarge, UnsupportedMediaType
from services.grpc_gen.cbmir.v1 import search_pb2

# a request may ask for either source ("any", CASE_SOURCE_ANY, which has no name in the vocabulary)
ANY_SOURCE = "any"
SOURCES: dict[str, int] = {ANY_SOURCE: search_pb2.CASE_SOURCE_ANY, **SOURCE_TO_PB}


def base64_length(size: int) -> int:
    """The length of ``size`` bytes in base64 (with padding)."""
    return 4 * math.ceil(size / 3)


def _whole(value: Any) -> Any:
    """JSON's 5.0 is the integer 5 (JSON Schema says so); 5.5 and "5" stay what they are."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_whole)]
FLOAT32_MAX = 3.4028234e38  # max_distance is a 32-bit float in the API
FLOAT32_TINY = 1.4e-45  # the smallest positive float32


class SearchQuery(BaseModel):
    """``POST /v1/search`` as JSON: exactly one of ``sop_instance_uid``, ``image_base64`` (with
    ``modality``) and ``dicom_base64``, and how to search."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "oneOf": [
                {"required": [key], "properties": {key: {"type": "string"}}}
                for key in ("sop_instance_uid", "image_base64", "dicom_base64")
            ]
        },
    )

    sop_instance_uid: str | None = Field(
        None, min_length=1, max_length=64, description="an indexed instance's SOP Instance UID"
    )
    image_base64: str | None = Field(None, description="a PNG or JPEG picture, base64")
    modality: str | None = Field(
        None,
        description="the modality the picture shows (with image_base64 only)",
        json_schema_extra={"enum": [*MODALITIES, None]},
    )
    dicom_base64: str | None = Field(None, description="a DICOM Part 10 file, base64")
    k: WholeNumber = Field(DEFAULT_K, ge=1, le=MAX_K, description="hits (or studies) per page")
    offset: WholeNumber = Field(
        0, ge=0, le=MAX_K - 1, description="paging: skip this many; offset + k <= 1000"
    )
    modalities: list[str] = Field(
        default_factory=list,
        max_length=len(MODALITIES),
        description=(
            "restrict hits to these modalities; empty: all that are comparable with the query (with one "
            "encoder per modality, those its encoder embeds; another encoder's modality is refused)"
        ),
        json_schema_extra={"items": {"type": "string", "enum": list(MODALITIES)}},
    )
    group_by: str = Field(
        "instance",
        description="one hit per image, or per study",
        json_schema_extra={"enum": list(GROUP_BY_TO_PB)},
    )
    exclude_same_patient: bool = Field(False, description="drop hits of the query's patient")
    exclude_same_study: bool = Field(False, description="drop hits of the query's study")
    exclude_self: bool | None = Field(
        None, description="drop the query's own instance (default: when the query is indexed)"
    )
    max_distance: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="drop hits farther; 0: none")
    source: str = Field(
        ANY_SOURCE,
        description="library cases, clinical ones, or any",
        json_schema_extra={"enum": list(SOURCES)},
    )

    @model_validator(mode="after")
    def _check(self) -> SearchQuery:
        for name in (self.modality, *self.modalities):
            if name is not None and name not in MODALITY_TO_PB:
                raise ValueError(f"unknown modality; one of {', '.join(MODALITIES)}")
        if self.group_by not in GROUP_BY_TO_PB:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY_TO_PB)}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
        if self.k + self.offset > MAX_K:
            raise ValueError(f"offset + k must be at most {MAX_K}")
        return self


def _signature(data: bytes) -> str | None:
    """``dicom``, ``png`` or ``jpeg`` by the bytes' signature; None for anything else."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


class Budget:
    """The byte budget of a query (``CBMIR_QUERY_MAX_BYTES``): of the file, its base64 text, and
    the whole request body (the base64 text plus room for the other fields)."""

    FIELDS_ROOM = 64 * 1024

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.max_base64 = base64_length(max_bytes)
        self.max_body = self.max_base64 + self.FIELDS_ROOM

    def check(self, size: int, what: str) -> None:
        """PayloadTooLarge when ``size`` bytes of ``what`` are over the file budget."""
        if size > self.max_bytes:
            raise PayloadTooLarge(f"{what} is {size} bytes; at most {self.max_bytes} are taken")

    def decode(self, text: str, what: str) -> bytes:
        """A base64 text's bytes; its length is checked before it is decoded."""
        if len(text) > self.max_base64:
            raise PayloadTooLarge(
                f"{what} is {len(text)} characters; at most {self.max_base64} "
                f"({self.max_bytes} bytes) are taken"
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{what} is not valid base64") from None
        self.check(len(data), what)
        return data


def search_request(
    query: SearchQuery, budget: Budget, upload: bytes | None = None
) -> search_pb2.SearchSimilarRequest:
    """The ``SearchSimilarRequest`` of a JSON query, or of a form's fields with its uploaded file."""
    given = [
        name
        for name, value in (
            ("sop_instance_uid", query.sop_instance_uid),
            ("image_base64", query.image_base64),
            ("dicom_base64", query.dicom_base64),
            ("file", upload),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise InvalidInput(
            "give exactly one query: sop_instance_uid, image_base64 (with modality), dicom_base64, "
            f"or a file; got {', '.join(given) or 'none'}"
        )
    request = search_pb2.SearchSimilarRequest(
        k=query.k,
        offset=query.offset,
        modalities=[MODALITY_TO_PB[name] for name in query.modalities],
        exclude_same_study=query.exclude_same_study,
        exclude_same_patient=query.exclude_same_patient,
        group_by=GROUP_BY_TO_PB[query.group_by],
        # a positive cut-off too small for float32 would become 0, which means "none": the smallest
        # positive float32 keeps it a cut-off
        max_distance=min(max(query.max_distance, FLOAT32_TINY), FLOAT32_MAX) if query.max_distance else 0.0,
        source=SOURCES[query.source],  # type: ignore[arg-type]  # a CaseSource value
    )
    if query.exclude_self is not None:
        request.exclude_self = query.exclude_self
    if query.sop_instance_uid is not None:
        _no_modality(query)
        request.sop_instance_uid = query.sop_instance_uid
        return request
    if query.dicom_base64 is not None:
        data = budget.decode(query.dicom_base64, "dicom_base64")
        if _signature(data) != "dicom":
            raise UnsupportedMediaType(
                "dicom_base64 is not a DICOM Part 10 file (no DICM prefix at byte 128)"
            )
        _no_modality(query)
        request.dicom = data
        return request
    if query.image_base64 is not None:
        data = budget.decode(query.image_base64, "image_base64")
        if _signature(data) not in ("png", "jpeg"):
            raise UnsupportedMediaType("image_base64 is neither a PNG nor a JPEG picture")
    else:
        assert upload is not None
        data = upload
        budget.check(len(data), "the file")
        kind = _signature(data)
        if kind is None:
            raise UnsupportedMediaType("the file is neither a DICOM Part 10 file nor a PNG or JPEG picture")
        if kind == "dicom":
            _no_modality(query)
            request.dicom = data
            return request
    if query.modality is None:
        raise InvalidInput(f"a PNG or JPEG query needs its modality: one of {', '.join(MODALITIES)}")
    request.image.data = data
    request.image.modality = MODALITY_TO_PB[query.modality]
    return request


def _no_modality(query: SearchQuery) -> None:
    if query.modality is not None:
        raise InvalidInput(
            "modality goes with a PNG or JPEG query only (DICOM and indexed UIDs carry theirs)"
        )


# --- multipart form fields ------------------------------------------------------------------------

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _form_bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise InvalidInput(f"{name} must be true or false")
    return value in _TRUE


def _form_number(name: str, text: str, kind: type[int] | type[float]) -> int | float:
    try:
        value = kind(text.strip())
    except ValueError:
        raise InvalidInput(f"{name} must be {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be finite")
    return value


FORM_FIELDS = {
    "sop_instance_uid": str,
    "modality": str,
    "k": int,
    "offset": int,
    "group_by": str,
    "exclude_same_patient": bool,
    "exclude_same_study": bool,
    "exclude_self": bool,
    "max_distance": float,
    "source": str,
}


def form_query(fields: list[tuple[str, str]]) -> dict[str, Any]:
    """A form's text fields as :class:`SearchQuery`'s fields (``modalities`` repeated, or
    comma-separated); an unknown or repeated field is INVALID_ARGUMENT."""
    values: dict[str, Any] = {}
    modalities: list[str] = []
    for name, text in fields:
        if name == "modalities":
            modalities += [m.strip() for m in text.split(",") if m.strip()]
            continue
        kind = FORM_FIELDS.get(name)
        if kind is None:
            raise InvalidInput(
                f"unknown form field; the fields are file, modalities, {', '.join(FORM_FIELDS)}"
            )
        if name in values:
            raise InvalidInput(f"form field {name} is given twice")
        if kind is bool:
            values[name] = _form_bool(name, text)
        elif kind in (int, float):
            values[name] = _form_number(name, text, kind)
        else:
            values[name] = text
    if modalities:
        values["modalities"] = modalities
    return values


# --- answers --------------------------------------------------------------------------------------


# --- response shapes, for the OpenAPI document ----------------------------------------------------


class HitModel(BaseModel):
    """One similar case."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str | None = Field(json_schema_extra={"enum": [*MODALITIES, None]})
    modality_code: str = Field(description="the DICOM Modality (CR, DX, MR, OPT, EEG, ...)")
    frame_number: int
    distance: float = Field(description="Euclidean distance to the query; smaller is more similar")
    finding: str | None = Field(description="the reference library's verified finding; null: none known")
    source: str | None = Field(description="library or clinical")
    matching_instances: int = Field(description="group_by study: the study's instances among the candidates")
    study_date: str | None = Field(description="YYYY-MM-DD")
    rendered: str | None = Field(description="path of the instance's PNG thumbnail on this gateway")


class SearchAnswer(BaseModel):
    """Similar cases, nearest first."""

    hits: list[HitModel]
    model_version: str
    query_modality: str | None
    next_offset: int | None = Field(description="the offset of the next page; null when there is none")
    excluded_self: bool
    searched_modalities: list[str] = Field(
        description=(
            "the modalities the hits were drawn from: the filter, or, with one encoder per modality, "
            "those of the query's own encoder; empty: every modality"
        )
    )


class FindingCountModel(BaseModel):
    """Reference-library instances with one finding."""

    modality: str
    finding: str
    count: int


class StatsAnswer(BaseModel):
    """What the index holds, and what waits or was quarantined."""

    total: int
    per_modality: dict[str, int]
    quarantined: int
    quarantine_reasons: dict[str, int]
    pending: int
    oldest_pending_age_s: float
    model_version: str
    collection: str
    library: int
    library_findings: list[FindingCountModel]


class HealthAnswer(BaseModel):
    """Whether the query service answers."""

    status: str = Field(json_schema_extra={"enum": ["serving", "not_serving"]})


class ErrorDetail(BaseModel):
    """What went wrong: a code name (gRPC status names, or PAYLOAD_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE,
    NOT_ACCEPTABLE) and a message."""

    code: str
    message: str


class ErrorAnswer(BaseModel):
    """Every error's body."""

    error: ErrorDetail
