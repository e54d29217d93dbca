"""What a stage sent on to the next one, per cached request: the log a replacement is refilled from.

When a stage is lost, the stages that survive it still hold their KV caches of every request,
and the stage right before it still holds (in this log) the hidden states it sent the lost one.
A replacement then needs only those states to rebuild its cache: no other stage recomputes
anything, and the client replays nothing (see ``docs/recovery.md``, "Resume instead of
replay"). The log keeps, per request, the outputs of each forward that left for a next stage,
in position order from 0, as the host tensors already made to send them (no copy).

Memory is bounded (``max_bytes`` for all requests together): past it, the requests touched
least recently lose their logs first, and such a request falls back to a full replay if its
next stage is lost. A log that stops being contiguous (a chunk that does not start where the
log ends, a forward whose outputs are not one sequence) is dropped the same way.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import torch


class SentLog:
    """Per request: ``[(pos, {name: (1, T, ...) tensor})]`` covering positions ``0..end-1``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._logs: OrderedDict[Hashable, list[tuple[int, dict]]] = OrderedDict()
        self._ends: dict[Hashable, int] = {}
        self._bytes: dict[Hashable, int] = {}
        self.total_bytes = 0

    def end(self, key: Hashable) -> int:
        """Positions logged for ``key`` (0: none, or not kept)."""
        return self._ends.get(key, 0)

    def append(self, key: Hashable, pos: int, outputs: dict) -> None:
        """Log one forward's outputs for ``key``, starting at ``pos``. A chunk that does not
        continue the log (after a rewind the log is cut back first, :meth:`truncate`) ends it."""
        if self.max_bytes <= 0:
            return
        tokens = _tokens(outputs)
        if tokens is None or pos != self._ends.get(key, 0):
            self.drop(key)
            return
        nbytes = _nbytes(outputs)
        log = self._logs.setdefault(key, [])
        log.append((pos, dict(outputs)))
        self._logs.move_to_end(key)
        self._ends[key] = pos + tokens
        self._bytes[key] = self._bytes.get(key, 0) + nbytes
        self.total_bytes += nbytes
        while self.total_bytes > self.max_bytes and self._logs:
            self.drop(next(iter(self._logs)))

    def truncate(self, key: Hashable, pos: int) -> None:
        """Forget what was logged for ``key`` from position ``pos`` on (a rewind). Works from the
        log's end: a rejected speculation costs the entries it cuts, not a pass over the log."""
        if self._ends.get(key, 0) <= pos:
            return
        log = self._logs[key]
        while log and log[-1][0] >= pos:
            self._forget(key, _nbytes(log.pop()[1]))
        if log and log[-1][0] + (_tokens(log[-1][1]) or 0) > pos:
            start, outputs = log[-1]
            kept = {k: v[:, : pos - start] for k, v in outputs.items()}
            self._forget(key, _nbytes(outputs) - _nbytes(kept))
            log[-1] = (start, kept)
        if log:
            self._ends[key] = pos
        else:
            self.drop(key)

    def _forget(self, key: Hashable, nbytes: int) -> None:
        self._bytes[key] -= nbytes
        self.total_bytes -= nbytes

    def rename(self, old: Hashable, new: Hashable) -> None:
        """The log of ``old`` is ``new``'s now (a request resumed under a new id)."""
        self.drop(new)
        if old in self._logs:
            self._logs[new] = self._logs.pop(old)
            self._ends[new] = self._ends.pop(old)
            self._bytes[new] = self._bytes.pop(old)

    def drop(self, key: Hashable) -> None:
        if self._logs.pop(key, None) is not None:
            self.total_bytes -= self._bytes.pop(key, 0)
        self._ends.pop(key, None)
        self._bytes.pop(key, None)

    def chunks(self, key: Hashable, upto: int, max_tokens: int) -> list[tuple[int, dict]] | None:
        """Positions ``0..upto-1`` of ``key``'s log as ``(pos, outputs)`` chunks of at most
        ``max_tokens`` positions each (entries concatenated and split); None when the log does
        not cover them."""
        if upto <= 0 or self._ends.get(key, 0) < upto:
            return None
        entries = [(p, o) for p, o in self._logs[key] if p < upto]
        names = list(entries[0][1])
        whole = {n: torch.cat([o[n] for _, o in entries], dim=1)[:, :upto] for n in names}
        return [(p, {n: t[:, p:p + max_tokens] for n, t in whole.items()}) for p in range(0, upto, max_tokens)]

    def __len__(self) -> int:
        return len(self._logs)


def _nbytes(outputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in outputs.values())


def _tokens(outputs: dict) -> int | None:
    """The positions of one sequence's outputs, or None when they are not one sequence of
    tensors of equal length (then they cannot be replayed into a cache)."""
    lengths = {int(t.shape[1]) if t.dim() >= 2 and t.shape[0] == 1 else -1 for t in outputs.values()}
    if len(lengths) != 1 or -1 in lengths or not outputs:
        return None
    return lengths.pop()
