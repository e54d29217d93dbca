"""Wire protocol: msgpack header + raw tensor frames, strict validation, socket factory."""

from splitnet.wire.limits import DEFAULT_LIMITS, WireLimits
from splitnet.wire.message import (
    KINDS,
    PROTOCOL_VERSION,
    Message,
    decode_message,
    encode_message,
    error_message,
    message_nbytes,
)
from splitnet.wire.sockets import DEFAULT_SOCKET_CONFIG, SocketConfig, bind_random_port, make_socket, send_frames

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_SOCKET_CONFIG",
    "KINDS",
    "PROTOCOL_VERSION",
    "Message",
    "SocketConfig",
    "WireLimits",
    "bind_random_port",
    "decode_message",
    "encode_message",
    "error_message",
    "make_socket",
    "message_nbytes",
    "send_frames",
]
