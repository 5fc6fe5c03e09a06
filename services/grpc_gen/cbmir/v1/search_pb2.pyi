from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_XRAY: _ClassVar[Modality]
    MODALITY_MRI: _ClassVar[Modality]
    MODALITY_OCT: _ClassVar[Modality]
    MODALITY_EEG: _ClassVar[Modality]
    MODALITY_OTHER: _ClassVar[Modality]

class GroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_BY_INSTANCE: _ClassVar[GroupBy]
    GROUP_BY_STUDY: _ClassVar[GroupBy]

class CaseSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CASE_SOURCE_ANY: _ClassVar[CaseSource]
    CASE_SOURCE_LIBRARY: _ClassVar[CaseSource]
    CASE_SOURCE_CLINICAL: _ClassVar[CaseSource]
MODALITY_UNSPECIFIED: Modality
MODALITY_XRAY: Modality
MODALITY_MRI: Modality
MODALITY_OCT: Modality
MODALITY_EEG: Modality
MODALITY_OTHER: Modality
GROUP_BY_INSTANCE: GroupBy
GROUP_BY_STUDY: GroupBy
CASE_SOURCE_ANY: CaseSource
CASE_SOURCE_LIBRARY: CaseSource
CASE_SOURCE_CLINICAL: CaseSource

class EncodedImage(_message.Message):
    __slots__ = ("data", "modality")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    modality: Modality
    def __init__(self, data: _Optional[bytes] = ..., modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

class SearchSimilarRequest(_message.Message):
    __slots__ = ("dicom", "image", "sop_instance_uid", "k", "modalities", "exclude_same_study", "exclude_self", "exclude_same_patient", "group_by", "max_distance", "offset", "source")
    DICOM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SAME_STUDY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SELF_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SAME_PATIENT_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    MAX_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    dicom: bytes
    image: EncodedImage
    sop_instance_uid: str
    k: int
    modalities: _containers.RepeatedScalarFieldContainer[Modality]
    exclude_same_study: bool
    exclude_self: bool
    exclude_same_patient: bool
    group_by: GroupBy
    max_distance: float
    offset: int
    source: CaseSource
    def __init__(self, dicom: _Optional[bytes] = ..., image: _Optional[_Union[EncodedImage, _Mapping]] = ..., sop_instance_uid: _Optional[str] = ..., k: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., exclude_same_study: _Optional[bool] = ..., exclude_self: _Optional[bool] = ..., exclude_same_patient: _Optional[bool] = ..., group_by: _Optional[_Union[GroupBy, str]] = ..., max_distance: _Optional[float] = ..., offset: _Optional[int] = ..., source: _Optional[_Union[CaseSource, str]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "sop_class_uid", "modality", "modality_code", "frame_number", "distance", "finding", "source", "matching_instances", "study_date")
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    MODALITY_CODE_FIELD_NUMBER: _ClassVar[int]
    FRAME_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MATCHING_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    STUDY_DATE_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: Modality
    modality_code: str
    frame_number: int
    distance: float
    finding: str
    source: CaseSource
    matching_instances: int
    study_date: str
    def __init__(self, sop_instance_uid: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_class_uid: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., modality_code: _Optional[str] = ..., frame_number: _Optional[int] = ..., distance: _Optional[float] = ..., finding: _Optional[str] = ..., source: _Optional[_Union[CaseSource, str]] = ..., matching_instances: _Optional[int] = ..., study_date: _Optional[str] = ...) -> None: ...

class SearchSimilarResponse(_message.Message):
    __slots__ = ("hits", "model_version", "query_modality", "next_offset", "excluded_self", "searched_modalities")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUERY_MODALITY_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_SELF_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    model_version: str
    query_modality: Modality
    next_offset: int
    excluded_self: bool
    searched_modalities: _containers.RepeatedScalarFieldContainer[Modality]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., model_version: _Optional[str] = ..., query_modality: _Optional[_Union[Modality, str]] = ..., next_offset: _Optional[int] = ..., excluded_self: _Optional[bool] = ..., searched_modalities: _Optional[_Iterable[_Union[Modality, str]]] = ...) -> None: ...

class RenderInstanceRequest(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "max_size")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    max_size: int
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., max_size: _Optional[int] = ...) -> None: ...

class RenderedInstance(_message.Message):
    __slots__ = ("png", "etag", "width", "height")
    PNG_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    etag: str
    width: int
    height: int
    def __init__(self, png: _Optional[bytes] = ..., etag: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GetIndexStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModalityCount(_message.Message):
    __slots__ = ("modality", "count")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    count: int
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., count: _Optional[int] = ...) -> None: ...

class QuarantineReason(_message.Message):
    __slots__ = ("reason", "count")
    REASON_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    count: int
    def __init__(self, reason: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class GetIndexStatsResponse(_message.Message):
    __slots__ = ("total", "per_modality", "quarantined", "quarantine_reasons", "model_version", "collection", "pending", "oldest_pending_age_s", "library", "library_findings")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PER_MODALITY_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_REASONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FINDINGS_FIELD_NUMBER: _ClassVar[int]
    total: int
    per_modality: _containers.RepeatedCompositeFieldContainer[ModalityCount]
    quarantined: int
    quarantine_reasons: _containers.RepeatedCompositeFieldContainer[QuarantineReason]
    model_version: str
    collection: str
    pending: int
    oldest_pending_age_s: float
    library: int
    library_findings: _containers.RepeatedCompositeFieldContainer[FindingCount]
    def __init__(self, total: _Optional[int] = ..., per_modality: _Optional[_Iterable[_Union[ModalityCount, _Mapping]]] = ..., quarantined: _Optional[int] = ..., quarantine_reasons: _Optional[_Iterable[_Union[QuarantineReason, _Mapping]]] = ..., model_version: _Optional[str] = ..., collection: _Optional[str] = ..., pending: _Optional[int] = ..., oldest_pending_age_s: _Optional[float] = ..., library: _Optional[int] = ..., library_findings: _Optional[_Iterable[_Union[FindingCount, _Mapping]]] = ...) -> None: ...

class GetCallerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Caller(_message.Message):
    __slots__ = ("token_id", "role")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    role: str
    def __init__(self, token_id: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class FindingCount(_message.Message):
    __slots__ = ("modality", "finding", "count")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    FINDING_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    finding: str
    count: int
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., finding: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...
