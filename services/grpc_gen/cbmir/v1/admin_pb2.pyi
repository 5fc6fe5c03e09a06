from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeleteInstancesRequest(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "patient_key")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    patient_key: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., patient_key: _Optional[str] = ...) -> None: ...

class DeleteInstancesResponse(_message.Message):
    __slots__ = ("points_deleted", "archived_deleted", "quarantined_deleted", "pending_deleted", "sop_instance_uids", "unexamined")
    POINTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_DELETED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_DELETED_FIELD_NUMBER: _ClassVar[int]
    PENDING_DELETED_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UIDS_FIELD_NUMBER: _ClassVar[int]
    UNEXAMINED_FIELD_NUMBER: _ClassVar[int]
    points_deleted: int
    archived_deleted: int
    quarantined_deleted: int
    pending_deleted: int
    sop_instance_uids: _containers.RepeatedScalarFieldContainer[str]
    unexamined: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, points_deleted: _Optional[int] = ..., archived_deleted: _Optional[int] = ..., quarantined_deleted: _Optional[int] = ..., pending_deleted: _Optional[int] = ..., sop_instance_uids: _Optional[_Iterable[str]] = ..., unexamined: _Optional[_Iterable[str]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("repair", "max_listed")
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    MAX_LISTED_FIELD_NUMBER: _ClassVar[int]
    repair: bool
    max_listed: int
    def __init__(self, repair: _Optional[bool] = ..., max_listed: _Optional[int] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("archived", "points", "missing_count", "missing", "orphan_count", "orphans", "other_version_count", "other_version", "model_version", "resent", "orphans_deleted", "seconds")
    ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    OTHER_VERSION_COUNT_FIELD_NUMBER: _ClassVar[int]
    OTHER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESENT_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_DELETED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    archived: int
    points: int
    missing_count: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    orphan_count: int
    orphans: _containers.RepeatedScalarFieldContainer[str]
    other_version_count: int
    other_version: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    resent: int
    orphans_deleted: int
    seconds: float
    def __init__(self, archived: _Optional[int] = ..., points: _Optional[int] = ..., missing_count: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ..., orphan_count: _Optional[int] = ..., orphans: _Optional[_Iterable[str]] = ..., other_version_count: _Optional[int] = ..., other_version: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., resent: _Optional[int] = ..., orphans_deleted: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class QuarantinedObject(_message.Message):
    __slots__ = ("name", "reason", "detail", "stage", "quarantined_at", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    detail: str
    stage: str
    quarantined_at: float
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., stage: _Optional[str] = ..., quarantined_at: _Optional[float] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class QuarantineSelection(_message.Message):
    __slots__ = ("reason", "older_than_s", "names")
    REASON_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_S_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    reason: str
    older_than_s: float
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, reason: _Optional[str] = ..., older_than_s: _Optional[float] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListQuarantineRequest(_message.Message):
    __slots__ = ("selection", "limit")
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    selection: QuarantineSelection
    limit: int
    def __init__(self, selection: _Optional[_Union[QuarantineSelection, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListQuarantineResponse(_message.Message):
    __slots__ = ("objects", "total")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[QuarantinedObject]
    total: int
    def __init__(self, objects: _Optional[_Iterable[_Union[QuarantinedObject, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class ShowQuarantinedRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ShowQuarantinedResponse(_message.Message):
    __slots__ = ("object", "header", "header_error")
    class HeaderEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    HEADER_ERROR_FIELD_NUMBER: _ClassVar[int]
    object: QuarantinedObject
    header: _containers.ScalarMap[str, str]
    header_error: str
    def __init__(self, object: _Optional[_Union[QuarantinedObject, _Mapping]] = ..., header: _Optional[_Mapping[str, str]] = ..., header_error: _Optional[str] = ...) -> None: ...

class RequeueQuarantinedRequest(_message.Message):
    __slots__ = ("selection",)
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    selection: QuarantineSelection
    def __init__(self, selection: _Optional[_Union[QuarantineSelection, _Mapping]] = ...) -> None: ...

class RequeueQuarantinedResponse(_message.Message):
    __slots__ = ("requeued", "left")
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    requeued: int
    left: int
    def __init__(self, requeued: _Optional[int] = ..., left: _Optional[int] = ...) -> None: ...

class PurgeQuarantineRequest(_message.Message):
    __slots__ = ("selection",)
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    selection: QuarantineSelection
    def __init__(self, selection: _Optional[_Union[QuarantineSelection, _Mapping]] = ...) -> None: ...

class PurgeQuarantineResponse(_message.Message):
    __slots__ = ("purged",)
    PURGED_FIELD_NUMBER: _ClassVar[int]
    purged: int
    def __init__(self, purged: _Optional[int] = ...) -> None: ...

class StartReindexRequest(_message.Message):
    __slots__ = ("drop_old",)
    DROP_OLD_FIELD_NUMBER: _ClassVar[int]
    drop_old: bool
    def __init__(self, drop_old: _Optional[bool] = ...) -> None: ...

class GetReindexStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReindexStatus(_message.Message):
    __slots__ = ("state", "target", "previous", "model_version", "done", "total", "failed", "passes", "error", "dropped", "started_at", "finished_at", "running")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    state: str
    target: str
    previous: str
    model_version: str
    done: int
    total: int
    failed: int
    passes: int
    error: str
    dropped: _containers.RepeatedScalarFieldContainer[str]
    started_at: float
    finished_at: float
    running: bool
    def __init__(self, state: _Optional[str] = ..., target: _Optional[str] = ..., previous: _Optional[str] = ..., model_version: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., failed: _Optional[int] = ..., passes: _Optional[int] = ..., error: _Optional[str] = ..., dropped: _Optional[_Iterable[str]] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., running: _Optional[bool] = ...) -> None: ...
