"""Moving lost stages to live processes, for a session whose requests are then resumed or replayed.

:class:`StageRecovery` runs one recovery: find the stages that are down (one liveness window at
most; those already known down count at once), call the user's hook for each of them in
parallel (``recovery(stage_index) -> endpoint``, e.g.
:meth:`splitnet.runtime.launcher.LocalPipeline.respawn_stage`), connect to the new endpoints,
start a new epoch and re-run the ``info`` handshake. A stage that nobody replaced but that answers
the handshake from another process than before (restarted in place, on its own endpoint) has
lost its caches too: the record names it (``restarted_in_place``), so the requests refill it. A fault inside it (a hook that raises,
a new process that dies before the handshake, a handshake timeout) does not end the
recovery: it tries again, each try spending one unit of the generation's
:class:`~splitnet.edge.generation.RecoveryBudget`, with an exponential back-off between tries;
only an exhausted budget ends it, with a StageUnavailable that names the last fault.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from splitnet.edge.generation import RecoveryBudget
from splitnet.errors import AuthError, PlanMismatch, StageUnavailable, UnknownRequest

log = logging.getLogger("splitnet.sdk")

RecoveryHook = Callable[[int], str]


@dataclass(frozen=True)
class RecoveryRecord:
    """One completed recovery, for reports: what failed, what was replaced, the new epoch, and
    where its time went in the attempt that succeeded (``probe_ms``: finding the dead stages;
    ``hook_ms``: the hooks handing out replacements; ``handshake_ms``: connecting to them and
    the ``info`` handshake); ``recover_ms`` is the whole recovery, failed attempts included."""

    cause: str
    replaced: list[int]
    epoch: int
    recover_ms: float
    attempts: int
    probe_ms: float = 0.0
    hook_ms: float = 0.0
    handshake_ms: float = 0.0
    restarted_in_place: list[int] = field(default_factory=list)  # not replaced, but a new process answered its handshake

    @property
    def caches_lost(self) -> list[int]:
        """The stages whose caches this recovery found gone: replaced, or restarted in place."""
        return sorted(set(self.replaced) | set(self.restarted_in_place))


def replace_in_parallel(hook: RecoveryHook, stages: list[int]) -> dict[int, str]:
    """``hook(i)`` for every stage at once (a respawn takes seconds: two dead stages should not
    take twice as long); the first hook failure is raised after all have finished."""
    if not stages:
        return {}
    if len(stages) == 1:
        return {stages[0]: hook(stages[0])}
    with ThreadPoolExecutor(max_workers=len(stages), thread_name_prefix="splitnet-recovery") as pool:
        futures = {i: pool.submit(hook, i) for i in stages}
        errors = []
        out = {}
        for i, f in futures.items():
            try:
                out[i] = f.result()
            except Exception as e:  # noqa: BLE001 - reported below, with the stage
                errors.append((i, e))
    if errors:
        i, e = errors[0]
        raise StageUnavailable(f"stage {i} could not be replaced: {type(e).__name__}: {e}") from e
    return out


class StageRecovery:
    """The recovery procedure of one session; the session supplies its links and handshake."""

    def __init__(
        self,
        hook: RecoveryHook | None,
        silent_stages: Callable[..., list[int]],
        replace: Callable[[int, str], None],
        new_epoch: Callable[[], int],
        handshake: Callable[[], Sequence[int] | None],
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ):
        self.hook = hook
        self._silent_stages = silent_stages
        self._replace = replace
        self._new_epoch = new_epoch
        self._handshake = handshake
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.records: list[RecoveryRecord] = []
        self._idle_streak = 0  # recoveries in a row that found nothing to replace
        self._idle_at = 0.0  # when the last of them ended (monotonic)

    def __call__(self, cause: StageUnavailable | UnknownRequest, budget: RecoveryBudget) -> None:
        """Make the pipeline usable again for a replay, or raise.

        ``UnknownRequest`` (a stage lost the request's cache but is alive) needs no
        replacement: it spends one unit and the replay alone rebuilds the cache. A lost stage
        without a hook re-raises ``cause``."""
        if isinstance(cause, UnknownRequest):
            budget.spend(cause)
            return
        if self.hook is None:
            raise cause
        budget.spend(cause)
        t0 = time.perf_counter()
        attempts, delay = 1, self.backoff_s
        suspects: list[int] = []  # replaced in a failed attempt: dead at once unless they have spoken since
        while True:
            try:
                t_probe = time.perf_counter()
                dead = self._silent_stages(suspects) if suspects else self._silent_stages()
                suspects = list(dead)
                t_hook = time.perf_counter()
                replacements = replace_in_parallel(self.hook, dead)
                t_handshake = time.perf_counter()
                for i, endpoint in replacements.items():
                    self._replace(i, endpoint)
                epoch = self._new_epoch()  # replies of the old pipeline generation are dropped from here on
                changed = self._handshake() or ()  # the stages a new process answered for
                t_done = time.perf_counter()
            except (AuthError, PlanMismatch):
                raise  # a replacement that serves another model or refuses our key: no retry helps
            except Exception as e:  # noqa: BLE001 - a fault inside recovery: try again within the budget
                log.warning("recovery attempt %d failed: %s", attempts, e)
                try:
                    budget.spend(StageUnavailable(f"recovery failed after {attempts} attempts; last: {type(e).__name__}: {e}"))
                except StageUnavailable as spent:
                    raise spent from e
                attempts += 1
                time.sleep(delay)  # back-off between attempts (bounded, from the budget)
                delay = min(delay * 2, self.max_backoff_s)
                continue
            self.records.append(RecoveryRecord(str(cause)[:300], dead, epoch, round((t_done - t0) * 1e3, 1), attempts,
                                               probe_ms=round((t_hook - t_probe) * 1e3, 1), hook_ms=round((t_handshake - t_hook) * 1e3, 1),
                                               handshake_ms=round((t_done - t_handshake) * 1e3, 1),
                                               restarted_in_place=sorted(set(changed) - set(dead))))
            self._pace_idle(bool(dead))  # a restart in place found again is no progress: the hop to it may still be reconnecting
            return

    def _pace_idle(self, replaced: bool) -> None:
        """Space out recoveries that replace nothing. Every stage answers and none was replaced
        (one may have been restarted on its own endpoint), yet a stage reported its next one
        unreachable: that hop is reconnecting (to the restarted process, over a healing link),
        and a resume at once fails at the same hop. Without a pause, a request spent its whole
        budget in 60 ms on such a hop (chaos campaign, session 20). The second such recovery in
        a row waits ``backoff_s``, the next twice that, up to ``max_backoff_s``; a recovery that
        replaces a stage, or one more than ``max_backoff_s`` after the last, starts the count again."""
        now = time.monotonic()
        if replaced or now - self._idle_at > max(self.max_backoff_s, self.backoff_s):
            self._idle_streak = 0
        if not replaced:
            if self._idle_streak:
                time.sleep(min(self.backoff_s * 2 ** (self._idle_streak - 1), self.max_backoff_s))
            self._idle_streak += 1
            self._idle_at = time.monotonic()


__all__ = ["RecoveryHook", "RecoveryRecord", "StageRecovery", "replace_in_parallel"]
