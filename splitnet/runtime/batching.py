"""Which queued work a stage runs together: rounds of at most one step per request, grouped by shape.

The compute thread keeps what it took off the worker's queue in a :class:`collections.deque`
(arrival order). Each round, :func:`take_round` picks from it at most ``max_members`` forwards,
at most one per request, never one that has an earlier step of its own request still waiting
(per-request order is arrival order); a ``release`` is returned to run at once when no earlier
step of its request waits. :func:`pick_group` then keeps the members whose inputs stack into one
forward (same tensors, same shapes but the batch dimension, same options), oldest first, under a
token budget; the rest go back to the front of the backlog for the next round.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, NamedTuple, TypeVar

from splitnet.errors import ConfigError

W = TypeVar("W")


@dataclass(frozen=True)
class BatchLimits:
    """How much work one forward of a stage may combine.

    Attributes:
        max_batch_size: most requests in one forward (1: no batching).
        max_batch_tokens: most new tokens (positions) in one forward, summed over its members;
            a single request's chunk may exceed it (it runs alone).
    """

    max_batch_size: int = 64
    max_batch_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ConfigError("max_batch_size and max_batch_tokens must be >= 1")


def take_round(backlog: deque, *, key_of: Callable[[W], Hashable], is_release: Callable[[W], bool], max_members: int) -> tuple[list, list]:
    """(releases to run now, forward candidates in arrival order), removed from ``backlog``."""
    releases: list = []
    taken: list = []
    taken_keys: set = set()
    blocked: set = set()  # requests with an earlier step left waiting this round
    kept: deque = deque()
    while backlog:
        item = backlog.popleft()
        key = key_of(item)
        if key in blocked or key in taken_keys or len(taken) >= max_members:
            blocked.add(key)
            kept.append(item)
        elif is_release(item):
            releases.append(item)
        else:
            taken.append(item)
            taken_keys.add(key)
    backlog.extend(kept)
    return releases, taken


class StepOptions(NamedTuple):
    """What a step asks of the forward beyond its inputs; members of one forward share them."""

    all_logits: bool = False  # logits at every position (speculative verification)
    last: bool = False  # the end of its route: the result goes to the client
    head: str = "logits"  # the reduction the client asked for: logits, argmax or topk
    top_k: int | None = None
    want_result: bool = True  # False: fill the caches only (a prefill chunk before the last)


@dataclass
class Member(Generic[W]):
    """A forward ready to run: its work item, decoded inputs, cache and batching signature."""

    work: W
    inputs: dict
    cache: object | None
    cache_key: str
    signature: tuple
    tokens: int
    options: StepOptions = StepOptions()


def pick_group(members: list[Member], limits: BatchLimits) -> tuple[list[Member], list[Member]]:
    """(the group to run now: the oldest member and those that stack with it, within the
    limits; the rest, in order)."""
    if not members:
        return [], []
    head = members[0]
    group, rest, tokens = [head], [], head.tokens
    for m in members[1:]:
        if m.signature == head.signature and len(group) < limits.max_batch_size and tokens + m.tokens <= limits.max_batch_tokens:
            group.append(m)
            tokens += m.tokens
        else:
            rest.append(m)
    return group, rest


def signature(inputs: dict, cached: bool, options: StepOptions) -> tuple:
    """What members must share to run in one forward: tensor names, shapes but the batch
    dimension, dtypes, whether they hold a KV cache (then each is one sequence), and options."""
    parts = tuple((name, tuple(t.shape[1:]), str(t.dtype), int(t.shape[0]) if cached else None) for name, t in sorted(inputs.items()))
    return (parts, cached, options)


@dataclass
class _Rhythm:
    last_s: float
    interval_s: float | None = None  # smoothed time between two of its steps here


class StepRhythms:
    """When the first stage should expect each active request's next step.

    A request that ran a (non-final) step here is *expected* while it keeps its rhythm: at most
    ``active_s`` since its last step and at most ``patience`` times its smoothed step interval.
    A stalled client (reading, thinking, gone) stops being waited for after a couple of its own
    intervals instead of delaying everyone else's batches for ``active_s``.
    """

    def __init__(self, active_s: float = 1.0, patience: float = 2.0, smoothing: float = 0.5):
        self.active_s, self.patience, self.smoothing = active_s, patience, smoothing
        self._rhythms: dict[Hashable, _Rhythm] = {}

    def note(self, key: Hashable, now_s: float) -> None:
        r = self._rhythms.get(key)
        if r is None:
            self._rhythms[key] = _Rhythm(now_s)
            return
        gap = now_s - r.last_s
        r.interval_s = gap if r.interval_s is None else self.smoothing * gap + (1 - self.smoothing) * r.interval_s
        r.last_s = now_s

    def drop(self, key: Hashable) -> None:
        self._rhythms.pop(key, None)

    def expected(self, now_s: float) -> set:
        """Keys whose next step should arrive soon; forgets requests idle past ``active_s``."""
        out = set()
        for key, r in list(self._rhythms.items()):
            idle = now_s - r.last_s
            if idle > self.active_s:
                del self._rhythms[key]
            elif r.interval_s is None or idle <= self.patience * r.interval_s:
                out.add(key)
        return out

    def __len__(self) -> int:
        return len(self._rhythms)
