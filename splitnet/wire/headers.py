"""Typed ``meta`` of a ``forward`` message: the declared schema of what rides in its header.

A forward message (client -> stage 0, stage i -> stage i+1) carries in ``meta`` where the
activations go next, where the result goes, and how the receiving stage treats its KV cache.
:class:`ForwardHeader` is that structure, frozen and validated: ``to_meta()`` writes the msgpack
map (fields at their default are left out, as msgspec's ``omit_defaults`` does) and
``from_meta()`` reads one back, rejecting unknown header versions, unknown keys and values of
the wrong type with :class:`~splitnet.errors.ProtocolError` before anything uses them.

Fields written by the client: ``route``, ``route_keys``, ``reply_to``, ``cache``, ``pos``,
``rewind``, ``want_result``, ``all_logits``, ``head``, ``top_k`` and, with a local edge stage,
the cut codec's ``codecs`` / ``packed_tokens`` / ``mask_len``. Fields a stage adds for the next
one: ``trace``, ``origin``, ``upstream_batch``, ``reply_key``, ``final``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from splitnet.errors import ProtocolError

#: version of the forward header (``meta["hv"]``); a header without ``hv`` is version 1
FORWARD_HEADER_VERSION = 1
HEADS = ("logits", "argmax", "topk")
MAX_ROUTE = 64  # stages a forward may still visit
MAX_TOP_K = 1024
MAX_TRACE = 256  # per-stage trace entries a header may carry

_ENDPOINT_PREFIXES = ("tcp://", "ipc://", "inproc://")
_PEER_REPLY = re.compile(r"peer:[0-9a-f]{8,64}")
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


@dataclass(frozen=True)
class ForwardHeader:
    """What a forward message's ``meta`` holds.

    Attributes:
        reply_to: where the last stage sends the result: an endpoint, or ``"peer:" + routing id``
            (the client's own connection to the last stage).
        route: endpoints still to visit after the receiving stage, in order.
        route_keys: the CURVE public keys of ``route``'s stages (at most one per entry).
        cache: keep a KV cache for this request (decoders).
        pos: the position of this chunk's first token in the request's sequence; a stage whose
            cache holds another length refuses the chunk (``UnknownRequest``) unless ``rewind``.
        rewind: a cache longer than ``pos`` is cut back to ``pos`` (rejected speculative tokens).
        want_result: the client reads this step's output (False for non-final prefill chunks).
        all_logits: return every position's head output, not only the last (speculation).
        head: what the last stage returns: ``"logits"``, ``"argmax"`` or ``"topk"``.
        top_k: how many logits with ``head="topk"`` (1..1024).
        codecs: the cut codec's payload descriptors (validated by :mod:`splitnet.codecs.framing`).
        packed_tokens: padding was removed before encoding (the mask says where tokens go).
        mask_len: the padded length of a mask sent as per-sequence lengths.
        trace: per-stage timings, appended by each stage.
        origin: the requester's key, vouched for by a trusted upstream stage.
        upstream_batch: ``[batch id, members]`` of the upstream forward this one came from.
        reply_key: the CURVE key the result socket must authenticate as.
        final: the request ends with this step (its cache may be dropped after it).
        version: the header version (``hv``); only :data:`FORWARD_HEADER_VERSION` is understood.
    """

    reply_to: str
    route: tuple[str, ...] = ()
    route_keys: tuple[str, ...] = ()
    cache: bool = False
    pos: int | None = None
    rewind: bool = False
    want_result: bool = True
    all_logits: bool = False
    head: str = "logits"
    top_k: int | None = None
    codecs: Any = None
    packed_tokens: bool = False
    mask_len: int | None = None
    trace: tuple[Any, ...] = ()
    origin: str | None = None
    upstream_batch: tuple[int, int] | None = None
    reply_key: str | None = None
    final: bool = False
    version: int = field(default=FORWARD_HEADER_VERSION)

    def __post_init__(self) -> None:
        _check(self)

    def to_meta(self) -> dict[str, Any]:
        """The msgpack-ready ``meta`` map: ``hv``, ``reply_to``, ``route`` and every field not at its default."""
        meta: dict[str, Any] = {"hv": self.version, "reply_to": self.reply_to, "route": list(self.route)}
        for f in fields(self):
            if f.name in ("version", "reply_to", "route"):
                continue
            value = getattr(self, f.name)
            if value == f.default:
                continue
            meta[f.name] = list(value) if isinstance(value, tuple) else value
        return meta

    @classmethod
    def from_meta(cls, meta: Any) -> "ForwardHeader":
        """Read and validate a received ``meta``; raise ProtocolError naming what is wrong."""
        if not isinstance(meta, Mapping):
            raise ProtocolError(f"a forward message's meta must be a map, got {type(meta).__name__}")
        version = meta.get("hv", FORWARD_HEADER_VERSION)
        if type(version) is not int or version != FORWARD_HEADER_VERSION:
            raise ProtocolError(f"forward header version {version!r} is not understood; this peer speaks version {FORWARD_HEADER_VERSION}")
        unknown = sorted(str(k) for k in meta if k not in _FIELD_NAMES and k != "hv")
        if unknown:
            raise ProtocolError(f"forward meta has unknown keys {unknown[:8]}; known: {sorted(_FIELD_NAMES - {'version'})}")
        if "reply_to" not in meta:
            raise ProtocolError("forward message needs meta.reply_to: an endpoint string, or 'peer:' + the client's routing id (8-64 hex digits)")
        values = {k: v for k, v in meta.items() if k != "hv"}
        for name in ("route", "route_keys", "trace", "upstream_batch"):
            v = values.get(name)
            if v is not None:
                if not isinstance(v, (list, tuple)):
                    raise ProtocolError(f"meta.{name} must be a list, got {type(v).__name__}")
                values[name] = tuple(v)
        return cls(**values, version=version)


_FIELD_NAMES = frozenset(f.name for f in fields(ForwardHeader))


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass: a True is not a position


def _check(h: ForwardHeader) -> None:
    """Every field's type and range; ProtocolError names the first that is wrong."""
    if not isinstance(h.reply_to, str) or not (h.reply_to.startswith(_ENDPOINT_PREFIXES) or _PEER_REPLY.fullmatch(h.reply_to)):
        raise ProtocolError("forward message needs meta.reply_to: an endpoint string, or 'peer:' + the client's routing id (8-64 hex digits)")
    if not isinstance(h.route, tuple) or len(h.route) > MAX_ROUTE or not all(isinstance(r, str) and r.startswith(_ENDPOINT_PREFIXES) for r in h.route):
        raise ProtocolError(f"meta.route must be a list of at most {MAX_ROUTE} endpoint strings (tcp://, ipc://, inproc://)")
    if not isinstance(h.route_keys, tuple) or len(h.route_keys) > len(h.route):
        raise ProtocolError("meta.route_keys must be a list with at most one key per route entry")
    keys = list(h.route_keys) + ([h.reply_key] if h.reply_key is not None else [])
    if not all(isinstance(k, str) and _Z85_KEY.fullmatch(k) for k in keys):
        raise ProtocolError("meta.reply_key and meta.route_keys must hold 40-character Z85 CURVE public keys")
    for name in ("cache", "rewind", "want_result", "all_logits", "packed_tokens", "final"):
        if type(getattr(h, name)) is not bool:
            raise ProtocolError(f"meta.{name} must be true or false, got {getattr(h, name)!r}")
    if h.pos is not None and not (_is_int(h.pos) and h.pos >= 0):
        raise ProtocolError(f"meta.pos must be a non-negative int, got {h.pos!r}")
    if h.mask_len is not None and not (_is_int(h.mask_len) and h.mask_len >= 0):
        raise ProtocolError(f"meta.mask_len must be a non-negative int, got {h.mask_len!r}")
    if h.head not in HEADS:
        raise ProtocolError(f"meta.head must be one of {list(HEADS)}, got {h.head!r}")
    if h.head == "topk" and not (_is_int(h.top_k) and 1 <= h.top_k <= MAX_TOP_K):
        raise ProtocolError(f"meta.head 'topk' needs meta.top_k, an int in 1..{MAX_TOP_K}")
    if h.top_k is not None and not (_is_int(h.top_k) and 1 <= h.top_k <= MAX_TOP_K):
        raise ProtocolError(f"meta.top_k must be an int in 1..{MAX_TOP_K}, got {h.top_k!r}")
    if not isinstance(h.trace, tuple) or len(h.trace) > MAX_TRACE:
        raise ProtocolError(f"meta.trace must be a list of at most {MAX_TRACE} entries")
    if h.origin is not None and not (isinstance(h.origin, str) and (h.origin == "" or _Z85_KEY.fullmatch(h.origin))):
        raise ProtocolError("meta.origin must be a 40-character Z85 CURVE public key")
    if h.upstream_batch is not None and not (len(h.upstream_batch) == 2 and all(_is_int(x) and x >= 0 for x in h.upstream_batch)):
        raise ProtocolError("meta.upstream_batch must be [batch id, members], two non-negative ints")
    if h.codecs is not None and not isinstance(h.codecs, Mapping):
        raise ProtocolError(f"meta.codecs must be a map of tensor name -> payload, got {type(h.codecs).__name__}")
    if not _is_int(h.version):
        raise ProtocolError(f"forward header version must be an int, got {h.version!r}")


__all__ = ["FORWARD_HEADER_VERSION", "ForwardHeader", "HEADS", "MAX_ROUTE", "MAX_TOP_K"]
