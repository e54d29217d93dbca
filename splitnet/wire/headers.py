"""Typed ``meta`` of a ``forward`` message: the declared schema of what rides in its header.

A forward message (client -> stage 0, stage i -> stage i+1) carries in ``meta`` where the
activations go next, where the result goes, and how the receiving stage treats its KV cache.
:class:`ForwardHeader` is that structure, frozen and validated: ``to_meta()`` writes the msgpack
map (fields at their default are left out, as msgspec's ``omit_defaults`` does) and
``from_meta()`` reads one back, rejecting unknown header versions, unknown keys and values of
the wrong type with :class:`~splitnet.errors.ProtocolError` before anything uses them.

Fields written by the client: ``route``, ``route_keys``, ``reply_to``, ``cache``, ``pos``,
``rewind``, ``want_result``, ``all_logits``, ``head``, ``top_k`` and, with a local edge stage,
the cut codec's ``codecs`` (or ``cc``) / ``packed_tokens`` / ``mask_len``, ``batch_messages``. Fields a stage
adds for the next one: ``trace``, ``origin``, ``upstream_batch``, ``reply_key``, ``final``.

Batch messages (kinds ``forward_batch`` and ``result_batch``) carry the steps of many requests in
one message: every tensor once, its members' rows concatenated along the batch dimension, and a
typed per-member header list. :class:`ForwardBatchHeader` and :class:`ResultBatchHeader` are their
``meta``; each member of a forward batch is a whole :class:`ForwardHeader` (the fields the batch
holds once, ``route``, ``route_keys``, ``mask_len`` and ``upstream_batch``, merged in), so a member
split off a batch is checked exactly as a forward message of its own.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from splitnet.errors import ProtocolError

#: version of the forward header (``meta["hv"]``); a header without ``hv`` is version 1
FORWARD_HEADER_VERSION = 1
HEADS = ("logits", "argmax", "topk")
MAX_ROUTE = 64  # stages a forward may still visit
MAX_REQ_ID = 64  # characters of a request id a header may name (resume_from)
#: positions per fill-only forward of a refill (a survivor's, or a client's of a replaced first
#: stage): nobody waits for a fill's result and the resumed step waits for all of them, so few
#: long forwards win (pipelining across stages only helps a run of several replaced stages)
FILL_CHUNK_TOKENS = 512


def refill_run(refill: Any, first: int) -> int:
    """How many stages from ``first`` on, consecutively, a ``meta.refill`` names: the run of
    lost stages that one fill (from the stage before ``first``, or the client) goes through."""
    lost, n = set(refill), 0
    while first + n in lost:
        n += 1
    return n
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
        cc: the cut tensor's codes in the compact form, ``[vectors, bytes]``, for a cached
            request's later steps (validated by :mod:`splitnet.codecs.framing` against the codec
            the request's earlier full entry bound it to).
        trace: per-stage timings, appended by each stage.
        origin: the requester's key, vouched for by a trusted upstream stage.
        upstream_batch: ``[batch id, members]`` of the upstream forward this one came from.
        reply_key: the CURVE key the result socket must authenticate as.
        final: the request ends with this step (its cache may be dropped after it).
        batch_messages: every stage after the receiving one and the client take batch messages
            (``forward_batch``, ``result_batch``): set by a client whose stages all announce them
            (``info["batch_messages"]``), so an older peer is never sent a kind it refuses.
        resume_from: the request id this one resumes after a recovery: a stage holding that
            request's cache (of the same client) takes it over under this id, cut back to
            ``pos``, instead of the client replaying everything (see ``refill``).
        refill: the stages (indices) that lost their caches in the recovery this step resumes
            after; the surviving stage right before each run of them first sends them, from
            what it sent before (:class:`~splitnet.runtime.sent_log.SentLog`), the states of
            positions ``0..pos-1``, so that they rebuild their caches before this step.
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
    cc: Any = None
    trace: tuple[Any, ...] = ()
    origin: str | None = None
    upstream_batch: tuple[int, int] | None = None
    reply_key: str | None = None
    final: bool = False
    batch_messages: bool = False
    resume_from: str | None = None
    refill: tuple[int, ...] = ()
    version: int = field(default=FORWARD_HEADER_VERSION)

    def __post_init__(self) -> None:
        _check(self)

    def to_meta(self) -> dict[str, Any]:
        """The msgpack-ready ``meta`` map: ``hv``, ``reply_to``, ``route`` and every field not at its default."""
        meta: dict[str, Any] = {"hv": self.version, "reply_to": self.reply_to, "route": list(self.route)}
        values = self.__dict__
        for name, default in _OPTIONAL_FIELDS:
            value = values[name]
            if value == default:
                continue
            meta[name] = list(value) if type(value) is tuple else value
        return meta

    @classmethod
    def from_meta(cls, meta: Any) -> "ForwardHeader":
        """Read and validate a received ``meta``; raise ProtocolError naming what is wrong."""
        if not _is_map(meta):
            raise ProtocolError(f"a forward message's meta must be a map, got {type(meta).__name__}")
        version = meta.get("hv", FORWARD_HEADER_VERSION)
        if type(version) is not int or version != FORWARD_HEADER_VERSION:
            raise ProtocolError(f"forward header version {version!r} is not understood; this peer speaks version {FORWARD_HEADER_VERSION}")
        unknown = [k for k in meta if k not in _META_KEYS]
        if unknown:
            raise ProtocolError(f"forward meta has unknown keys {sorted(map(str, unknown))[:8]}; known: {sorted(_META_KEYS)}")
        if "reply_to" not in meta:
            raise ProtocolError("forward message needs meta.reply_to: an endpoint string, or 'peer:' + the client's routing id (8-64 hex digits)")
        values = {k: v for k, v in meta.items() if k != "hv"}
        for name in ("route", "route_keys", "trace", "upstream_batch", "refill"):
            v = values.get(name)
            if v is not None:
                if not isinstance(v, (list, tuple)):
                    raise ProtocolError(f"meta.{name} must be a list, got {type(v).__name__}")
                values[name] = tuple(v)
        return cls(**values, version=version)

    @classmethod
    def from_meta_like(cls, meta: Any, first: "ForwardHeader", first_meta: Mapping[str, Any]) -> "ForwardHeader":
        """:meth:`from_meta` of ``meta``, read as a sibling of ``first_meta`` (read as ``first``):
        see :class:`SiblingHeaders`, which does this for many members at once."""
        return SiblingHeaders(first, first_meta).read(meta)


class SiblingHeaders:
    """Reads the headers of a batch's members after its first, as :meth:`ForwardHeader.from_meta`
    would, checking only what differs from the first.

    A member ``meta`` with the same keys as the first's, whose every value but those of
    :data:`SIBLING_VARYING` (``pos``, ``final``, ``trace``, ``want_result``, ``rewind``) is the
    first's own object or a scalar of the same type equal to it, is checked in those varying
    fields only, with the very checks :meth:`ForwardHeader.from_meta` runs on them (the other
    fields passed theirs in the first). Any other ``meta`` is read by ``from_meta`` whole, so
    what is accepted and refused is exactly what ``from_meta`` accepts and refuses."""

    def __init__(self, first: ForwardHeader, first_meta: Mapping[str, Any]):
        self.first = first
        self.first_meta = first_meta
        self._fast = type(first_meta) is dict
        if self._fast:
            self._keys = first_meta.keys()
            fixed = [k for k in first_meta if k not in SIBLING_VARYING]
            self._scalar_keys = [k for k in fixed if type(first_meta[k]) in _SCALARS]
            self._scalars = [first_meta[k] for k in self._scalar_keys]
            self._types = [type(v) for v in self._scalars]
            self._object_keys = [k for k in fixed if type(first_meta[k]) not in _SCALARS]  # lists, maps: the same object only
            self._objects = [first_meta[k] for k in self._object_keys]
            self._varying = [k for k in SIBLING_VARYING if k in first_meta]

    def read(self, meta: Any) -> ForwardHeader:
        if not self._fast or type(meta) is not dict or meta.keys() != self._keys:
            return ForwardHeader.from_meta(meta)
        values = [meta[k] for k in self._scalar_keys]
        if values != self._scalars or list(map(type, values)) != self._types:  # type-strict: 1 == True, yet 1 is no flag
            return ForwardHeader.from_meta(meta)
        for k, w in zip(self._object_keys, self._objects):
            if meta[k] is not w:
                return ForwardHeader.from_meta(meta)
        h = object.__new__(ForwardHeader)  # every field checked: those equal to the first's by its own check, the others here
        d = h.__dict__
        d.update(self.first.__dict__)
        for k in self._varying:
            v = meta[k]
            if k == "trace":
                if not isinstance(v, (list, tuple)):
                    raise ProtocolError(f"meta.trace must be a list, got {type(v).__name__}")
                v = tuple(v)
                _check_trace(v)
            elif k == "pos":
                _check_pos(v)
            else:
                _check_flag(k, v)
            d[k] = v
        return h


#: the fields in which members of one batch usually differ (a decode step's position, its last
#: step, its trace): :meth:`ForwardHeader.from_meta_like` checks only these for a member whose
#: other fields equal the first member's
SIBLING_VARYING = frozenset({"pos", "final", "trace", "want_result", "rewind"})
_SCALARS = (str, int, bool, float, type(None))

_FIELD_NAMES = frozenset(f.name for f in fields(ForwardHeader))
_META_KEYS = (_FIELD_NAMES - {"version"}) | {"hv"}  # the version travels as "hv"
_OPTIONAL_FIELDS = tuple((f.name, f.default) for f in fields(ForwardHeader) if f.name not in ("version", "reply_to", "route"))


def _is_map(v: Any) -> bool:
    return type(v) is dict or isinstance(v, Mapping)  # the abc check is slow; msgpack gives dicts


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass: a True is not a position


def _check(h: ForwardHeader) -> None:
    """Every field's type and range; ProtocolError names the first that is wrong."""
    try:
        _check_addresses(h.reply_to, h.route, h.route_keys, h.reply_key, h.origin)  # the members of a batch repeat these: checked once
    except TypeError:  # unhashable: not strings, so not valid
        _check_addresses.__wrapped__(h.reply_to, h.route, h.route_keys, h.reply_key, h.origin)
    _check_values(h)


