from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetCardRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GuideField(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class GuideCard(_message.Message):
    __slots__ = ("model_name", "model_version", "fields", "embedding_sha256", "diffusion_steps", "schedule", "seq_len", "embed_dim")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SHA256_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    fields: _containers.RepeatedCompositeFieldContainer[GuideField]
    embedding_sha256: str
    diffusion_steps: int
    schedule: str
    seq_len: int
    embed_dim: int
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[GuideField, _Mapping]]] = ..., embedding_sha256: _Optional[str] = ..., diffusion_steps: _Optional[int] = ..., schedule: _Optional[str] = ..., seq_len: _Optional[int] = ..., embed_dim: _Optional[int] = ...) -> None: ...
