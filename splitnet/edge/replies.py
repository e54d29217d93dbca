"""Replies (results and errors) that arrived for requests the session has not collected yet.

The store is bounded and epoch-aware:

- only replies of requests the session has opened (:meth:`ReplyStore.open`) and not yet
  released are kept; a reply to a released or unknown request (a stale reply of an abandoned
  request, a duplicate) is dropped on arrival and counted;
- a reply stamped with an epoch older than the session's current one (sent to the pipeline
  generation before a recovery) is dropped and counted;
- of a request's errors only the first is kept: a failing chunk makes the stage drop the
  request, so the chunks after it fail with ``UnknownRequest``, and the first error says why;
- beyond ``max_entries`` a new reply raises :class:`LimitExceeded` instead of growing.

A ``result_batch`` (many of this session's results in one message) is split into one ``result``
per step before it gets here (:func:`splitnet.wire.batches.split_batch`, in the links' delivery),
so each member passes the same epoch, open-request and bound checks as a result of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from splitnet.errors import LimitExceeded, SplitnetError, error_from_code
from splitnet.wire import Message

Key = tuple[str, int]  # (request id, step number)


@dataclass
class ReplyCounts:
    """What the store did with replies, for reports and tests."""

    kept: int = 0
    stale_epoch: int = 0  # dropped: stamped with an older epoch
    unknown_request: int = 0  # dropped: the request was released or never opened here
    extra_errors: int = 0  # dropped: a later error of a request that already failed
    most_held: int = 0  # the most entries held at once


class ReplyStore:
    """Replies by (request, step), for the requests this session has open."""

    def __init__(self, max_entries: int = 1024):
        if max_entries < 1:
            raise ValueError("ReplyStore.max_entries must be >= 1")
        self.max_entries = max_entries
        self.epoch = 0
        self.counts = ReplyCounts()
        self._open: dict[str, float] = {}  # open request -> when it was opened (monotonic)
        self._replies: dict[Key, tuple[Message, int]] = {}
        self._failed: dict[str, Key] = {}  # request -> key of its first error

    def __len__(self) -> int:
        return len(self._replies)

    def open(self, req: str) -> None:
        """Accept replies for ``req`` from now on."""
        self._open[req] = time.monotonic()

    def opened_s(self, req: str) -> float:
        """When ``req`` was opened (monotonic); 0.0 when it is not open."""
        return self._open.get(req, 0.0)

    def release(self, req: str) -> None:
        """Drop what is held for ``req`` and every later reply to it."""
        self._open.pop(req, None)
        self._failed.pop(req, None)
        for key in [k for k in self._replies if k[0] == req]:
            del self._replies[key]

    def put(self, msg: Message, nbytes: int) -> bool:
        """Keep a ``result`` or ``error`` reply; False when it was dropped (stale, unknown, redundant)."""
        if msg.epoch < self.epoch:
            self.counts.stale_epoch += 1
            return False
        if msg.req not in self._open:
            self.counts.unknown_request += 1
            return False
        key = (msg.req, msg.seq)
        if msg.kind == "error":
            if msg.req in self._failed:
                self.counts.extra_errors += 1
                return False
        if key not in self._replies and len(self._replies) >= self.max_entries:
            raise LimitExceeded(
                f"{len(self._replies)} replies are waiting to be collected (ClientConfig.max_pending_replies="
                f"{self.max_entries}); collect results or release requests before sending more"
            )
        if msg.kind == "error":
            self._failed[msg.req] = key
        self._replies[key] = (msg, nbytes)
        self.counts.kept += 1
        self.counts.most_held = max(self.counts.most_held, len(self._replies))
        return True

    def held(self) -> dict[Key, Message]:
        """A copy of what is held now, by (request, step)."""
        return {k: m for k, (m, _) in self._replies.items()}

    def ready(self, keys: set[Key]) -> bool:
        """Whether :meth:`take` would return a reply to one of ``keys``, or raise its error."""
        if self._failed and any(key[0] in self._failed for key in keys):
            return True
        if len(self._replies) < len(keys):  # walk the smaller side: a round of N replies costs O(N), not O(N^2)
            return any(key in keys for key in self._replies)
        return any(key in self._replies for key in keys)

    def take(self, keys: set[Key]) -> tuple[Key, Message, int] | None:
        """The reply to one of ``keys`` if any arrived: ``(key, message, bytes)``. Raises the
        request's first error (typed, with the stage that failed) when one of those requests failed."""
        if self._failed:
            for key in keys:
                first = self._failed.get(key[0])
                if first is not None:
                    msg, _ = self._replies.pop(first)
                    del self._failed[key[0]]
                    raise remote_error(msg)
        if len(self._replies) < len(keys):  # walk the smaller side (the replies held, or the keys waited for)
            key = next((k for k in self._replies if k in keys), None)
            if key is None:
                return None
            got = self._replies.pop(key)
            return key, got[0], got[1]
        for key in keys:
            got = self._replies.pop(key, None)
            if got is not None:
                return key, got[0], got[1]
        return None


def remote_error(msg: Message) -> SplitnetError:
    """The typed error an ``error`` reply carries, naming the stage that sent it."""
    stage = msg.meta.get("stage")
    where = f"stage {stage}: " if stage is not None else ""
    return error_from_code(str(msg.meta.get("code")), where + str(msg.meta.get("msg")))


__all__ = ["Key", "ReplyCounts", "ReplyStore", "remote_error"]
