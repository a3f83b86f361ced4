"""gRPC settings every channel and server of the cluster uses."""

from runtime.core.errors import SpeedError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a step message carries hidden states of whole prompt chunks

COMMON = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # keepalive pings notice a peer that vanished without closing its connection (a pulled cable)
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER = COMMON + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
]
CHANNEL = COMMON + [
    # A peer back again (a coordinator restarted, or started after its nodes) is reached within seconds: gRPC's own
    # reconnect backoff starts at 1 s and grows to 120 s, and until its next attempt every call fails at once.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

MIN_STEP_MESSAGE_BYTES = 4 * 1024 * 1024


def step_message_bytes(*, d_model: int, max_items: int, max_positions: int) -> int:
    """The most a legitimate step message to a node can need, doubled: one item per (sequence, hosted stage),
    each of at most max_positions positions (the cluster's prefill_chunk: decode items have 1) of float32
    hidden state or token ids, plus 1 MiB for opens, closes and truncations; at least 4 MiB."""
    per_item = max_positions * (4 * d_model + 5) + 64
    return max(MIN_STEP_MESSAGE_BYTES, 2 * max_items * per_item + 1024 * 1024)


def node_server(max_receive_bytes: int) -> list[tuple[str, int]]:
    """A node's server settings: gRPC refuses a larger message (RESOURCE_EXHAUSTED) before reading it, so a
    hostile message costs no more than a legitimate one even while it is parsed (a 60 MB step message
    takes about three times its size until it is refused; with this limit 30 of them cost +3 MB)."""
    return [(key, max_receive_bytes if key == "grpc.max_receive_message_length" else value) for key, value in SERVER]


ERROR_ORIGIN = "speed-error-origin"  # trailing metadata: which process of ours sent an error (not gRPC, not the network)


def origin(process: str) -> tuple[tuple[str, str], ...]:
    """Trailing metadata for an error `process` ("node", "coordinator") sends with a sentence of its own."""
    return ((ERROR_ORIGIN, process),)


def sent_by(exc, process: str) -> bool:
    """Whether `process` itself sent this gRPC error; otherwise the connection or gRPC failed."""
    return (ERROR_ORIGIN, process) in tuple(exc.trailing_metadata() or ())


def listen(server, address: str, credentials=None) -> None:
    """Bind a (sync or asyncio) server to address, with TLS when credentials are given, or say in one
    sentence why it cannot."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise SpeedError(f"cannot listen on {address}: the address is in use or not on this machine; "
                         "stop what holds it or change the address in the cluster file")
