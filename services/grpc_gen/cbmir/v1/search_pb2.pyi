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
MODALITY_UNSPECIFIED: Modality
MODALITY_XRAY: Modality
MODALITY_MRI: Modality
MODALITY_OCT: Modality
MODALITY_EEG: Modality
MODALITY_OTHER: Modality

class EncodedImage(_message.Message):
    __slots__ = ("data", "modality")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    modality: Modality
    def __init__(self, data: _Optional[bytes] = ..., modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

class SearchSimilarRequest(_message.Message):
    __slots__ = ("dicom", "image", "sop_instance_uid", "k", "modalities", "exclude_same_study")
    DICOM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_SAME_STUDY_FIELD_NUMBER: _ClassVar[int]
    dicom: bytes
    image: EncodedImage
    sop_instance_uid: str
    k: int
    modalities: _containers.RepeatedScalarFieldContainer[Modality]
    exclude_same_study: bool
    def __init__(self, dicom: _Optional[bytes] = ..., image: _Optional[_Union[EncodedImage, _Mapping]] = ..., sop_instance_uid: _Optional[str] = ..., k: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., exclude_same_study: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "sop_class_uid", "modality", "modality_code", "frame_number", "distance")
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    MODALITY_CODE_FIELD_NUMBER: _ClassVar[int]
    FRAME_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: Modality
    modality_code: str
    frame_number: int
    distance: float
    def __init__(self, sop_instance_uid: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_class_uid: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., modality_code: _Optional[str] = ..., frame_number: _Optional[int] = ..., distance: _Optional[float] = ...) -> None: ...

class SearchSimilarResponse(_message.Message):
    __slots__ = ("hits", "model_version", "query_modality")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUERY_MODALITY_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    model_version: str
    query_modality: Modality
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., model_version: _Optional[str] = ..., query_modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

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
    __slots__ = ("total", "per_modality", "quarantined", "quarantine_reasons", "model_version", "collection", "pending", "oldest_pending_age_s")
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PER_MODALITY_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_REASONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_S_FIELD_NUMBER: _ClassVar[int]
    total: int
    per_modality: _containers.RepeatedCompositeFieldContainer[ModalityCount]
    quarantined: int
    quarantine_reasons: _containers.RepeatedCompositeFieldContainer[QuarantineReason]
    model_version: str
    collection: str
    pending: int
    oldest_pending_age_s: float
    def __init__(self, total: _Optional[int] = ..., per_modality: _Optional[_Iterable[_Union[ModalityCount, _Mapping]]] = ..., quarantined: _Optional[int] = ..., quarantine_reasons: _Optional[_Iterable[_Union[QuarantineReason, _Mapping]]] = ..., model_version: _Optional[str] = ..., collection: _Optional[str] = ..., pending: _Optional[int] = ..., oldest_pending_age_s: _Optional[float] = ...) -> None: ...
