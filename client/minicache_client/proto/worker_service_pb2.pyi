from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Residency(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIDENCY_UNSPECIFIED: _ClassVar[Residency]
    RESIDENCY_LOCAL: _ClassVar[Residency]
    RESIDENCY_REMOTE: _ClassVar[Residency]
RESIDENCY_UNSPECIFIED: Residency
RESIDENCY_LOCAL: Residency
RESIDENCY_REMOTE: Residency

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "history_tokens", "user_message", "new_tokens", "max_new_tokens", "policy", "residency")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    history_tokens: _containers.RepeatedScalarFieldContainer[int]
    user_message: str
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    policy: str
    residency: Residency
    def __init__(self, session_id: _Optional[str] = ..., history_tokens: _Optional[_Iterable[int]] = ..., user_message: _Optional[str] = ..., new_tokens: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., policy: _Optional[str] = ..., residency: _Optional[_Union[Residency, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "summary")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    summary: TurnSummary
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., summary: _Optional[_Union[TurnSummary, _Mapping]] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("token_id", "text")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class TurnSummary(_message.Message):
    __slots__ = ("turn_tokens", "cached_tokens", "prefilled_tokens", "generated_tokens", "time_to_first_token_s", "decode_tokens_per_s", "recompute_reason", "stored", "residency")
    TURN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_REASON_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    turn_tokens: _containers.RepeatedScalarFieldContainer[int]
    cached_tokens: int
    prefilled_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    recompute_reason: str
    stored: bool
    residency: Residency
    def __init__(self, turn_tokens: _Optional[_Iterable[int]] = ..., cached_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., time_to_first_token_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., recompute_reason: _Optional[str] = ..., stored: _Optional[bool] = ..., residency: _Optional[_Union[Residency, str]] = ...) -> None: ...
