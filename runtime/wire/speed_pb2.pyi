from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_EOS: _ClassVar[StopReason]
    STOP_REASON_LENGTH: _ClassVar[StopReason]
    STOP_REASON_STOP: _ClassVar[StopReason]
    STOP_REASON_CONTEXT: _ClassVar[StopReason]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_WAITING: _ClassVar[NodeState]
    NODE_STATE_SERVING: _ClassVar[NodeState]
    NODE_STATE_DOWN: _ClassVar[NodeState]
    NODE_STATE_LEFT: _ClassVar[NodeState]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_EOS: StopReason
STOP_REASON_LENGTH: StopReason
STOP_REASON_STOP: StopReason
STOP_REASON_CONTEXT: StopReason
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_WAITING: NodeState
NODE_STATE_SERVING: NodeState
NODE_STATE_DOWN: NodeState
NODE_STATE_LEFT: NodeState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("ticks", "committed", "flips_per_boundary", "flushed_steps", "mean_in_flight", "held_guesses")
    TICKS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    FLIPS_PER_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    HELD_GUESSES_FIELD_NUMBER: _ClassVar[int]
    ticks: int
    committed: int
    flips_per_boundary: _containers.RepeatedScalarFieldContainer[float]
    flushed_steps: int
    mean_in_flight: float
    held_guesses: int
    def __init__(self, ticks: _Optional[int] = ..., committed: _Optional[int] = ..., flips_per_boundary: _Optional[_Iterable[float]] = ..., flushed_steps: _Optional[int] = ..., mean_in_flight: _Optional[float] = ..., held_guesses: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "sampling", "speculative", "stop", "ignore_eos", "chat", "plain_guesses", "continuation", "guess_threshold", "window", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PLAIN_GUESSES_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    GUESS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    sampling: Sampling
    speculative: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    chat: bool
    plain_guesses: bool
    continuation: Continuation
    guess_threshold: float
    window: int
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., speculative: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., chat: _Optional[bool] = ..., plain_guesses: _Optional[bool] = ..., continuation: _Optional[_Union[Continuation, _Mapping]] = ..., guess_threshold: _Optional[float] = ..., window: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Continuation(_message.Message):
    __slots__ = ("token_ids", "text_chars")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_chars: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text_chars: _Optional[int] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("stop_reason", "text", "token_ids", "prompt_tokens", "time_to_first_token_ms", "tokens_per_s", "stats", "speculative", "provider", "backend")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    stop_reason: StopReason
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    time_to_first_token_ms: float
    tokens_per_s: float
    stats: Stats
    speculative: bool
    provider: str
    backend: str
    def __init__(self, stop_reason: _Optional[_Union[StopReason, str]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., time_to_first_token_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., speculative: _Optional[bool] = ..., provider: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("tokens", "finished")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    tokens: TokenChunk
    finished: Finished
    def __init__(self, tokens: _Optional[_Union[TokenChunk, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "address", "stages", "state", "provider", "threads", "last_heartbeat_s", "hosting", "sequences", "max_sequences", "step_ms", "positions_per_s", "pass_times", "head_ms", "memory_available_bytes", "links", "machine", "cores_used")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    HOSTING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PASS_TIMES_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CORES_USED_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    stages: _containers.RepeatedScalarFieldContainer[int]
    state: NodeState
    provider: str
    threads: int
    last_heartbeat_s: float
    hosting: _containers.RepeatedScalarFieldContainer[int]
    sequences: int
    max_sequences: int
    step_ms: float
    positions_per_s: float
    pass_times: _containers.RepeatedCompositeFieldContainer[PassTime]
    head_ms: float
    memory_available_bytes: int
    links: _containers.RepeatedCompositeFieldContainer[LinkTime]
    machine: Machine
    cores_used: float
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., stages: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[NodeState, str]] = ..., provider: _Optional[str] = ..., threads: _Optional[int] = ..., last_heartbeat_s: _Optional[float] = ..., hosting: _Optional[_Iterable[int]] = ..., sequences: _Optional[int] = ..., max_sequences: _Optional[int] = ..., step_ms: _Optional[float] = ..., positions_per_s: _Optional[float] = ..., pass_times: _Optional[_Iterable[_Union[PassTime, _Mapping]]] = ..., head_ms: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkTime, _Mapping]]] = ..., machine: _Optional[_Union[Machine, _Mapping]] = ..., cores_used: _Optional[float] = ...) -> None: ...