@functools.lru_cache(maxsize=1024)
def _check_addresses(reply_to: Any, route: Any, route_keys: Any, reply_key: Any, origin: Any) -> None:
    """The endpoint and key fields (a result cached per distinct tuple: only successes are kept)."""
    if not isinstance(reply_to, str) or not (reply_to.startswith(_ENDPOINT_PREFIXES) or _PEER_REPLY.fullmatch(reply_to)):
        raise ProtocolError("forward message needs meta.reply_to: an endpoint string, or 'peer:' + the client's routing id (8-64 hex digits)")
    if not isinstance(route, tuple) or len(route) > MAX_ROUTE or not all(isinstance(r, str) and r.startswith(_ENDPOINT_PREFIXES) for r in route):
        raise ProtocolError(f"meta.route must be a list of at most {MAX_ROUTE} endpoint strings (tcp://, ipc://, inproc://)")
    if not isinstance(route_keys, tuple) or len(route_keys) > len(route):
        raise ProtocolError("meta.route_keys must be a list with at most one key per route entry")
    keys = list(route_keys) + ([reply_key] if reply_key is not None else [])
    if not all(isinstance(k, str) and _Z85_KEY.fullmatch(k) for k in keys):
        raise ProtocolError("meta.reply_key and meta.route_keys must hold 40-character Z85 CURVE public keys")
    if origin is not None and not (isinstance(origin, str) and (origin == "" or _Z85_KEY.fullmatch(origin))):
        raise ProtocolError("meta.origin must be a 40-character Z85 CURVE public key")


