"""Applying codecs to the tensors that cross a cut (``hidden``); everything else travels raw.

A cached request's steps after its first carry the codes in the compact form
(:mod:`splitnet.codecs.framing`, ``meta["cc"]``) when the sender passes the request's
``context``: :class:`CutCodecs` remembers, per request context, the layout of the full entry it
sent (sender) and the codec that decoded the full entry it received (receiver), each in a
bounded table (a context that falls out of it costs a full entry, or a replay, never a wrong decode).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np

from splitnet.codecs.base import Codec, Payload
from splitnet.codecs.framing import (
    COMPACT_KEY,
    COMPACT_VERSION,
    CompactLayout,
    attach_payloads,
    check_hash,
    compact_layout,
    compact_payload,
    compact_value,
    compact_wire_nbytes,
    extract_payloads,
    payload_wire_nbytes,
)
from splitnet.codecs.registry import codec_class, make_codec
from splitnet.codecs.tokens import gather_tokens, scatter_tokens
from splitnet.errors import CodecError, ProtocolError, UnknownRequest

CODED_TENSOR = "hidden"
#: request contexts each side of a cut remembers by default (the stage passes more for more requests)
MAX_CONTEXTS = 4096


class _Contexts:
    """A bounded map of request context -> value, least recently used dropped first."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"max_contexts must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._d: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: Hashable, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        self._d.pop(key, None)

    def __len__(self) -> int:
        return len(self._d)


def load_codec_spec(spec: str) -> Codec | None:
    """"" -> None (raw); a registry name -> that stateless codec; a path -> the saved codec."""
    if not spec:
        return None
    if Path(spec).exists():
        from splitnet.codecs import load_codec  # provided by the codecs package

        return load_codec(spec)
    cls = codec_class(spec)
    if cls.needs_fit:
        raise CodecError(f"codec {spec!r} must be fitted first: run `splitnet calibrate ... --codec {spec}` and pass the file")
    return cls()


class CutCodecs:
    """The codec a stage encodes with, and the codecs it can decode (stateless ones by name,
    fitted ones by codebook hash)."""

    def __init__(self, codec_out: str = "", codec_files: tuple[str, ...] = (), *, max_contexts: int = MAX_CONTEXTS):
        self.out = load_codec_spec(codec_out)
        self._sent = _Contexts(max_contexts)  # request context -> layout of the full entry sent for it
        self._bound = _Contexts(max_contexts)  # request context -> (codec, layout) of the full entry decoded for it
        self.by_hash: dict[str, Codec] = {}
        for f in codec_files:
            c = load_codec_spec(f)
            if c is not None:
                self.by_hash[c.codebook_hash] = c
        if self.out is not None and self.out.codebook_hash:
            self.by_hash.setdefault(self.out.codebook_hash, self.out)

    def encode(self, outputs: Mapping[str, Any], *, context: Hashable | None = None, pos: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, meta) to send for a stage's outputs.

        ``context`` names the cached request this message is a step of, as the receiver will key
        it (sender, request id, epoch), ``pos`` the step's first position: a step after the first
        (``pos`` > 0) whose request was sent a full entry in the same layout goes compact;
        without ``context`` every message carries the full entry."""
        tensors = dict(outputs)
        meta: dict[str, Any] = {}
        if self.out is not None and CODED_TENSOR in tensors:
            h = tensors.pop(CODED_TENSOR)
            arr = h.detach().float().cpu().numpy() if hasattr(h, "detach") else np.asarray(h, np.float32)  # torch or numpy: no torch import here (edge devices)
            mask = tensors.get("attention_mask")
            lengths = None  # a (B, T, C) tensor is B sequences of T tokens
            if mask is not None and arr.ndim == 3 and tuple(mask.shape) == arr.shape[:2] and not bool((mask != 0).all()):
                # padding never crosses the wire: encode only real tokens; the mask travels anyway
                arr = gather_tokens(arr, mask)
                meta["packed_tokens"] = True
                lengths = (np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask) != 0).sum(1)
            if getattr(self.out, "needs_lengths", False):  # a sequence correction is per sequence, as the decoder splits them
                p = self.out.encode(arr, lengths=lengths)
            else:
                p = self.out.encode(arr)
            self._attach(tensors, meta, p, context, pos)
        _compact_mask(tensors, meta)
        return tensors, meta

    def _attach(self, tensors: dict[str, Any], meta: dict[str, Any], p: Payload, context: Hashable | None, pos: int | None) -> None:
        """``p`` compact when the request's receiver holds its layout, else as a full entry (remembered)."""
        if context is not None and isinstance(pos, int) and pos > 0 and not meta.get("packed_tokens"):
            layout = self._sent.get(context)
            value = compact_value(p, layout) if layout is not None else None
            if value is not None:
                meta[COMPACT_KEY] = value
                return
        attach_payloads(tensors, meta, {CODED_TENSOR: p})
        if context is not None:  # the receiver binds the request to this entry's layout (or unbinds it)
            layout = compact_layout(p)
            if layout is None:
                self._sent.pop(context)
            else:
                self._sent.put(context, layout)

    def decoder_for(self, p: Payload) -> Codec:
        if p.codebook_hash:
            c = self.by_hash.get(p.codebook_hash)
            if c is None:
                raise CodecError(
                    f"no codec with codebook {p.codebook_hash[:12]} is loaded on this stage; "
                    "start it with --codec-file pointing at the calibrated codec"
                )
            check_hash(c.codebook_hash, p)
            return c
        cls = codec_class(p.codec)
        if cls.needs_fit:
            raise CodecError(f"payload of fitted codec {p.codec!r} carries no codebook hash")
        return cls()

    def decode(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, context: Hashable | None = None) -> dict[str, np.ndarray]:
        """The tensors a received message's cut carries. ``context`` names the cached request it
        is a step of (as the sender keyed it): a full entry binds the request to its codec, a
        compact step is decoded with the codec its request is bound to."""
        raw, payloads = extract_payloads(tensors, meta)
        codecs: dict[str, Codec] = {}
        compact = meta.get(COMPACT_KEY)
        if compact is not None:
            codec, p = self._compact(compact, meta, context, raw, payloads)
            payloads[CODED_TENSOR], codecs[CODED_TENSOR] = p, codec
        _expand_mask(raw, meta)
        for name, p in payloads.items():
            codec = codecs[name] if name in codecs else self.decoder_for(p)
            if getattr(codec, "needs_lengths", False) and meta.get("packed_tokens") and "attention_mask" in raw:
                # a context adapter attends within each sequence: tell it where packed sequences end
                raw[name] = codec.decode(p, lengths=raw["attention_mask"].astype(bool).sum(1))
            else:
                raw[name] = codec.decode(p)
            if context is not None and name == CODED_TENSOR and name not in codecs:  # a full entry (re)binds its request
                layout = compact_layout(p)
                if layout is None:
                    self._bound.pop(context)
                else:
                    self._bound.put(context, (codec, layout))
        if meta.get("packed_tokens") and CODED_TENSOR in raw:
            if "attention_mask" not in raw:
                raise CodecError("packed tokens arrived without the attention_mask needed to unpack them")
            raw[CODED_TENSOR] = scatter_tokens(raw[CODED_TENSOR], raw["attention_mask"])
        return raw

    def _compact(self, value: Any, meta: Mapping[str, Any], context: Hashable | None, raw: Mapping[str, Any],
                 payloads: Mapping[str, Payload]) -> tuple[Codec, Payload]:
        """The codec and payload a compact step stands for; typed errors when it cannot be read."""
        if CODED_TENSOR in payloads or CODED_TENSOR in raw:
            raise ProtocolError(f"{CODED_TENSOR!r} arrived both as compact codes (meta.{COMPACT_KEY}) and as a tensor or full entry")
        if meta.get("packed_tokens"):
            raise ProtocolError(f"compact codes (meta.{COMPACT_KEY}) are a (1, n, C) tensor: they never carry packed tokens")
        if context is None:
            raise ProtocolError(f"compact codes (meta.{COMPACT_KEY}) travel only in the steps of a cached request, "
                                "never in an uncached or batch message")
        bound: tuple[Codec, CompactLayout] | None = self._bound.get(context)
        if bound is None:
            raise UnknownRequest("compact codes arrived for a request this stage holds no codec context for (restarted, "
                                 "replaced, or its first step never reached this stage); replay the request from its first token")
        codec, layout = bound
        return codec, compact_payload(value, layout)


