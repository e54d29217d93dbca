"""How payloads ride in wire messages.

A payload for the tensor ``hidden`` becomes tensor frames ``hidden.<part>`` and one entry
``meta["codecs"]["hidden"]`` in the header. Tensors without a codec travel raw.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from splitnet.codecs.base import Payload, packed_size
from splitnet.errors import CodecError, ProtocolError

PART_SEP = "."


CODECS_KEY = "codecs"


def payload_wire_nbytes(p: Payload, name: str = "x") -> int:
    """Exact bytes ``p`` adds to a message when attached as tensor ``name``: part frames, their
    tensor descriptors, the header entry with its key, and the ``meta["codecs"]`` map that holds it.

    For a message carrying one payload this is exact to the byte (tests/unit/test_codec_wire.py
    checks it on a real socket); a second payload in the same message shares the ``codecs`` key,
    so the sum over payloads over-counts by 8 bytes each, never under-counts. The default name
    "x" is the shortest possible; a tensor named ``hidden`` costs 5 bytes more per part + 5.
    """
    from splitnet.wire.dtypes import wire_name_of_numpy

    total = packed_size(CODECS_KEY) + 1  # "codecs" key + its (fix)map header
    total += packed_size(name) + packed_size(p.header_entry())  # map key is the tensor name
    for part, arr in p.parts.items():
        desc = {"name": f"{name}{PART_SEP}{part}", "dtype": wire_name_of_numpy(arr.dtype), "shape": list(arr.shape), "nbytes": arr.nbytes}
        total += packed_size(desc) + arr.nbytes
    return total


def attach_payloads(tensors: dict[str, Any], meta: dict[str, Any], payloads: Mapping[str, Payload]) -> None:
    """Add ``payloads`` to a message's tensors and meta in place."""
    codecs = meta.setdefault(CODECS_KEY, {})
    for name, p in payloads.items():
        codecs[name] = p.header_entry()
        for part, arr in p.parts.items():
            tensors[f"{name}{PART_SEP}{part}"] = arr


def extract_payloads(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Payload]]:
    """Split a received message's tensors into (raw tensors, payloads by name)."""
    entries = meta.get(CODECS_KEY) or {}
    if not isinstance(entries, dict):
        raise ProtocolError("meta.codecs must be a map")
    raw: dict[str, np.ndarray] = {}
    parts: dict[str, dict[str, np.ndarray]] = {name: {} for name in entries}
    for key, arr in tensors.items():
        base, sep, part = key.partition(PART_SEP)
        if sep and base in parts:
            parts[base][part] = arr
        else:
            raw[key] = arr
    payloads = {}
    for name, e in entries.items():
        if not isinstance(e, dict) or not isinstance(e.get("codec"), str) or not isinstance(e.get("shape"), list):
            raise ProtocolError(f"codec entry for {name!r} is malformed")
        payloads[name] = Payload(
            codec=e["codec"],
            codebook_hash=str(e.get("hash", "")),
            shape=tuple(int(d) for d in e["shape"]),
            dtype=str(e.get("dtype", "float32")),
            parts=parts[name],
            meta=e.get("meta") or {},
        )
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
