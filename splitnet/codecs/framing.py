"""How payloads ride in wire messages.

A payload for the tensor ``hidden`` becomes one entry ``meta["codecs"]["hidden"]`` in the header,
a compact map::

    {"c": "alignedvq",          # codec name
     "h": <8 raw bytes>,        # codebook hash (hex digits as bytes); absent for stateless codecs
     "s": [42, 384],            # shape of the original tensor
     "d": "float16",            # its dtype; absent for float32
     "m": {...},                # codec side information; absent when empty
     "p": {"b": ["u8", [180], <180 raw bytes>]}}   # small parts, inline

Parts of at most :data:`INLINE_PART_MAX_BYTES` bytes ride inline in that entry as msgpack ``bin``
(dtype, shape, bytes): for a per-request or per-decoded-token payload of a few hundred bytes, a
separate tensor frame with its descriptor would cost ~35 bytes more than the data's own
header. Larger parts travel as raw tensor frames ``hidden.<part>`` (no copy). Tensors without a
codec travel raw. :func:`payload_wire_nbytes` counts exactly these bytes.

**The compact form** (per decoded token). Most of a full entry says the same thing in every step
of a request: which codec and codebook, the dtype, the part's name, dtype and layout. A cached
request's later steps therefore send the cut tensor's codes alone, under the header key
``"cc"`` (:data:`COMPACT_KEY`, the forward header's ``cc`` field)::

    "cc": [1, <40 raw bytes>]   # [vectors n, the one part's bytes]: the tensor is (1, n, C)

what it leaves out is a :class:`CompactLayout`, taken from the full entry an earlier message of
the SAME request (same sender, request id and epoch) carried: the sender remembers the layout of
the full entry it sent, the receiver binds the request to the codec that decoded it (by its
codebook hash, checked as for any full entry). Nothing is agreed by guessing: a receiver that holds
no binding for the request (restarted, replaced, evicted, or never sent the full entry) refuses
the step with ``UnknownRequest``, which makes the client replay the request from its first token
(a new request id, so a full entry again); a receiver that does not know the ``cc`` key refuses
the message with ``ProtocolError`` (unknown header key). A payload with several parts, side
information, a part over :data:`INLINE_PART_MAX_BYTES`, another shape than (1, n, C), or a
layout other than the one agreed goes as a full entry, which also re-binds the request.
:func:`compact_wire_nbytes` counts the compact form's bytes exactly (key and value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from splitnet.codecs.base import Payload, packed_size
from splitnet.errors import CodecError, ProtocolError
from splitnet.wire.limits import DEFAULT_LIMITS

PART_SEP = "."
CODECS_KEY = "codecs"
#: parts up to this many bytes ride inline in the header entry; must stay below the receiver's
#: ``WireLimits.max_str_len`` (msgpack ``bin`` limit, 4 096 by default)
INLINE_PART_MAX_BYTES = 2048
_DEFAULT_DTYPE = "float32"
#: header key of the compact form: ``[n, bytes]``, the codes of the cut tensor of shape (1, n, C)
COMPACT_KEY = "cc"
#: the compact form's version, announced by a stage (``info["compact_codes"]``) that decodes it
COMPACT_VERSION = 1


def _hash_on_wire(h: str) -> bytes | str:
    """The codebook hash as raw bytes when it is hex (8 bytes instead of 16 characters)."""
    if h and len(h) % 2 == 0:
        try:
            return bytes.fromhex(h)
        except ValueError:
            pass
    return h


def _inline(p: Payload) -> dict[str, np.ndarray]:
    return {k: a for k, a in p.parts.items() if a.nbytes <= INLINE_PART_MAX_BYTES}


def header_entry(p: Payload) -> dict[str, Any]:
    """The compact map ``p`` adds to the message header's ``meta["codecs"]``."""
    from splitnet.wire.dtypes import wire_name_of_numpy

    entry: dict[str, Any] = {"c": p.codec}
    if p.codebook_hash:
        entry["h"] = _hash_on_wire(p.codebook_hash)
    entry["s"] = list(p.shape)
    if p.dtype != _DEFAULT_DTYPE:
        entry["d"] = p.dtype
    if p.meta:
        entry["m"] = dict(p.meta)
    inline = _inline(p)
    if inline:
        entry["p"] = {
            k: [wire_name_of_numpy(a.dtype), list(a.shape), np.ascontiguousarray(a).tobytes()] for k, a in inline.items()
        }
    return entry