_FLAGS = ("cache", "rewind", "want_result", "all_logits", "packed_tokens", "final", "batch_messages")


def _check_flag(name: str, v: Any) -> None:
    if type(v) is not bool:
        raise ProtocolError(f"meta.{name} must be true or false, got {v!r}")


def _check_pos(v: Any) -> None:
    if v is not None and not (_is_int(v) and v >= 0):
        raise ProtocolError(f"meta.pos must be a non-negative int, got {v!r}")


def _check_trace(v: Any) -> None:
    if not isinstance(v, tuple) or len(v) > MAX_TRACE:
        raise ProtocolError(f"meta.trace must be a list of at most {MAX_TRACE} entries")


def _check_values(h: ForwardHeader) -> None:
    """The flags, positions, head, trace and marks."""
    for name in _FLAGS:
        _check_flag(name, getattr(h, name))
    _check_pos(h.pos)
    if h.mask_len is not None and not (_is_int(h.mask_len) and h.mask_len >= 0):
        raise ProtocolError(f"meta.mask_len must be a non-negative int, got {h.mask_len!r}")
    if h.head not in HEADS:
        raise ProtocolError(f"meta.head must be one of {list(HEADS)}, got {h.head!r}")
    if h.head == "topk" and not (_is_int(h.top_k) and 1 <= h.top_k <= MAX_TOP_K):
        raise ProtocolError(f"meta.head 'topk' needs meta.top_k, an int in 1..{MAX_TOP_K}")
    if h.top_k is not None and not (_is_int(h.top_k) and 1 <= h.top_k <= MAX_TOP_K):
        raise ProtocolError(f"meta.top_k must be an int in 1..{MAX_TOP_K}, got {h.top_k!r}")
    _check_trace(h.trace)
    if h.upstream_batch is not None and not (len(h.upstream_batch) == 2 and all(_is_int(x) and x >= 0 for x in h.upstream_batch)):
        raise ProtocolError("meta.upstream_batch must be [batch id, members], two non-negative ints")
    if h.codecs is not None and not _is_map(h.codecs):
        raise ProtocolError(f"meta.codecs must be a map of tensor name -> payload, got {type(h.codecs).__name__}")
    if h.cc is not None and not (type(h.cc) is list and len(h.cc) == 2):
        raise ProtocolError("meta.cc must be [vectors, bytes]: the compact codes of the cut tensor")
    if h.resume_from is not None and not (isinstance(h.resume_from, str) and 0 < len(h.resume_from) <= MAX_REQ_ID):
        raise ProtocolError(f"meta.resume_from must be a request id (a string of 1..{MAX_REQ_ID} characters)")
    if h.refill and not (isinstance(h.refill, tuple) and len(h.refill) <= MAX_ROUTE + 1 and all(_is_int(i) and 0 <= i <= MAX_ROUTE for i in h.refill)
                         and list(h.refill) == sorted(set(h.refill))):
        raise ProtocolError(f"meta.refill must be a sorted list of distinct stage indices (0..{MAX_ROUTE})")
    if not _is_int(h.version):
        raise ProtocolError(f"forward header version must be an int, got {h.version!r}")


