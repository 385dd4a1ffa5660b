from ringserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "targets", "strategy", "ttft_slo_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    targets: _containers.RepeatedCompositeFieldContainer[_common_pb2.KVTarget]
    strategy: str
    ttft_slo_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[_common_pb2.KVTarget, _Mapping]]] = ..., strategy: _Optional[str] = ..., ttft_slo_seconds: _Optional[float] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token", "strategy", "compute_seconds", "transfer_seconds", "bytes_transferred", "cached_prompt_tokens", "queued_seconds", "passes")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    strategy: str
    compute_seconds: float
    transfer_seconds: float
    bytes_transferred: int
    cached_prompt_tokens: int
    queued_seconds: float
    passes: int
    def __init__(self, first_token: _Optional[int] = ..., strategy: _Optional[str] = ..., compute_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., bytes_transferred: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., queued_seconds: _Optional[float] = ..., passes: _Optional[int] = ...) -> None: ...

class GetPrefillInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPrefillInfoResponse(_message.Message):
    __slots__ = ("model", "cp_size", "transport", "active_requests", "kv_blocks_used", "kv_blocks_free", "prefix_cache", "tp_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelDescription
    cp_size: int
    transport: str
    active_requests: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache: PrefixCacheInfo
    tp_size: int
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelDescription, _Mapping]] = ..., cp_size: _Optional[int] = ..., transport: _Optional[str] = ..., active_requests: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., prefix_cache: _Optional[_Union[PrefixCacheInfo, _Mapping]] = ..., tp_size: _Optional[int] = ...) -> None: ...

class PrefixCacheInfo(_message.Message):
    __slots__ = ("blocks", "capacity_blocks", "lookups", "hits", "cached_prompt_tokens")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    capacity_blocks: int
    lookups: int
    hits: int
    cached_prompt_tokens: int
    def __init__(self, blocks: _Optional[_Iterable[int]] = ..., capacity_blocks: _Optional[int] = ..., lookups: _Optional[int] = ..., hits: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...