def payload_wire_nbytes(p: Payload, name: str = "x") -> int:
    """Exact bytes ``p`` adds to a message when attached as tensor ``name``: the header entry with
    its key and inline parts, the ``meta["codecs"]`` map that holds it, and for parts too large to
    ride inline their frames and tensor descriptors.

    For a message carrying one payload this is exact to the byte (tests/unit/test_codec_wire.py
    checks it on a real socket); a second payload in the same message shares the ``codecs`` key,
    so the sum over payloads over-counts by 8 bytes each, never under-counts. The default name
    "x" is the shortest possible; a tensor named ``hidden`` costs 5 bytes more (+ 5 per framed part).
    """
    from splitnet.wire.dtypes import wire_name_of_numpy

    total = packed_size(CODECS_KEY) + 1  # "codecs" key + its (fix)map header
    total += packed_size(name) + packed_size(header_entry(p))  # map key is the tensor name
    inline = _inline(p)
    for part, arr in p.parts.items():
        if part in inline:
            continue
        desc = {"name": f"{name}{PART_SEP}{part}", "dtype": wire_name_of_numpy(arr.dtype), "shape": list(arr.shape), "nbytes": arr.nbytes}
        total += packed_size(desc) + arr.nbytes
    return total


def attach_payloads(tensors: dict[str, Any], meta: dict[str, Any], payloads: Mapping[str, Payload]) -> None:
    """Add ``payloads`` to a message's tensors and meta in place."""
    codecs = meta.setdefault(CODECS_KEY, {})
    for name, p in payloads.items():
        codecs[name] = header_entry(p)
        inline = _inline(p)
        for part, arr in p.parts.items():
            if part not in inline:
                tensors[f"{name}{PART_SEP}{part}"] = arr


def _inline_part(name: str, part: Any, value: Any) -> np.ndarray:
    """Validate one inline part ``[dtype, shape, bytes]`` from a peer and view it as an array."""
    from splitnet.wire.message import tensor_spec

    where = f"inline part {part!r} of codec entry {name!r}"
    if type(part) is not str or not part:
        raise ProtocolError(f"{where} has no valid name")
    if type(value) is not list or len(value) != 3:
        raise ProtocolError(f"{where} must be [dtype, shape, bytes]")
    dtype, shape, data = value
    if dtype == "bf16":  # a frame's bf16 is viewed through Message.dtypes; an inline part has none
        raise ProtocolError(f"{where} has dtype 'bf16', which only travels as a frame")
    np_dtype, expected = tensor_spec(f"{name}{PART_SEP}{part}", dtype, shape)
    if type(data) is not bytes or len(data) != expected:
        raise ProtocolError(f"{where}: its bytes do not match shape {shape} and dtype {dtype}")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def _entry_payload(name: str, e: Any, framed: dict[str, np.ndarray]) -> Payload:
    if not isinstance(e, dict) or type(e.get("c")) is not str or type(e.get("s")) is not list:
        raise ProtocolError(f"codec entry for {name!r} is malformed (needs 'c': codec name and 's': shape)")
    h = e.get("h", "")
    if type(h) is bytes:
        h = h.hex()
    elif type(h) is not str:
        raise ProtocolError(f"codec entry for {name!r} has a malformed hash")
    shape = e["s"]
    if len(shape) > DEFAULT_LIMITS.max_ndim or any(type(d) is not int or d < 0 for d in shape):
        raise ProtocolError(f"codec entry for {name!r} has an invalid shape {shape!r}")
    dtype, meta, inline = e.get("d", _DEFAULT_DTYPE), e.get("m", {}), e.get("p", {})
    if type(dtype) is not str or not isinstance(meta, dict) or not isinstance(inline, dict):
        raise ProtocolError(f"codec entry for {name!r} is malformed ('d' must be a string, 'm' and 'p' maps)")
    parts = dict(framed)
    for part, value in inline.items():
        if part in parts:
            raise ProtocolError(f"part {part!r} of {name!r} arrived both inline and as a frame")
        parts[part] = _inline_part(name, part, value)
    return Payload(codec=e["c"], codebook_hash=h, shape=tuple(shape), dtype=dtype, parts=parts, meta=meta)


def extract_payloads(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Payload]]:
    """Split a received message's tensors into (raw tensors, payloads by name)."""
    entries = meta.get(CODECS_KEY) or {}
    if not isinstance(entries, dict):
        raise ProtocolError("meta.codecs must be a map")
    raw: dict[str, np.ndarray] = {}
    framed: dict[str, dict[str, np.ndarray]] = {name: {} for name in entries}
    for key, arr in tensors.items():
        base, sep, part = key.partition(PART_SEP)
        if sep and base in framed:
            framed[base][part] = arr
        else:
            raw[key] = arr
    payloads = {name: _entry_payload(name, e, framed[name]) for name, e in entries.items()}
    return raw, payloads


