"""The one place sockets are made: every socket gets linger, high-water marks and size caps.

Tests and the security layer swap behaviour by passing a different :class:`SocketConfig`
(for instance one carrying CURVE keys) rather than by patching call sites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import zmq

from splitnet.wire.limits import DEFAULT_LIMITS, frame_cap_bytes


@dataclass(frozen=True)
class SocketConfig:
    """Options applied to every socket made by :func:`make_socket`.

    Attributes:
        linger_ms: how long close() may wait to flush unsent messages.
        send_hwm: messages queued per peer before sends block (or time out).
        recv_hwm: messages queued for receipt per peer.
        max_message_bytes: ZMQ_MAXMSGSIZE: an inbound frame larger than this drops the connection
            before it is assembled (libzmq applies it per frame). Default: the largest frame
            :data:`DEFAULT_LIMITS` accepts; a stage derives its own from its model
            (:func:`splitnet.wire.limits.frame_cap_bytes`).
        handshake_timeout_ms: ZMQ_HANDSHAKE_IVL: a connection that has not completed its ZMTP
            (and CURVE) handshake within this is closed, so idle unauthenticated connections do
            not pile up.
        send_timeout_ms: a blocked send raises zmq.Again after this long.
        immediate: queue only to completed connections (a dead peer makes sends time out).
        security: optional callable that configures a socket for authentication (CURVE);
            it receives (socket, is_server).
    """

    linger_ms: int = 0
    send_hwm: int = 1000
    recv_hwm: int = 1000
    max_message_bytes: int = frame_cap_bytes(DEFAULT_LIMITS)
    send_timeout_ms: int = 5000
    handshake_timeout_ms: int = 5000
    immediate: bool = True
    security: Callable[[zmq.Socket, bool], None] | None = None

    def __post_init__(self) -> None:
        if self.linger_ms < 0:
            raise ValueError("SocketConfig.linger_ms must be >= 0")
        if self.send_hwm <= 0 or self.recv_hwm <= 0:
            raise ValueError("SocketConfig high-water marks must be positive")
        if self.max_message_bytes <= 0:
            raise ValueError("SocketConfig.max_message_bytes must be positive")
        if self.handshake_timeout_ms <= 0:
            raise ValueError("SocketConfig.handshake_timeout_ms must be positive (unauthenticated connections must time out)")
        if self.send_timeout_ms <= 0:
            raise ValueError("SocketConfig.send_timeout_ms must be positive (no unbounded sends)")


DEFAULT_SOCKET_CONFIG = SocketConfig()


def make_socket(
    ctx: zmq.Context, kind: int, config: SocketConfig = DEFAULT_SOCKET_CONFIG, *, server: bool = False
) -> zmq.Socket:
    """A new socket of ``kind`` with ``config`` applied. ``server`` marks the binding side (CURVE)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, config.linger_ms)
    sock.setsockopt(zmq.SNDHWM, config.send_hwm)
    sock.setsockopt(zmq.RCVHWM, config.recv_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
    sock.setsockopt(zmq.SNDTIMEO, config.send_timeout_ms)
    sock.setsockopt(zmq.HANDSHAKE_IVL, config.handshake_timeout_ms)
    if kind in (zmq.DEALER, zmq.ROUTER, zmq.PUSH, zmq.REQ) and config.immediate:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if config.security is not None:
        config.security(sock, server)
    return sock


def bind_random_port(sock: zmq.Socket, host: str = "127.0.0.1") -> str:
    """Bind ``sock`` to a free TCP port on ``host`` and return the full endpoint."""
    port = sock.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=60000, max_tries=200)
    return f"tcp://{host}:{port}"


def send_frames(sock: zmq.Socket, frames: list[Any], envelope: list[bytes] | None = None) -> None:
    """Send a multipart message without copying tensor buffers."""
    parts = (envelope or []) + list(frames)
    sock.send_multipart(parts, copy=False)


def recv_bounded(sock: zmq.Socket, max_frames: int) -> tuple[list[zmq.Frame], int]:
    """One multipart message from ``sock`` (copy-free frames), keeping at most ``max_frames``;
    the rest are drained and counted, never held. Returns (frames, frames dropped)."""
    frame = sock.recv(copy=False)
    frames = [frame]
    dropped = 0
    while frame.more:
        frame = sock.recv(copy=False)
        if len(frames) < max_frames:
            frames.append(frame)
        else:
            dropped += 1
    return frames, dropped


def frame_user_id(frame: zmq.Frame) -> str:
    """The ZAP user id libzmq attached to a received frame: a CURVE peer's Z85 public key; "" on a
    connection without authentication."""
    try:
        uid = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return ""
    return uid if isinstance(uid, str) else (uid.decode("ascii", "replace") if uid else "")
