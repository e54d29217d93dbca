"""The Codec interface and the Payload that crosses a cut.

A codec turns the feature tensor that leaves a stage into a :class:`Payload`: a few raw arrays
(``parts``: bit-packed indices, per-token scales, ...) plus a small msgpack-able ``meta`` map. The
payload is sent as one compact entry in the message header, with small parts inline and large
parts as tensor frames (see :mod:`splitnet.codecs.framing`), and :attr:`Payload.nbytes` counts
exactly those bytes. Compression ratios use nothing else.

Codecs work on numpy arrays so that edge stages can run them without torch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import msgpack
import numpy as np


@dataclass(frozen=True)
class Payload:
    """An encoded tensor: everything the receiver needs to rebuild it.

    Attributes:
        codec: registry name of the codec that made it.
        codebook_hash: content hash of the fitted state ("" for stateless codecs); the receiver
            refuses a payload whose hash differs from its own codec's.
        shape: shape of the original tensor.
        dtype: numpy dtype name of the original tensor (e.g. "float32").
        parts: raw arrays (indices, scales, residual stream, ...): inline in the header when small, else frames.
        meta: small side information (ints, floats, strings) sent inside the header.
    """

    codec: str
    codebook_hash: str
    shape: tuple[int, ...]
    dtype: str
    parts: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def header_entry(self) -> dict[str, Any]:
        """The map this payload adds to the message header's ``meta["codecs"]`` (see
        :mod:`splitnet.codecs.framing`: compact keys, small parts inline)."""
        from splitnet.codecs.framing import header_entry

        return header_entry(self)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire: the header entry (with inline parts), and frames and descriptors of larger parts."""
        from splitnet.codecs.framing import payload_wire_nbytes

        return payload_wire_nbytes(self)


class Codec(abc.ABC):
    """A feature codec. Subclasses set ``name`` and register with :func:`register_codec`."""

    name: ClassVar[str] = ""
    #: whether fit() must be called before encode()
    needs_fit: ClassVar[bool] = False

    @abc.abstractmethod
    def encode(self, x: np.ndarray) -> Payload:
        """Encode a (..., C) float array."""

    @abc.abstractmethod
    def decode(self, payload: Payload) -> np.ndarray:
        """Rebuild the array (same shape, dtype float32 unless stated)."""

    def fit(self, features: np.ndarray, *, progress: bool = True) -> "Codec":
        """Learn state from (N, C) calibration features; stateless codecs return self."""
        return self

    @property
    def codebook_hash(self) -> str:
        """Content hash of the fitted state; "" for stateless codecs."""
        return ""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, config) that fully describe this codec, for saving."""
        return {}, {}

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> "Codec":
        """Rebuild a codec from :meth:`state`'s output."""
        return cls(**config)


def packed_size(obj: Any) -> int:
    """Bytes msgpack needs for ``obj``."""
    return len(msgpack.packb(obj, use_bin_type=True))
