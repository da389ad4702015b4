from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PickRequest(_message.Message):
    __slots__ = ("model", "prompt", "body", "path", "headers", "subset", "request_id")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    body: bytes
    path: str
    headers: _containers.ScalarMap[str, str]
    subset: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., body: _Optional[bytes] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., subset: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class PickResponse(_message.Message):
    __slots__ = ("endpoint", "endpoint_name", "target_model", "request_id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    endpoint_name: str
    target_model: str
    request_id: str
    def __init__(self, endpoint: _Optional[str] = ..., endpoint_name: _Optional[str] = ..., target_model: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FilterStep(_message.Message):
    __slots__ = ("name", "type", "survivors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    survivors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., survivors: _Optional[_Iterable[str]] = ...) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("name", "type", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("endpoint_name", "endpoint", "raw", "weighted", "total")
    class RawEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class WeightedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    endpoint_name: str
    endpoint: str
    raw: _containers.ScalarMap[str, float]
    weighted: _containers.ScalarMap[str, float]
    total: float
    def __init__(self, endpoint_name: _Optional[str] = ..., endpoint: _Optional[str] = ..., raw: _Optional[_Mapping[str, float]] = ..., weighted: _Optional[_Mapping[str, float]] = ..., total: _Optional[float] = ...) -> None: ...

class ProfileExplanation(_message.Message):
    __slots__ = ("profile", "candidates", "filters", "scorers", "scores", "picker", "picked", "error")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PICKER_FIELD_NUMBER: _ClassVar[int]
    PICKED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    profile: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    filters: _containers.RepeatedCompositeFieldContainer[FilterStep]
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerInfo]
    scores: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    picker: str
    picked: str
    error: str
    def __init__(self, profile: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ..., filters: _Optional[_Iterable[_Union[FilterStep, _Mapping]]] = ..., scorers: _Optional[_Iterable[_Union[ScorerInfo, _Mapping]]] = ..., scores: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., picker: _Optional[str] = ..., picked: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("primary_profile", "profiles", "picked", "ejected")
    PRIMARY_PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    PICKED_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    primary_profile: str
    profiles: _containers.RepeatedCompositeFieldContainer[ProfileExplanation]
    picked: str
    ejected: _containers.RepeatedCompositeFieldContainer[EjectedEndpoint]
    def __init__(self, primary_profile: _Optional[str] = ..., profiles: _Optional[_Iterable[_Union[ProfileExplanation, _Mapping]]] = ..., picked: _Optional[str] = ..., ejected: _Optional[_Iterable[_Union[EjectedEndpoint, _Mapping]]] = ...) -> None: ...

class EjectedEndpoint(_message.Message):
    __slots__ = ("endpoint_name", "reason", "cooldown_left_seconds")
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_LEFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    endpoint_name: str
    reason: str
    cooldown_left_seconds: float
    def __init__(self, endpoint_name: _Optional[str] = ..., reason: _Optional[str] = ..., cooldown_left_seconds: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("pick", "explanation")
    PICK_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    pick: PickResponse
    explanation: Explanation
    def __init__(self, pick: _Optional[_Union[PickResponse, _Mapping]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...