# ------------------------------------------------------------------ batch messages -----------
#: version of a batch message's header (``meta["bv"]``)
BATCH_HEADER_VERSION = 1
MAX_BATCH_MEMBERS = 256  # steps one batch message may carry (msgpack's container limit is 1,024)
#: ForwardHeader fields a forward batch holds once, for every member (one route per message)
BATCH_FIELDS = ("route", "route_keys", "mask_len", "upstream_batch")
#: ForwardHeader fields no member of a batch may carry: a batch's tensors travel raw, since a
#: codec payload describes one tensor of one message, and a codec's scales may span its rows
_NOT_IN_BATCH = ("codecs", "cc", "packed_tokens", "hv")
_FORWARD_BATCH_KEYS = frozenset({"bv", "members", "shared", *BATCH_FIELDS})
_RESULT_BATCH_KEYS = frozenset({"bv", "members", "shared"})
_RESULT_MEMBER_KEYS = frozenset({"trace"})
_MEMBER_FORBIDDEN = frozenset(BATCH_FIELDS) | frozenset(_NOT_IN_BATCH)


def _batch_fields(h: ForwardHeader) -> tuple:
    d = h.__dict__
    return (d["route"], d["route_keys"], d["mask_len"], d["upstream_batch"])  # BATCH_FIELDS, in order


@dataclass(frozen=True)
class BatchMember:
    """One step carried by a batch message.

    Attributes:
        req, seq, epoch: the step, as a message of its own carries them in its header.
        rows: how many rows of every split tensor are this member's (members in order).
        header: in a forward batch, the member's whole :class:`ForwardHeader` (the batch's
            route, route keys, mask length and upstream mark merged in); None in a result batch.
        trace: in a result batch, the member's per-stage trace.
    """

    req: str
    seq: int
    epoch: int
    rows: int
    header: ForwardHeader | None = None
    trace: tuple[Any, ...] = ()
    #: a received member's checked fields, batch fields merged in; on a sender, the ``meta``
    #: ``header`` was read from (:meth:`BatchHeader.to_meta` then writes it as it is, but the
    #: fields the batch holds once, instead of writing ``header`` back into a map)
    meta: Any = field(default=None, compare=False, repr=False)