class ClusterStatusReply(_message.Message):
    __slots__ = ("cluster", "bundle_sha256", "serving", "nodes", "active_requests", "speculation", "queued_requests", "max_queue", "placement_settled", "placement", "flips", "alone_sequential_tokens_per_s", "alone_speculative_tokens_per_s")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_SETTLED_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    FLIPS_FIELD_NUMBER: _ClassVar[int]
    ALONE_SEQUENTIAL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ALONE_SPECULATIVE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    bundle_sha256: str
    serving: bool
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    active_requests: int
    speculation: bool
    queued_requests: int
    max_queue: int
    placement_settled: bool
    placement: str
    flips: _containers.RepeatedCompositeFieldContainer[FlipCount]
    alone_sequential_tokens_per_s: float
    alone_speculative_tokens_per_s: float
    def __init__(self, cluster: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., serving: _Optional[bool] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., active_requests: _Optional[int] = ..., speculation: _Optional[bool] = ..., queued_requests: _Optional[int] = ..., max_queue: _Optional[int] = ..., placement_settled: _Optional[bool] = ..., placement: _Optional[str] = ..., flips: _Optional[_Iterable[_Union[FlipCount, _Mapping]]] = ..., alone_sequential_tokens_per_s: _Optional[float] = ..., alone_speculative_tokens_per_s: _Optional[float] = ...) -> None: ...

class FlipCount(_message.Message):
    __slots__ = ("boundary", "flips", "checks")
    BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    FLIPS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    boundary: int
    flips: int
    checks: int
    def __init__(self, boundary: _Optional[int] = ..., flips: _Optional[int] = ..., checks: _Optional[int] = ...) -> None: ...

class MeasureRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("placement",)
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    placement: _containers.RepeatedCompositeFieldContainer[StagePlace]
    def __init__(self, placement: _Optional[_Iterable[_Union[StagePlace, _Mapping]]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("incarnation", "stages", "placement", "epoch", "assign_key")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_KEY_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    stages: _containers.RepeatedScalarFieldContainer[int]
    placement: _containers.RepeatedCompositeFieldContainer[StagePlace]
    epoch: int
    assign_key: str
    def __init__(self, incarnation: _Optional[int] = ..., stages: _Optional[_Iterable[int]] = ..., placement: _Optional[_Iterable[_Union[StagePlace, _Mapping]]] = ..., epoch: _Optional[int] = ..., assign_key: _Optional[str] = ...) -> None: ...

class StagePlace(_message.Message):
    __slots__ = ("stage", "node", "address", "link_address")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LINK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    node: str
    address: str
    link_address: str
    def __init__(self, stage: _Optional[int] = ..., node: _Optional[str] = ..., address: _Optional[str] = ..., link_address: _Optional[str] = ...) -> None: ...

class RingOpen(_message.Message):
    __slots__ = ("sequence", "prefill", "last_position", "window", "guess_thresholds", "prompt_tokens")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    GUESS_THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequence: OpenSequence
    prefill: _containers.RepeatedScalarFieldContainer[int]
    last_position: int
    window: int
    guess_thresholds: _containers.RepeatedScalarFieldContainer[float]
    prompt_tokens: int
    def __init__(self, sequence: _Optional[_Union[OpenSequence, _Mapping]] = ..., prefill: _Optional[_Iterable[int]] = ..., last_position: _Optional[int] = ..., window: _Optional[int] = ..., guess_thresholds: _Optional[_Iterable[float]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class RingFailure(_message.Message):
    __slots__ = ("seq_id", "message")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    message: str
    def __init__(self, seq_id: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RingControl(_message.Message):
    __slots__ = ("incarnation", "epoch", "closes", "opens")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLOSES_FIELD_NUMBER: _ClassVar[int]
    OPENS_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    epoch: int
    closes: _containers.RepeatedScalarFieldContainer[int]
    opens: _containers.RepeatedCompositeFieldContainer[RingOpen]
    def __init__(self, incarnation: _Optional[int] = ..., epoch: _Optional[int] = ..., closes: _Optional[_Iterable[int]] = ..., opens: _Optional[_Iterable[_Union[RingOpen, _Mapping]]] = ...) -> None: ...

class RingHop(_message.Message):
    __slots__ = ("seq_id", "gen", "stage", "start", "tokens", "committed", "hidden")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    GEN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    gen: int
    stage: int
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    committed: int
    hidden: Tensor
    def __init__(self, seq_id: _Optional[int] = ..., gen: _Optional[int] = ..., stage: _Optional[int] = ..., start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., committed: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class RingCorrection(_message.Message):
    __slots__ = ("seq_id", "gen", "position", "token", "found_at")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    GEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FOUND_AT_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    gen: int
    position: int
    token: int
    found_at: int
    def __init__(self, seq_id: _Optional[int] = ..., gen: _Optional[int] = ..., position: _Optional[int] = ..., token: _Optional[int] = ..., found_at: _Optional[int] = ...) -> None: ...

class RingCommit(_message.Message):
    __slots__ = ("seq_id", "position", "token")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    position: int
    token: int
    def __init__(self, seq_id: _Optional[int] = ..., position: _Optional[int] = ..., token: _Optional[int] = ...) -> None: ...

class LinkHello(_message.Message):
    __slots__ = ("secret", "node", "ring", "probe")
    SECRET_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RING_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    secret: str
    node: str
    ring: RingBinding
    probe: bool
    def __init__(self, secret: _Optional[str] = ..., node: _Optional[str] = ..., ring: _Optional[_Union[RingBinding, _Mapping]] = ..., probe: _Optional[bool] = ...) -> None: ...

class RingBinding(_message.Message):
    __slots__ = ("incarnation", "epoch", "assign_key")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_KEY_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    epoch: int
    assign_key: str
    def __init__(self, incarnation: _Optional[int] = ..., epoch: _Optional[int] = ..., assign_key: _Optional[str] = ...) -> None: ...

class LinkAnswer(_message.Message):
    __slots__ = ("refusal",)
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    refusal: str
    def __init__(self, refusal: _Optional[str] = ...) -> None: ...

class Forwarded(_message.Message):
    __slots__ = ("incarnation", "epoch", "hops", "corrections", "commits")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    epoch: int
    hops: _containers.RepeatedCompositeFieldContainer[RingHop]
    corrections: _containers.RepeatedCompositeFieldContainer[RingCorrection]
    commits: _containers.RepeatedCompositeFieldContainer[RingCommit]
    def __init__(self, incarnation: _Optional[int] = ..., epoch: _Optional[int] = ..., hops: _Optional[_Iterable[_Union[RingHop, _Mapping]]] = ..., corrections: _Optional[_Iterable[_Union[RingCorrection, _Mapping]]] = ..., commits: _Optional[_Iterable[_Union[RingCommit, _Mapping]]] = ...) -> None: ...

class RingStageStats(_message.Message):
    __slots__ = ("stage", "runs", "checks", "flips", "dropped", "positions")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    FLIPS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    runs: int
    checks: int
    flips: int
    dropped: int
    positions: int
    def __init__(self, stage: _Optional[int] = ..., runs: _Optional[int] = ..., checks: _Optional[int] = ..., flips: _Optional[int] = ..., dropped: _Optional[int] = ..., positions: _Optional[int] = ...) -> None: ...

class RingEvents(_message.Message):
    __slots__ = ("commits", "closed", "failed", "refusal")
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    commits: _containers.RepeatedCompositeFieldContainer[RingCommit]
    closed: _containers.RepeatedCompositeFieldContainer[RingSequenceStats]
    failed: _containers.RepeatedCompositeFieldContainer[RingFailure]
    refusal: str
    def __init__(self, commits: _Optional[_Iterable[_Union[RingCommit, _Mapping]]] = ..., closed: _Optional[_Iterable[_Union[RingSequenceStats, _Mapping]]] = ..., failed: _Optional[_Iterable[_Union[RingFailure, _Mapping]]] = ..., refusal: _Optional[str] = ...) -> None: ...

class RingSequenceStats(_message.Message):
    __slots__ = ("seq_id", "stages", "held_guesses")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    HELD_GUESSES_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    stages: _containers.RepeatedCompositeFieldContainer[RingStageStats]
    held_guesses: int
    def __init__(self, seq_id: _Optional[int] = ..., stages: _Optional[_Iterable[_Union[RingStageStats, _Mapping]]] = ..., held_guesses: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "stages", "bundle_sha256", "provider", "threads", "device", "open_sequences", "max_sequences", "emulated_link_ms", "standby_stages", "hosting", "incarnation", "profile", "pass_times", "head_ms", "memory_available_bytes", "links", "machine", "cores_used", "link_port")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OPEN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    EMULATED_LINK_MS_FIELD_NUMBER: _ClassVar[int]
    STANDBY_STAGES_FIELD_NUMBER: _ClassVar[int]
    HOSTING_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PASS_TIMES_FIELD_NUMBER: _ClassVar[int]
    HEAD_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CORES_USED_FIELD_NUMBER: _ClassVar[int]
    LINK_PORT_FIELD_NUMBER: _ClassVar[int]
    name: str
    stages: _containers.RepeatedScalarFieldContainer[int]
    bundle_sha256: str
    provider: str
    threads: int
    device: str
    open_sequences: int
    max_sequences: int
    emulated_link_ms: float
    standby_stages: _containers.RepeatedScalarFieldContainer[int]
    hosting: _containers.RepeatedScalarFieldContainer[int]
    incarnation: int
    profile: NodeProfile
    pass_times: _containers.RepeatedCompositeFieldContainer[PassTime]
    head_ms: float
    memory_available_bytes: int
    links: _containers.RepeatedCompositeFieldContainer[LinkTime]
    machine: Machine
    cores_used: float
    link_port: int
    def __init__(self, name: _Optional[str] = ..., stages: _Optional[_Iterable[int]] = ..., bundle_sha256: _Optional[str] = ..., provider: _Optional[str] = ..., threads: _Optional[int] = ..., device: _Optional[str] = ..., open_sequences: _Optional[int] = ..., max_sequences: _Optional[int] = ..., emulated_link_ms: _Optional[float] = ..., standby_stages: _Optional[_Iterable[int]] = ..., hosting: _Optional[_Iterable[int]] = ..., incarnation: _Optional[int] = ..., profile: _Optional[_Union[NodeProfile, _Mapping]] = ..., pass_times: _Optional[_Iterable[_Union[PassTime, _Mapping]]] = ..., head_ms: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkTime, _Mapping]]] = ..., machine: _Optional[_Union[Machine, _Mapping]] = ..., cores_used: _Optional[float] = ..., link_port: _Optional[int] = ...) -> None: ...

class Machine(_message.Message):
    __slots__ = ("id", "cores")
    ID_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    id: str
    cores: float
    def __init__(self, id: _Optional[str] = ..., cores: _Optional[float] = ...) -> None: ...

class LinkTime(_message.Message):
    __slots__ = ("node", "rtt_ms")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    node: str
    rtt_ms: float
    def __init__(self, node: _Optional[str] = ..., rtt_ms: _Optional[float] = ...) -> None: ...

class PassTime(_message.Message):
    __slots__ = ("stage", "rows", "ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    stage: int
    rows: int
    ms: float
    def __init__(self, stage: _Optional[int] = ..., rows: _Optional[int] = ..., ms: _Optional[float] = ...) -> None: ...

class NodeProfile(_message.Message):
    __slots__ = ("process_cpu_s", "worker_cpu_s", "stage_s", "stage_calls", "stage_positions", "exit_s", "guess_s", "commit_s", "serialize_s")
    PROCESS_CPU_S_FIELD_NUMBER: _ClassVar[int]
    WORKER_CPU_S_FIELD_NUMBER: _ClassVar[int]
    STAGE_S_FIELD_NUMBER: _ClassVar[int]
    STAGE_CALLS_FIELD_NUMBER: _ClassVar[int]
    STAGE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    EXIT_S_FIELD_NUMBER: _ClassVar[int]
    GUESS_S_FIELD_NUMBER: _ClassVar[int]
    COMMIT_S_FIELD_NUMBER: _ClassVar[int]
    SERIALIZE_S_FIELD_NUMBER: _ClassVar[int]
    process_cpu_s: float
    worker_cpu_s: float
    stage_s: float
    stage_calls: int
    stage_positions: int
    exit_s: float
    guess_s: float
    commit_s: float
    serialize_s: float
    def __init__(self, process_cpu_s: _Optional[float] = ..., worker_cpu_s: _Optional[float] = ..., stage_s: _Optional[float] = ..., stage_calls: _Optional[int] = ..., stage_positions: _Optional[int] = ..., exit_s: _Optional[float] = ..., guess_s: _Optional[float] = ..., commit_s: _Optional[float] = ..., serialize_s: _Optional[float] = ...) -> None: ...

class OpenSequence(_message.Message):
    __slots__ = ("seq_id", "sampling", "capacity", "plain_guesses")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PLAIN_GUESSES_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    sampling: Sampling
    capacity: int
    plain_guesses: bool
    def __init__(self, seq_id: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., capacity: _Optional[int] = ..., plain_guesses: _Optional[bool] = ...) -> None: ...

class Truncation(_message.Message):
    __slots__ = ("seq_id", "stage", "length")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    stage: int
    length: int
    def __init__(self, seq_id: _Optional[int] = ..., stage: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class StepItem(_message.Message):
    __slots__ = ("seq_id", "start", "length", "stage", "tokens", "hidden", "skip_prediction")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SKIP_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    length: int
    stage: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    skip_prediction: bool
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., stage: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., skip_prediction: _Optional[bool] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("tick", "closes", "opens", "truncations", "items", "incarnation")
    TICK_FIELD_NUMBER: _ClassVar[int]
    CLOSES_FIELD_NUMBER: _ClassVar[int]
    OPENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATIONS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    tick: int
    closes: _containers.RepeatedScalarFieldContainer[int]
    opens: _containers.RepeatedCompositeFieldContainer[OpenSequence]
    truncations: _containers.RepeatedCompositeFieldContainer[Truncation]
    items: _containers.RepeatedCompositeFieldContainer[StepItem]
    incarnation: int
    def __init__(self, tick: _Optional[int] = ..., closes: _Optional[_Iterable[int]] = ..., opens: _Optional[_Iterable[_Union[OpenSequence, _Mapping]]] = ..., truncations: _Optional[_Iterable[_Union[Truncation, _Mapping]]] = ..., items: _Optional[_Iterable[_Union[StepItem, _Mapping]]] = ..., incarnation: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("seq_id", "start", "prediction", "hidden", "confidence")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    prediction: int
    hidden: Tensor
    confidence: float
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., prediction: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., confidence: _Optional[float] = ...) -> None: ...

class StepResults(_message.Message):
    __slots__ = ("tick", "results")
    TICK_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    tick: int
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    def __init__(self, tick: _Optional[int] = ..., results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ...) -> None: ...

class SettingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterSettings(_message.Message):
    __slots__ = ("cluster", "bundle_sha256", "prefill_chunk", "step_timeout_s", "secure", "insecure")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    INSECURE_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    bundle_sha256: str
    prefill_chunk: int
    step_timeout_s: float
    secure: bool
    insecure: bool
    def __init__(self, cluster: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., prefill_chunk: _Optional[int] = ..., step_timeout_s: _Optional[float] = ..., secure: _Optional[bool] = ..., insecure: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("info", "address", "assign_key")
    INFO_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_KEY_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    address: str
    assign_key: str
    def __init__(self, info: _Optional[_Union[NodeInfo, _Mapping]] = ..., address: _Optional[str] = ..., assign_key: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("cluster", "heartbeat_interval_s", "incarnation")
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    heartbeat_interval_s: float
    incarnation: int
    def __init__(self, cluster: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., incarnation: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name", "open_sequences", "step_ms", "positions_per_s", "memory_available_bytes", "links")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPEN_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    open_sequences: int
    step_ms: float
    positions_per_s: float
    memory_available_bytes: int
    links: _containers.RepeatedCompositeFieldContainer[LinkTime]
    def __init__(self, name: _Optional[str] = ..., open_sequences: _Optional[int] = ..., step_ms: _Optional[float] = ..., positions_per_s: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkTime, _Mapping]]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...
