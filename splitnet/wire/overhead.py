"""Bytes a transport adds to every splitnet message, beyond the message's own frames.

The planner charges these on each link (``LinkProfile.transport`` / ``bytes_per_message``); it must
not import the transports themselves (ZeroMQ), so the figures live here, and
``tests/unit/test_transport_overhead.py`` checks the CurveZMQ figure against bytes on a real socket.
"""

from __future__ import annotations

TRANSPORTS = ("zmq", "curvezmq")

# CurveZMQ seals each frame as a MESSAGE command: name (1 + 7 bytes), 8-byte nonce, flags byte, 16-byte MAC
CURVEZMQ_BYTES_PER_FRAME = 1 + 7 + 8 + 1 + 16
CUT_MESSAGE_FRAMES = 2  # header + one payload frame: what a codec's cut message usually has


def transport_bytes_per_message(transport: str, frames: int = CUT_MESSAGE_FRAMES) -> int:
    """Bytes ``transport`` adds to a message of ``frames`` splitnet frames (0 for plain ZeroMQ)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if transport == "curvezmq":
        return CURVEZMQ_BYTES_PER_FRAME * frames
    return 0