@dataclass(frozen=True)
class CompactLayout:
    """What a compact message leaves out, fixed by the full entry of an earlier step of the same
    request: the tensor is (1, n, ``width``), made by ``codec`` with codebook ``codebook_hash``,
    with one part ``part`` of wire dtype ``part_dtype``, shaped (n, *``row``) or, when ``row`` is
    None, flat (a bitstream of the n vectors: its codec checks its length)."""

    codec: str
    codebook_hash: str
    dtype: str
    width: int
    part: str
    part_dtype: str
    row: tuple[int, ...] | None


def compact_layout(p: Payload) -> CompactLayout | None:
    """The layout a compact form of payloads like ``p`` would leave out, or None when ``p`` has
    another form than one part and no side information (several parts, meta, a part neither flat
    nor one row per vector)."""
    from splitnet.wire.dtypes import wire_name_of_numpy

    if len(p.parts) != 1 or p.meta or len(p.shape) < 2:
        return None
    (name, arr), = p.parts.items()
    vectors = int(np.prod(p.shape[:-1]))
    if arr.ndim == 1:
        row = None
    elif arr.ndim >= 2 and arr.shape[0] == vectors:
        row = tuple(int(d) for d in arr.shape[1:])
    else:
        return None
    return CompactLayout(p.codec, p.codebook_hash, p.dtype, int(p.shape[-1]), name, wire_name_of_numpy(arr.dtype), row)


def compact_value(p: Payload, layout: CompactLayout) -> list | None:
    """``[n, bytes]`` for ``p`` when it is a (1, n, C) tensor in ``layout`` whose part rides
    inline; None when it must go as a full entry."""
    if len(p.shape) != 3 or p.shape[0] != 1 or p.shape[1] < 1 or compact_layout(p) != layout:
        return None
    arr = next(iter(p.parts.values()))
    if arr.nbytes > INLINE_PART_MAX_BYTES:
        return None
    return [int(p.shape[1]), np.ascontiguousarray(arr).tobytes()]


def compact_payload(value: Any, layout: CompactLayout) -> Payload:
    """The :class:`Payload` a received compact value stands for, validated like an inline part
    of a full entry (ProtocolError on anything malformed)."""
    from splitnet.wire.dtypes import WIRE_DTYPES
    from splitnet.wire.message import tensor_spec

    if type(value) is not list or len(value) != 2:
        raise ProtocolError(f"meta.{COMPACT_KEY} must be [vectors, bytes]")
    n, data = value
    if type(n) is not int or n < 1:
        raise ProtocolError(f"meta.{COMPACT_KEY} must start with the number of vectors, an int >= 1; got {n!r}")
    if type(data) is not bytes:
        raise ProtocolError(f"meta.{COMPACT_KEY} must carry the codes as bytes, got {type(data).__name__}")
    where = f"compact codes of {layout.codec} ({n} vectors, {len(data)} bytes)"
    if layout.row is None:
        itemsize = WIRE_DTYPES[layout.part_dtype].itemsize  # the layout came from a payload this stage decoded
        if len(data) % itemsize or n > 8 * len(data):  # a vector costs at least one bit
            raise ProtocolError(f"{where}: the bytes cannot hold {n} vectors of dtype {layout.part_dtype}")
        shape = [len(data) // itemsize]
    else:
        shape = [n, *layout.row]
    np_dtype, expected = tensor_spec(where, layout.part_dtype, shape)
    if len(data) != expected:
        raise ProtocolError(f"{where}: the bytes are not {n} vectors of {list(layout.row or ())} x {layout.part_dtype}")
    part = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    return Payload(layout.codec, layout.codebook_hash, (1, n, layout.width), layout.dtype, {layout.part: part})


def compact_wire_nbytes(value: list) -> int:
    """Exact bytes the compact form adds to a message's header: its key and ``[n, bytes]``."""
    return packed_size(COMPACT_KEY) + packed_size(value)


def check_hash(codec_hash: str, payload: Payload) -> None:
    """Refuse a payload made with another codebook than the receiver's."""
    if payload.codebook_hash != codec_hash:
        raise CodecError(
            f"payload was encoded with codebook {payload.codebook_hash[:12] or '(none)'} but this stage holds "
            f"{codec_hash[:12] or '(none)'}; deploy the same codec file on both sides of the cut"
        )


def as_float_array(x: Any) -> np.ndarray:
    """A float32 numpy view/copy of a numpy array or torch tensor."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float32, copy=False)
    return x.detach().float().cpu().numpy()
