"""Applying codecs to the tensors that cross a cut (``hidden``); everything else travels raw."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from splitnet.codecs.base import Codec, Payload
from splitnet.codecs.framing import attach_payloads, check_hash, extract_payloads
from splitnet.codecs.registry import codec_class, make_codec
from splitnet.codecs.tokens import gather_tokens, scatter_tokens
from splitnet.errors import CodecError

CODED_TENSOR = "hidden"


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

    def __init__(self, codec_out: str = "", codec_files: tuple[str, ...] = ()):
        self.out = load_codec_spec(codec_out)
        self.by_hash: dict[str, Codec] = {}
        for f in codec_files:
            c = load_codec_spec(f)
            if c is not None:
                self.by_hash[c.codebook_hash] = c
        if self.out is not None and self.out.codebook_hash:
            self.by_hash.setdefault(self.out.codebook_hash, self.out)

    def encode(self, outputs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, meta) to send for a stage's outputs."""
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
                attach_payloads(tensors, meta, {CODED_TENSOR: self.out.encode(arr, lengths=lengths)})
            else:
                attach_payloads(tensors, meta, {CODED_TENSOR: self.out.encode(arr)})
        _compact_mask(tensors, meta)
        return tensors, meta

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

    def decode(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
        raw, payloads = extract_payloads(tensors, meta)
        _expand_mask(raw, meta)
        for name, p in payloads.items():
            codec = self.decoder_for(p)
            if getattr(codec, "needs_lengths", False) and meta.get("packed_tokens") and "attention_mask" in raw:
                # a context adapter attends within each sequence: tell it where packed sequences end
                raw[name] = codec.decode(p, lengths=raw["attention_mask"].astype(bool).sum(1))
            else:
                raw[name] = codec.decode(p)
        if meta.get("packed_tokens") and CODED_TENSOR in raw:
            if "attention_mask" not in raw:
                raise CodecError("packed tokens arrived without the attention_mask needed to unpack them")
            raw[CODED_TENSOR] = scatter_tokens(raw[CODED_TENSOR], raw["attention_mask"])
        return raw


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


__all__ = ["CutCodecs", "load_codec_spec", "make_codec"]
