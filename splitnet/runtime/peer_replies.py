"""Results sent back over a client's own connection, bound to the client that asked for them.

A client that takes results over its connection to the last stage (``reply_to = "peer:<id>"``)
is reached through the stage's ROUTER by routing id, and the routing id is chosen by whoever
connects. A routing id alone is not an identity: after the client's connection drops, another
peer may connect with the same id. So a result for the client with public key K is delivered to
routing id R only while R's current connection is known to be authenticated as K:

- every message received on R records (R -> its CURVE user id), stamped with the current
  connection generation;
- any disconnect on the ROUTER starts a new generation (libzmq does not say which routing id
  dropped), so every record becomes unconfirmed;
- a result for R whose record is confirmed and equal to K is delivered; one whose record names
  another key is refused; one whose record is unconfirmed is held (at most ``hold_s``) while the
  stage pings R, and delivered when R answers as K.

Without keys (``--insecure``) every origin is "" and results follow the routing id, as plaintext
can promise nothing more.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DELIVER, HOLD, REFUSE = "deliver", "hold", "refuse"


@dataclass
class _Held:
    deadline: float
    origin: str
    frames: list[Any]


class PeerReplies:
    """The I/O thread's record of who holds each routing id, and the results waiting for proof."""

    def __init__(self, hold_s: float = 5.0, max_routes: int = 4096, max_held_per_route: int = 64, max_held_routes: int = 1024):
        self.hold_s = hold_s
        self.max_routes = max_routes
        self.max_held_per_route = max_held_per_route
        self.max_held_routes = max_held_routes
        self.generation = 0
        self._owners: OrderedDict[bytes, tuple[str, int]] = OrderedDict()
        self._held: dict[bytes, list[_Held]] = {}
        self.refused = 0
        self.expired = 0

    def seen(self, routing_id: bytes, principal: str) -> None:
        """A message authenticated as ``principal`` arrived on ``routing_id``."""
        self._owners.pop(routing_id, None)
        self._owners[routing_id] = (principal, self.generation)
        while len(self._owners) > self.max_routes:
            self._owners.popitem(last=False)

    def connections_changed(self) -> None:
        """A connection of the ROUTER went away: no routing id is known to be held by its old peer."""
        self.generation += 1

    def decide(self, routing_id: bytes, origin: str) -> str:
        if not origin:
            return DELIVER  # no keys: nothing to bind to
        owner = self._owners.get(routing_id)
        if owner is None or owner[1] != self.generation:
            return HOLD
        return DELIVER if owner[0] == origin else REFUSE

    def hold(self, routing_id: bytes, origin: str, frames: list[Any]) -> bool:
        """Keep a result until ``routing_id`` proves who holds it; False when over the caps (dropped)."""
        waiting = self._held.get(routing_id)
        if waiting is None:
            if len(self._held) >= self.max_held_routes:
                return False
            waiting = self._held[routing_id] = []
        if len(waiting) >= self.max_held_per_route:
            return False
        waiting.append(_Held(time.monotonic() + self.hold_s, origin, frames))
        return True

    def ready(self, routing_id: bytes) -> list[list[Any]]:
        """Held results that may now go to ``routing_id`` (its holder just proved its key); those
        for another key are refused and dropped."""
        waiting = self._held.pop(routing_id, None)
        if not waiting:
            return []
        out = []
        for h in waiting:
            verdict = self.decide(routing_id, h.origin)
            if verdict == DELIVER:
                out.append(h.frames)
            elif verdict == REFUSE:
                self.refused += 1
            else:
                self._held.setdefault(routing_id, []).append(h)
        return out

    def expire(self, now: float | None = None) -> int:
        """Drop held results past their deadline; returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        for rid in list(self._held):
            keep = [h for h in self._held[rid] if h.deadline > now]
            n += len(self._held[rid]) - len(keep)
            if keep:
                self._held[rid] = keep
            else:
                del self._held[rid]
        self.expired += n
        return n

    def waiting_routes(self) -> list[bytes]:
        return list(self._held)
