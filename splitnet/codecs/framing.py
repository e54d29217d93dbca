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
"""

from __future__ import annotations

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
