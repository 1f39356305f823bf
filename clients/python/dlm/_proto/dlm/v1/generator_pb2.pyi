from dlm.v1 import guide_pb2 as _guide_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_DDPM: _ClassVar[Sampler]
    SAMPLER_DDIM: _ClassVar[Sampler]

class GuidanceUpdate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_UPDATE_UNSPECIFIED: _ClassVar[GuidanceUpdate]
    GUIDANCE_UPDATE_ADAGRAD: _ClassVar[GuidanceUpdate]
    GUIDANCE_UPDATE_SIGN: _ClassVar[GuidanceUpdate]
    GUIDANCE_UPDATE_NORMALIZED: _ClassVar[GuidanceUpdate]
    GUIDANCE_UPDATE_PROXIMAL: _ClassVar[GuidanceUpdate]

class GuidanceSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_SPACE_UNSPECIFIED: _ClassVar[GuidanceSpace]
    GUIDANCE_SPACE_LATENT: _ClassVar[GuidanceSpace]
    GUIDANCE_SPACE_ESTIMATE: _ClassVar[GuidanceSpace]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_DDPM: Sampler
SAMPLER_DDIM: Sampler
GUIDANCE_UPDATE_UNSPECIFIED: GuidanceUpdate
GUIDANCE_UPDATE_ADAGRAD: GuidanceUpdate
GUIDANCE_UPDATE_SIGN: GuidanceUpdate
GUIDANCE_UPDATE_NORMALIZED: GuidanceUpdate
GUIDANCE_UPDATE_PROXIMAL: GuidanceUpdate
GUIDANCE_SPACE_UNSPECIFIED: GuidanceSpace
GUIDANCE_SPACE_LATENT: GuidanceSpace
GUIDANCE_SPACE_ESTIMATE: GuidanceSpace

class SetGuideRequest(_message.Message):
    __slots__ = ("name", "url", "card_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    CARD_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    card_json: str
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., card_json: _Optional[str] = ...) -> None: ...

class RemoveGuideRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveGuideResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Control(_message.Message):
    __slots__ = ("guide", "targets", "weight")
    GUIDE_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    guide: str
    targets: _containers.RepeatedScalarFieldContainer[str]
    weight: float
    def __init__(self, guide: _Optional[str] = ..., targets: _Optional[_Iterable[str]] = ..., weight: _Optional[float] = ...) -> None: ...

class Infill(_message.Message):
    __slots__ = ("template",)
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    template: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, template: _Optional[_Iterable[str]] = ...) -> None: ...

class Syntax(_message.Message):
    __slots__ = ("pos", "spans", "weight")
    POS_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    pos: _containers.RepeatedScalarFieldContainer[str]
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    weight: float
    def __init__(self, pos: _Optional[_Iterable[str]] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., weight: _Optional[float] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end", "label")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    label: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class Guidance(_message.Message):
    __slots__ = ("steps_per_diffusion_step", "step_size", "update", "fluency_weight", "start_step", "stop_step", "satisfied_prob", "space", "estimate_until")
    STEPS_PER_DIFFUSION_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    FLUENCY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    STOP_STEP_FIELD_NUMBER: _ClassVar[int]
    SATISFIED_PROB_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_UNTIL_FIELD_NUMBER: _ClassVar[int]
    steps_per_diffusion_step: int
    step_size: float
    update: GuidanceUpdate
    fluency_weight: float
    start_step: int
    stop_step: int
    satisfied_prob: float
    space: GuidanceSpace
    estimate_until: int
    def __init__(self, steps_per_diffusion_step: _Optional[int] = ..., step_size: _Optional[float] = ..., update: _Optional[_Union[GuidanceUpdate, str]] = ..., fluency_weight: _Optional[float] = ..., start_step: _Optional[int] = ..., stop_step: _Optional[int] = ..., satisfied_prob: _Optional[float] = ..., space: _Optional[_Union[GuidanceSpace, str]] = ..., estimate_until: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("n", "steps", "sampler", "seed", "clamp", "controls", "length", "infill", "guidance", "progress_every", "best_of", "syntax", "clamp_repeat_penalty")
    N_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLAMP_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    INFILL_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVERY_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    SYNTAX_FIELD_NUMBER: _ClassVar[int]
    CLAMP_REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    n: int
    steps: int
    sampler: Sampler
    seed: int
    clamp: bool
    controls: _containers.RepeatedCompositeFieldContainer[Control]
    length: int
    infill: Infill
    guidance: Guidance
    progress_every: int
    best_of: int
    syntax: Syntax
    clamp_repeat_penalty: float
    def __init__(self, n: _Optional[int] = ..., steps: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., seed: _Optional[int] = ..., clamp: bool = ..., controls: _Optional[_Iterable[_Union[Control, _Mapping]]] = ..., length: _Optional[int] = ..., infill: _Optional[_Union[Infill, _Mapping]] = ..., guidance: _Optional[_Union[Guidance, _Mapping]] = ..., progress_every: _Optional[int] = ..., best_of: _Optional[int] = ..., syntax: _Optional[_Union[Syntax, _Mapping]] = ..., clamp_repeat_penalty: _Optional[float] = ...) -> None: ...

class GuideScore(_message.Message):
    __slots__ = ("guide", "log_prob")
    GUIDE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    guide: str
    log_prob: float
    def __init__(self, guide: _Optional[str] = ..., log_prob: _Optional[float] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("text", "tokens", "scores", "model_log_prob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedCompositeFieldContainer[GuideScore]
    model_log_prob: float
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[_Union[GuideScore, _Mapping]]] = ..., model_log_prob: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "sampling_ms", "guidance_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_MS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    sampling_ms: float
    guidance_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., sampling_ms: _Optional[float] = ..., guidance_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("samples", "seed", "timings", "request_id")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    seed: int
    timings: Timings
    request_id: int
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ..., seed: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "texts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "vocab_size", "embed_dim", "seq_len", "diffusion_steps", "schedule", "embedding_sha256", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SHA256_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    vocab_size: int
    embed_dim: int
    seq_len: int
    diffusion_steps: int
    schedule: str
    embedding_sha256: str
    device: str
    def __init__(self, name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., embed_dim: _Optional[int] = ..., seq_len: _Optional[int] = ..., diffusion_steps: _Optional[int] = ..., schedule: _Optional[str] = ..., embedding_sha256: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class GuideInfo(_message.Message):
    __slots__ = ("name", "endpoints", "fields", "ready")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    fields: _containers.RepeatedCompositeFieldContainer[_guide_pb2.GuideField]
    ready: bool
    def __init__(self, name: _Optional[str] = ..., endpoints: _Optional[_Iterable[str]] = ..., fields: _Optional[_Iterable[_Union[_guide_pb2.GuideField, _Mapping]]] = ..., ready: bool = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("model", "guides", "ready")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GUIDES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    guides: _containers.RepeatedCompositeFieldContainer[GuideInfo]
    ready: bool
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., guides: _Optional[_Iterable[_Union[GuideInfo, _Mapping]]] = ..., ready: bool = ...) -> None: ...
