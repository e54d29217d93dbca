"""Which queued work a stage runs together: rounds of at most one step per request, grouped by shape.

The compute thread keeps what it took off the worker's queue in a :class:`collections.deque`
(arrival order). Each round, :func:`take_round` picks from it at most ``max_members`` forwards,
at most one per request, never one that has an earlier step of its own request still waiting
(per-request order is arrival order); a ``release`` is returned to run at once when no earlier
step of its request waits. :func:`pick_group` then keeps the members whose inputs stack into one
forward (same tensors, same shapes but the batch dimension, same options), oldest first, under a
token budget; the rest go back to the front of the backlog for the next round. Members that hold
a KV cache are one sequence each and may differ in their number of new tokens (a *ragged*
group: the stage pads them to the longest, and the padding is budgeted by
``BatchLimits.max_padding``): the prompt chunks of several requests replaying at once after a
failover, or starting together, run as one forward instead of one each.
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
        max_batch_tokens: most positions in one forward, summed over its members (padding
            of a ragged group included); a single request's chunk may exceed it (it runs alone).
        max_padding: in a group of cached members with different numbers of new tokens, the
            most padded positions, as a fraction of its real ones (0: only equal lengths stack).
            Padding costs compute on a device that is compute bound (a prefill on a GPU), so a
            one-token decode step never joins a long prompt chunk, while chunks of similar
            length (replays, prompts arriving together) share one forward.
    """

    max_batch_size: int = 64
    max_batch_tokens: int = 4096
    max_padding: float = 0.5

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1:
            raise ConfigError("max_batch_size and max_batch_tokens must be >= 1")
        if not 0 <= self.max_padding:
            raise ConfigError(f"max_padding must be >= 0, got {self.max_padding}")


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
    ragged = head.cache is not None  # one sequence each: ``tokens`` is its length, lengths may differ
    group, rest, tokens, longest = [head], [], head.tokens, head.tokens
    for m in members[1:]:
        if m.signature != head.signature or len(group) >= limits.max_batch_size:
            rest.append(m)
            continue
        if ragged:
            wide = max(longest, m.tokens)
            padded = wide * (len(group) + 1)
            fits = padded <= limits.max_batch_tokens and padded - (tokens + m.tokens) <= limits.max_padding * (tokens + m.tokens)
        else:
            fits = tokens + m.tokens <= limits.max_batch_tokens
        if fits:
            group.append(m)
            tokens += m.tokens
            longest = max(longest, m.tokens)
        else:
            rest.append(m)
    return group, rest


def signature(inputs: dict, cached: bool, options: StepOptions) -> tuple:
    """What members must share to run in one forward: tensor names, shapes but the batch
    dimension, dtypes, whether they hold a KV cache, and options. A cached member is one
    sequence, and its number of new tokens is left out: cached members of different lengths
    stack (padded, see :func:`pick_group`)."""
    parts = tuple((name, tuple(t.shape[2:]) if cached else tuple(t.shape[1:]), str(t.dtype), int(t.shape[0]) if cached else None)
                  for name, t in sorted(inputs.items()))
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
