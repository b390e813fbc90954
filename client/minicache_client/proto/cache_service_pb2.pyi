from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]

class WireForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_FORM_UNSPECIFIED: _ClassVar[WireForm]
    WIRE_FORM_RESTORED: _ClassVar[WireForm]
    WIRE_FORM_COMPRESSED: _ClassVar[WireForm]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
WIRE_FORM_UNSPECIFIED: WireForm
WIRE_FORM_RESTORED: WireForm
WIRE_FORM_COMPRESSED: WireForm

class SequenceRef(_message.Message):
    __slots__ = ("model_id", "sequence_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    sequence_id: str
    def __init__(self, model_id: _Optional[str] = ..., sequence_id: _Optional[str] = ...) -> None: ...

class SequenceHeader(_message.Message):
    __slots__ = ("sequence", "num_layers", "kv_heads", "head_dim", "dtype", "start_token", "end_token", "policy", "seal", "tag")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    sequence: SequenceRef
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: DType
    start_token: int
    end_token: int
    policy: str
    seal: bool
    tag: bytes
    def __init__(self, sequence: _Optional[_Union[SequenceRef, _Mapping]] = ..., num_layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., start_token: _Optional[int] = ..., end_token: _Optional[int] = ..., policy: _Optional[str] = ..., seal: _Optional[bool] = ..., tag: _Optional[bytes] = ...) -> None: ...

class LayerChunk(_message.Message):
    __slots__ = ("layer", "token_offset", "tokens", "keys", "values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    token_offset: int
    tokens: int
    keys: bytes
    values: bytes
    def __init__(self, layer: _Optional[int] = ..., token_offset: _Optional[int] = ..., tokens: _Optional[int] = ..., keys: _Optional[bytes] = ..., values: _Optional[bytes] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SequenceHeader
    chunk: LayerChunk
    def __init__(self, header: _Optional[_Union[SequenceHeader, _Mapping]] = ..., chunk: _Optional[_Union[LayerChunk, _Mapping]] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("header", "layers")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    header: SequenceHeader
    layers: _containers.RepeatedCompositeFieldContainer[LayerChunk]
    def __init__(self, header: _Optional[_Union[SequenceHeader, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerChunk, _Mapping]]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("tokens", "stored_bytes", "fp16_bytes")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FP16_BYTES_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    stored_bytes: int
    fp16_bytes: int
    def __init__(self, tokens: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., fp16_bytes: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("sequence", "start_token", "end_token", "first_layer", "end_layer", "wire_form", "dtype")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    END_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    WIRE_FORM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    sequence: SequenceRef
    start_token: int
    end_token: int
    first_layer: int
    end_layer: int
    wire_form: WireForm
    dtype: DType
    def __init__(self, sequence: _Optional[_Union[SequenceRef, _Mapping]] = ..., start_token: _Optional[int] = ..., end_token: _Optional[int] = ..., first_layer: _Optional[int] = ..., end_layer: _Optional[int] = ..., wire_form: _Optional[_Union[WireForm, str]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class EntryChunk(_message.Message):
    __slots__ = ("layers", "total_bytes", "offset", "data")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    offset: int
    data: bytes
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("header", "chunk", "entry")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    header: SequenceHeader
    chunk: LayerChunk
    entry: EntryChunk
    def __init__(self, header: _Optional[_Union[SequenceHeader, _Mapping]] = ..., chunk: _Optional[_Union[LayerChunk, _Mapping]] = ..., entry: _Optional[_Union[EntryChunk, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: SequenceRef
    def __init__(self, sequence: _Optional[_Union[SequenceRef, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("header", "device_bytes", "overflow_bytes", "device_groups", "overflow_groups", "fp16_bytes")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_GROUPS_FIELD_NUMBER: _ClassVar[int]
    FP16_BYTES_FIELD_NUMBER: _ClassVar[int]
    header: SequenceHeader
    device_bytes: int
    overflow_bytes: int
    device_groups: int
    overflow_groups: int
    fp16_bytes: int
    def __init__(self, header: _Optional[_Union[SequenceHeader, _Mapping]] = ..., device_bytes: _Optional[int] = ..., overflow_bytes: _Optional[int] = ..., device_groups: _Optional[int] = ..., overflow_groups: _Optional[int] = ..., fp16_bytes: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: SequenceRef
    def __init__(self, sequence: _Optional[_Union[SequenceRef, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("sequences", "tokens", "device_bytes", "overflow_bytes", "fp16_bytes", "quota_bytes", "device_budget_bytes", "overflow_available")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    FP16_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERFLOW_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    sequences: int
    tokens: int
    device_bytes: int
    overflow_bytes: int
    fp16_bytes: int
    quota_bytes: int
    device_budget_bytes: int
    overflow_available: bool
    def __init__(self, sequences: _Optional[int] = ..., tokens: _Optional[int] = ..., device_bytes: _Optional[int] = ..., overflow_bytes: _Optional[int] = ..., fp16_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., device_budget_bytes: _Optional[int] = ..., overflow_available: _Optional[bool] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class GetArtifactResponse(_message.Message):
    __slots__ = ("data", "total_bytes", "offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    offset: int
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...
