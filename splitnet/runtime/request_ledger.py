"""What a stage remembers of each request beyond its KV cache: its newest epoch, and whether the
steps it has queued were cancelled.

- **Epochs.** A client stamps every message with its session's epoch and starts a new one at each
  recovery. A stage keeps the newest epoch it saw per request and refuses older ones
  (:class:`~splitnet.errors.StaleEpoch`): a step sent before a recovery never runs after it.
- **Cancellation.** A release cancels the request's steps queued before it (the client gave the
  request up: a replay runs under a new request id), and a stage that cannot reach the next one
  cancels the request's queued steps after reporting the failure once. Cancelled steps are dropped
  unanswered instead of being computed and each answered with an error.

Both maps are bounded (least recently touched entries go first), so a flood of request ids costs
memory proportional to ``max_entries``, not to the flood.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from splitnet.errors import StaleEpoch


class RequestLedger:
    def __init__(self, max_entries: int = 4096):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._epochs: OrderedDict[Hashable, int] = OrderedDict()
        self._cancelled: OrderedDict[Hashable, float] = OrderedDict()  # key -> steps received up to this time are cancelled

    def check_epoch(self, key: Hashable, epoch: int, req: str = "") -> None:
        """Record ``epoch`` for ``key``; raise StaleEpoch when a newer one was seen."""
        newest = self._epochs.get(key)
        if newest is not None and epoch < newest:
            raise StaleEpoch(f"request {req or key!r} step of epoch {epoch} arrived after epoch {newest}: refused (sent before the client's recovery)")
        self._touch(self._epochs, key, epoch if newest is None else max(newest, epoch))

    def cancel(self, key: Hashable, received_up_to_s: float) -> None:
        """Cancel the steps of ``key`` received at or before ``received_up_to_s`` (monotonic)."""
        self._touch(self._cancelled, key, max(received_up_to_s, self._cancelled.get(key, received_up_to_s)))

    def is_cancelled(self, key: Hashable, received_at_s: float) -> bool:
        t = self._cancelled.get(key)
        return t is not None and received_at_s <= t

    def _touch(self, table: OrderedDict, key: Hashable, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._epochs) + len(self._cancelled)