def batch_member(req: str, seq: int, epoch: int, rows: int, header: ForwardHeader | None = None, trace: tuple = (), meta: Any = None) -> BatchMember:
    """``BatchMember(req, seq, epoch, rows, header, trace, meta)`` without the frozen dataclass's
    per-field ``__setattr__`` (built for every member of every batch). Its values are checked
    where every member's are: when a :class:`BatchHeader` is made of it (or by
    :meth:`BatchHeader.from_meta`, which makes them of checked values)."""
    m = object.__new__(BatchMember)
    m.__dict__.update(req=req, seq=seq, epoch=epoch, rows=rows, header=header, trace=trace, meta=meta)
    return m


@dataclass(frozen=True)
class BatchHeader:
    """``meta`` of a batch message: its members in row order and the tensors they share.

    Wire form (msgpack map)::

        {"bv": 1,
         "members": [[req, seq, epoch, rows, {member fields}], ...],
         "shared": [tensor names every member gets whole, e.g. "vocab"],
         # forward_batch only, once for all members:
         "route": [...], "route_keys": [...], "mask_len": T, "upstream_batch": [id, n]}

    A forward member's fields are its :class:`ForwardHeader` fields but the batch's own (and but
    ``codecs`` / ``packed_tokens``: a batch's tensors travel raw); a result member's are
    ``{"trace": [...]}``.
    """

    kind: str  # "forward_batch" or "result_batch"
    members: tuple[BatchMember, ...]
    shared: tuple[str, ...] = ()
    version: int = BATCH_HEADER_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.members, tuple):
            raise ProtocolError(f"a batch message carries 1..{MAX_BATCH_MEMBERS} members")
        _check_batch(self.kind, self.members, self.shared)
        steps = set()
        for m in self.members:
            _check_step(m.req, m.seq, m.epoch, m.rows)
            if (m.req, m.seq) in steps:
                raise ProtocolError(f"request {m.req!r} step {m.seq} appears twice in one batch message")
            steps.add((m.req, m.seq))
            if (self.kind == "forward_batch") != (m.header is not None):
                raise ProtocolError("members of a forward batch carry a forward header; members of a result batch do not")
        if self.kind == "forward_batch":
            shared = _batch_fields(self.members[0].header)
            for m in self.members:
                h = m.header.__dict__
                if h["codecs"] is not None or h["cc"] is not None or h["packed_tokens"]:
                    raise ProtocolError("a forward batch carries raw tensors: its members may not carry codecs, cc or packed_tokens")
                if _batch_fields(m.header) != shared:
                    raise ProtocolError(f"members of one forward batch share {list(BATCH_FIELDS)}: the route is the same for all")

    @property
    def total_rows(self) -> int:
        return sum(m.rows for m in self.members)

    def to_meta(self) -> dict[str, Any]:
        """The msgpack-ready ``meta`` map (fields at their default left out)."""
        meta: dict[str, Any] = {"bv": self.version}
        members = []
        for m in self.members:
            if m.header is not None and type(m.meta) is dict:  # the map the header was read from: the same fields, written as they are
                fields_ = {k: v for k, v in m.meta.items() if k not in _MEMBER_FORBIDDEN}  # codecs, cc, packed_tokens: refused above
            elif m.header is not None:
                fields_ = m.header.to_meta()
                for name in (*BATCH_FIELDS, "hv"):
                    fields_.pop(name, None)
            else:
                fields_ = {"trace": list(m.trace)} if m.trace else {}
            members.append([m.req, m.seq, m.epoch, m.rows, fields_])
        meta["members"] = members
        if self.shared:
            meta["shared"] = list(self.shared)
        if self.kind == "forward_batch":
            first = self.members[0].header
            meta["route"] = list(first.route)
            if first.route_keys:
                meta["route_keys"] = list(first.route_keys)
            if first.mask_len is not None:
                meta["mask_len"] = first.mask_len
            if first.upstream_batch is not None:
                meta["upstream_batch"] = list(first.upstream_batch)
        return meta

    @classmethod
    def from_meta(cls, kind: str, meta: Any) -> "BatchHeader":
        """Read and validate a received batch ``meta`` (every member's header too); raise
        ProtocolError naming what is wrong, before anything uses it."""
        if not _is_map(meta):
            raise ProtocolError(f"a batch message's meta must be a map, got {type(meta).__name__}")
        version = meta.get("bv")
        if type(version) is not int or version != BATCH_HEADER_VERSION:
            raise ProtocolError(f"batch header version {version!r} is not understood; this peer speaks version {BATCH_HEADER_VERSION}")
        known = _FORWARD_BATCH_KEYS if kind == "forward_batch" else _RESULT_BATCH_KEYS
        unknown = sorted(str(k) for k in meta if k not in known)
        if unknown:
            raise ProtocolError(f"{kind} meta has unknown keys {unknown[:8]}; known: {sorted(known)}")
        raw = meta.get("members")
        if not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= MAX_BATCH_MEMBERS:
            raise ProtocolError(f"meta.members must be a list of 1..{MAX_BATCH_MEMBERS} members")
        shared = meta.get("shared", [])
        if not isinstance(shared, (list, tuple)):
            raise ProtocolError("meta.shared must be a list of tensor names")
        shared = tuple(shared)
        _check_batch(kind, raw, shared)
        batch_fields = {f: meta[f] for f in BATCH_FIELDS if f in meta}
        members = []
        steps = set()
        siblings: SiblingHeaders | None = None
        for i, entry in enumerate(raw):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 5 and _is_map(entry[4])):
                raise ProtocolError(f"batch member {i} must be [req, seq, epoch, rows, fields]")
            req, seq, epoch, rows, fields_ = entry
            _check_step(req, seq, epoch, rows)
            step = (req, seq)
            if step in steps:
                raise ProtocolError(f"request {req!r} step {seq} appears twice in one batch message")
            steps.add(step)
            if kind == "forward_batch":
                if not fields_.keys().isdisjoint(_MEMBER_FORBIDDEN):
                    clash = sorted(str(k) for k in fields_ if k in _MEMBER_FORBIDDEN)
                    raise ProtocolError(f"batch member {i} carries {clash}: a forward batch holds {list(BATCH_FIELDS)} once, and no codec payloads")
                merged = {**fields_, **batch_fields}
                if siblings is None:
                    header = ForwardHeader.from_meta(merged)
                    siblings = SiblingHeaders(header, merged)  # the members after it: checked where they differ from it
                else:
                    header = siblings.read(merged)
                members.append(batch_member(req, seq, epoch, rows, header, (), merged))
            else:
                unknown = sorted(str(k) for k in fields_ if k not in _RESULT_MEMBER_KEYS)
                if unknown:
                    raise ProtocolError(f"result batch member {i} has unknown fields {unknown[:8]}; known: {sorted(_RESULT_MEMBER_KEYS)}")
                trace = fields_.get("trace", [])
                if not isinstance(trace, (list, tuple)) or len(trace) > MAX_TRACE:
                    raise ProtocolError(f"result batch member {i}: trace must be a list of at most {MAX_TRACE} entries")
                members.append(batch_member(req, seq, epoch, rows, None, tuple(trace)))
        # every check of __post_init__ ran above (each forward member's header holds the batch's
        # own fields, merged in, and no codec fields: refused as member keys), so it is not run twice
        header = object.__new__(cls)
        header.__dict__.update(kind=kind, members=tuple(members), shared=shared, version=version)
        return header


