"""Stateless baselines: raw fp32, fp16, integer quantisation (int8/int4) and top-k sparsification.

All of them flatten the input to (N, C) tokens x channels and carry every scale they use in the
payload (fp16), so the bytes counted are the bytes the receiver needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from splitnet.codecs.base import Codec, Payload
from splitnet.codecs.bitpack import BitReader, BitWriter, packed_nbytes
from splitnet.codecs.framing import as_float_array
from splitnet.codecs.registry import register_codec
from splitnet.errors import CodecError
from splitnet.wire.limits import DEFAULT_LIMITS


def as_tokens(x: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """(N, C) float32 view of a (..., C) array or tensor, and the original shape."""
    a = as_float_array(x)
    if a.ndim == 0:
        raise CodecError("cannot encode a scalar; codecs expect a (..., C) feature tensor")
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1])), tuple(a.shape)


def part(payload: Payload, name: str) -> np.ndarray:
    """A payload part, with a CodecError naming what is missing."""
    try:
        return payload.parts[name]
    except KeyError:
        raise CodecError(f"{payload.codec} payload lacks part {name!r} (has {sorted(payload.parts)})") from None


def check_payload(codec: Codec, payload: Payload) -> tuple[int, int]:
    """Validate the header fields every codec relies on; returns (N, C)."""
    if payload.codec != codec.name:
        raise CodecError(f"payload was made by codec {payload.codec!r}, this stage decodes {codec.name!r}")
    if payload.codebook_hash != codec.codebook_hash:
        from splitnet.codecs.framing import check_hash

        check_hash(codec.codebook_hash, payload)
    if len(payload.shape) < 1 or any(d < 0 for d in payload.shape):
        raise CodecError(f"payload shape {payload.shape} is invalid")
    c = payload.shape[-1]
    n = math.prod(payload.shape[:-1]) if len(payload.shape) > 1 else 1
    if 4 * n * c > DEFAULT_LIMITS.max_tensor_bytes:  # entropy-coded indices can claim many tokens in few bytes
        raise CodecError(f"payload shape {payload.shape} decodes to more than the {DEFAULT_LIMITS.max_tensor_bytes} bytes "
                         "a raw float32 tensor frame may carry; send smaller messages")
    return n, c


@register_codec
class Fp32Codec(Codec):
    """Identity: the raw float32 tensor (the reference for every ratio)."""

    name = "fp32"
    wire_dtype = np.float32

    def __init__(self) -> None:
        pass

    def encode(self, x: Any) -> Payload:
        t, shape = as_tokens(x)
        return Payload(self.name, "", shape, "float32", {"d": t.astype(self.wire_dtype)})

    def decode(self, payload: Payload) -> np.ndarray:
        n, c = check_payload(self, payload)
        d = part(payload, "d")
        if d.shape != (n, c):
            raise CodecError(f"{self.name} payload data has shape {d.shape}, header says {(n, c)}")
        return d.astype(np.float32).reshape(payload.shape)


@register_codec
class Fp16Codec(Fp32Codec):
    """Half precision."""

    name = "fp16"
    wire_dtype = np.float16


class _IntCodec(Codec):
    """Asymmetric uniform quantisation to ``bits`` bits with a (min, step) pair in fp16 per token
    (``axis="token"``) or per channel (``axis="channel"``), values bit-packed exactly."""

    bits = 8

    def __init__(self, axis: str = "token") -> None:
        if axis not in ("token", "channel"):
            raise ValueError(f"{self.name}: axis must be 'token' or 'channel', got {axis!r}")
        self.axis = axis

    def state(self):
        return {}, {"axis": self.axis}

    def encode(self, x: Any) -> Payload:
        t, shape = as_tokens(x)
        ax = 1 if self.axis == "token" else 0
        lo = t.min(axis=ax, keepdims=True).astype(np.float16)
        hi = t.max(axis=ax, keepdims=True)
        levels = (1 << self.bits) - 1
        step = ((hi - lo.astype(np.float32)) / levels).astype(np.float16)
        step = np.where(step.astype(np.float32) > 0, step, np.float16(1.0)).astype(np.float16)
        q = np.rint((t - lo.astype(np.float32)) / step.astype(np.float32))
        q = np.clip(q, 0, levels).astype(np.uint8)
        w = BitWriter()
        w.add(q, self.bits)
        side = np.concatenate([lo.reshape(-1), step.reshape(-1)])
        return Payload(self.name, "", shape, "float32", {"q": w.getvalue(), "s": side}, {"ax": self.axis[0]})

    def decode(self, payload: Payload) -> np.ndarray:
        n, c = check_payload(self, payload)
        axis = "token" if payload.meta.get("ax", "t") == "t" else "channel"
        m = n if axis == "token" else c
        side = part(payload, "s")
        if side.dtype != np.float16 or side.shape != (2 * m,):
            raise CodecError(f"{self.name} payload scales have shape {side.shape} {side.dtype}, expected ({2 * m},) f16")
        q = BitReader(part(payload, "q"), [(n * c, self.bits)]).read().reshape(n, c).astype(np.float32)
        lo, step = side[:m].astype(np.float32), side[m:].astype(np.float32)
        if axis == "token":
            out = q * step[:, None] + lo[:, None]
        else:
            out = q * step[None, :] + lo[None, :]
        return out.reshape(payload.shape)


@register_codec
class Int8Codec(_IntCodec):
    """8-bit integers, per-token (default) or per-channel scales."""

    name = "int8"
    bits = 8


@register_codec
class Int4Codec(_IntCodec):
    """4-bit integers (two per byte), per-token (default) or per-channel scales."""

    name = "int4"
    bits = 4


@register_codec
class TopKCodec(Codec):
    """Keep the ``k`` largest-magnitude channels of every token: values in fp16, channel indices
    bit-packed to ceil(log2 C) bits; the rest are zero."""

    name = "topk"

    def __init__(self, k: int = 32) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"topk: k must be a positive int, got {k!r}")
        self.k = k

    def state(self):
        return {}, {"k": self.k}

    def encode(self, x: Any) -> Payload:
        t, shape = as_tokens(x)
        n, c = t.shape
        k = min(self.k, c)
        idx = np.argpartition(-np.abs(t), k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
        idx = np.sort(idx, axis=1)
        vals = np.take_along_axis(t, idx, axis=1).astype(np.float16)
        w = BitWriter()
        w.add(idx, max(1, (c - 1).bit_length()))
        return Payload(self.name, "", shape, "float32", {"i": w.getvalue(), "v": vals.reshape(-1)}, {"k": k})

    def decode(self, payload: Payload) -> np.ndarray:
        n, c = check_payload(self, payload)
        k = payload.meta.get("k")
        if not isinstance(k, int) or not 1 <= k <= c:
            raise CodecError(f"topk payload has an invalid k={k!r}")
        vals = part(payload, "v")
        if vals.shape != (n * k,):
            raise CodecError(f"topk payload values have shape {vals.shape}, expected ({n * k},)")
        width = max(1, (c - 1).bit_length())
        idx = BitReader(part(payload, "i"), [(n * k, width)]).read().reshape(n, k)
        if idx.size and idx.max() >= c:
            raise CodecError("topk payload names a channel beyond the tensor's width")
        out = np.zeros((n, c), dtype=np.float32)
        np.put_along_axis(out, idx.astype(np.int64), vals.reshape(n, k).astype(np.float32), axis=1)
        return out.reshape(payload.shape)


__all__ = ["Fp32Codec", "Fp16Codec", "Int8Codec", "Int4Codec", "TopKCodec", "as_tokens", "packed_nbytes"]
