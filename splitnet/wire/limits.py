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
        max_message_bytes: largest sum of all frames of one message (also ZMQ_MAXMSGSIZE).
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