def _check_batch(kind: Any, members: Any, shared: Any) -> None:
    """A batch header's kind, member count and shared tensor names."""
    if kind not in ("forward_batch", "result_batch"):
        raise ProtocolError(f"a batch header is for kind forward_batch or result_batch, not {kind!r}")
    if not isinstance(members, (tuple, list)) or not 1 <= len(members) <= MAX_BATCH_MEMBERS:
        raise ProtocolError(f"a batch message carries 1..{MAX_BATCH_MEMBERS} members")
    if not isinstance(shared, tuple) or not all(isinstance(n, str) and n for n in shared) or len(set(shared)) != len(shared):
        raise ProtocolError("meta.shared must be a list of distinct tensor names")


def _check_step(req: Any, seq: Any, epoch: Any, rows: Any) -> None:
    """A member's step fields (ints by type: a bool is no step number)."""
    if not (isinstance(req, str) and req and type(seq) is int and type(epoch) is int and type(rows) is int and rows >= 1):
        raise ProtocolError("each batch member is [req (a non-empty string), seq (int), epoch (int), rows (int >= 1), fields (map)]")


__all__ = ["BATCH_FIELDS", "BATCH_HEADER_VERSION", "BatchHeader", "BatchMember", "batch_member", "FORWARD_HEADER_VERSION", "ForwardHeader", "HEADS",
           "MAX_BATCH_MEMBERS", "MAX_ROUTE", "MAX_TOP_K", "SIBLING_VARYING", "SiblingHeaders"]