def cut_wire_nbytes(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes the cut codec adds to a forward message, bytes of its arrays alone) for what
    :meth:`CutCodecs.encode` returned: the compact codes with their key, or the ``codecs`` map
    with its entries (under their real tensor names) and framed parts; (0, 0) for a raw cut."""
    if COMPACT_KEY in meta:
        return compact_wire_nbytes(meta[COMPACT_KEY]), len(meta[COMPACT_KEY][1])
    if not meta.get("codecs"):
        return 0, 0
    _, payloads = extract_payloads(tensors, meta)
    return (sum(payload_wire_nbytes(p, name) for name, p in payloads.items()),
            sum(int(a.nbytes) for p in payloads.values() for a in p.parts.values()))


def _compact_mask(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Send an attention mask as what it costs least: per-sequence lengths (int32) when every
    row is right-padded (ones, then zeros), else one byte per position."""
    mask = tensors.get("attention_mask")
    if mask is None:
        return
    m = (mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)) != 0
    if m.ndim != 2:
        return
    if m.all():
        del tensors["attention_mask"]  # no padding: the receiving stage assumes every position is real
        return
    lengths = m.sum(1)
    if np.array_equal(m, np.arange(m.shape[1])[None, :] < lengths[:, None]):
        del tensors["attention_mask"]
        tensors["lengths"] = lengths.astype(np.int32)
        meta["mask_len"] = int(m.shape[1])
    else:
        tensors["attention_mask"] = m.astype(np.uint8)


def _expand_mask(raw: dict[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Rebuild the (B, T) int64 attention mask the stage expects from what crossed the cut."""
    if "lengths" in raw:
        T = meta.get("mask_len")
        lengths = raw.pop("lengths")
        if type(T) is not int or T < 0 or lengths.ndim != 1 or (lengths < 0).any() or (lengths > T).any():
            raise CodecError("a cut sent sequence lengths without a valid meta.mask_len")
        raw["attention_mask"] = (np.arange(T)[None, :] < lengths.astype(np.int64)[:, None]).astype(np.int64)
    elif "attention_mask" in raw and raw["attention_mask"].dtype != np.int64:
        raw["attention_mask"] = raw["attention_mask"].astype(np.int64)


__all__ = ["COMPACT_KEY", "COMPACT_VERSION", "CutCodecs", "cut_wire_nbytes", "load_codec_spec", "make_codec"]
