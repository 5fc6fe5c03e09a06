from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IndexedPoint(_message.Message):
    __slots__ = ("point_id", "vector", "payload_json")
    POINT_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    point_id: str
    vector: _containers.RepeatedScalarFieldContainer[float]
    payload_json: str
    def __init__(self, point_id: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., payload_json: _Optional[str] = ...) -> None: ...

class UpsertPointsRequest(_message.Message):
    __slots__ = ("points", "model_version")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[IndexedPoint]
    model_version: str
    def __init__(self, points: _Optional[_Iterable[_Union[IndexedPoint, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class UpsertPointsResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...
