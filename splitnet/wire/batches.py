"""Batch messages: the steps of many requests in one message, and their split back into steps.

A ``forward_batch`` (stage -> next stage, or client -> stage 0) or ``result_batch`` (last stage ->
one client) carries every tensor once: its members' rows concatenated along dimension 0, in
member order, one frame per tensor name. Tensors named in ``meta.shared`` (a last stage's
``vocab``) are not split: every member gets them whole. The per-member headers are a
:class:`~splitnet.wire.headers.BatchHeader`. The message header's own ``req`` is ``""``, its
``seq`` 0 and its ``epoch`` the newest of its members' (informational: every member carries its
own).

:func:`split_batch` turns a received batch back into one ordinary ``forward`` or ``result``
:class:`~splitnet.wire.message.Message` per member (zero-copy row views of the frames), after
checking the header and that every split tensor has exactly the members' rows; a receiver then
treats each exactly as a message of its own (per-member ledger, epochs, caches, failures).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from splitnet.errors import ProtocolError
from splitnet.wire.headers import BatchHeader, BatchMember
from splitnet.wire.message import Message

_MEMBER_KIND = {"forward_batch": "forward", "result_batch": "result"}


def batch_message(kind: str, members: Sequence[BatchMember], tensors: Mapping[str, Any], shared: Sequence[str] = ()) -> Message:
    """One ``forward_batch`` or ``result_batch`` message: ``tensors`` hold the members' rows
    concatenated in member order (those named in ``shared``: once, for all)."""
    header = BatchHeader(kind, tuple(members), tuple(shared))
    total = header.total_rows
    for name, t in tensors.items():
        if name not in header.shared and (len(t.shape) == 0 or int(t.shape[0]) != total):
            raise ValueError(f"tensor {name!r} of shape {tuple(t.shape)} does not hold the members' {total} rows; name it in shared")
    return Message(kind=kind, req="", seq=0, epoch=max(m.epoch for m in members), tensors=dict(tensors), meta=header.to_meta())


def split_batch(msg: Message) -> tuple[BatchHeader, list[Message]]:
    """The checked header and one message per member (``forward`` or ``result``), in order.
    ProtocolError when the header or the tensors' rows are wrong, before anything is split."""
    kind = _MEMBER_KIND.get(msg.kind)
    if kind is None:
        raise ProtocolError(f"{msg.kind!r} is not a batch message")
    header = BatchHeader.from_meta(msg.kind, msg.meta)
    missing = sorted(set(header.shared) - set(msg.tensors))
    if missing:
        raise ProtocolError(f"meta.shared names tensors the message does not carry: {missing[:8]}")
    total = header.total_rows
    for name, arr in msg.tensors.items():
        if name not in header.shared and (arr.ndim == 0 or arr.shape[0] != total):
            raise ProtocolError(f"tensor {name!r} of shape {list(arr.shape)} must hold the members' {total} rows along dimension 0")
    parts = []
    start = 0
    for m in header.members:
        end = start + m.rows
        tensors = {name: (arr if name in header.shared else arr[start:end]) for name, arr in msg.tensors.items()}
        if kind == "forward":
            meta = m.meta if m.meta is not None else m.header.to_meta()  # what its header check accepted
        else:
            meta = {"trace": list(m.trace)}
        parts.append(Message(kind, m.req, m.seq, m.epoch, tensors, meta, msg.dtypes))
        start = end
    return header, parts


def member_shares(rows: Sequence[int], nbytes: int) -> list[int]:
    """``nbytes`` (what a batch cost on the wire) split over its members by their ``rows``,
    summing to ``nbytes`` exactly: each member's share of the message, for per-step byte counts."""
    total = sum(rows)
    shares = [nbytes * r // total for r in rows]
    shares[-1] += nbytes - sum(shares)
    return shares


__all__ = ["batch_message", "member_shares", "split_batch"]
