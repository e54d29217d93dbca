"""Limits on everything a peer controls in a wire message."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WireLimits:
    """Caps applied to every received message before any buffer is used.

    Attributes:
        max_header_bytes: largest msgpack header frame accepted.
        max_tensors: most tensor descriptors (and so tensor frames) in one message.
        max_tensor_bytes: largest single tensor frame.
        max_message_bytes: largest sum of all tensor frames of one message.
        max_ndim: most dimensions of one tensor.
        max_str_len: longest string inside the header.
        max_container_len: longest list or map inside the header.
    """

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_tensor_bytes: int = 512 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024 * 1024
    max_ndim: int = 8
    max_str_len: int = 4096
    max_container_len: int = 1024

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WireLimits.{name} must be a positive int, got {value!r}")
        if self.max_tensor_bytes > self.max_message_bytes:
            raise ValueError("WireLimits.max_tensor_bytes must not exceed max_message_bytes")


DEFAULT_LIMITS = WireLimits()


def frame_cap_bytes(limits: WireLimits) -> int:
    """The largest single frame a message within ``limits`` can hold: ZMQ_MAXMSGSIZE (libzmq drops
    a connection that sends a larger frame before assembling it)."""
    return max(limits.max_header_bytes, limits.max_tensor_bytes)


def limits_for_input(max_input_bytes: int, base: WireLimits = DEFAULT_LIMITS) -> WireLimits:
    """``base`` with tensors (each, and all of one message together) capped at ``max_input_bytes``."""
    if max_input_bytes <= 0:
        raise ValueError("max_input_bytes must be positive")
    cap = min(max_input_bytes, base.max_message_bytes)
    return WireLimits(base.max_header_bytes, base.max_tensors, min(cap, base.max_tensor_bytes), cap, base.max_ndim, base.max_str_len, base.max_container_len)
