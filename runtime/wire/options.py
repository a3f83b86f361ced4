"""gRPC settings every channel and server of the cluster uses."""

from runtime.errors import SpeedError

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
CHANNEL = COMMON


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
