"""The chaos campaign's history: every client's sends, receives, replies used and recoveries,
logged through the session's public message hook (:meth:`splitnet.edge.sdk.Session.observe`)
and checked afterwards like a Jepsen history."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Event:
    """One thing a client did or saw."""

    t: float
    tenant: int
    what: str  # send | recv | take | release | recover_start | recover_end | token
    kind: str = ""
    req: str = ""
    seq: int = -1
    epoch: int = -1
    session_epoch: int = -1
    detail: Any = None
    window_s: float | None = None  # recover_start: the longest silence window the session applied then (base + round trips)


class History:
    """Every client's events, in order, and the one armed fault's trigger."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self.trigger: Any = None  # an armed fault: offered every event (chaos_faults.Trigger)

    def add(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)
            trig = self.trigger
        if trig is not None:
            trig.offer(ev)

    def since(self, t: float) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.t >= t]

    def until(self, t: float) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.t <= t]


def instrument(session: Any, tenant: int, history: History) -> None:
    """Log every send, receive, reply used, release and recovery of ``session``: its public
    message hook (:meth:`Session.observe`) and a wrapper around its public ``recover``."""
    recover = session.recover

    def observed(ev: Any) -> None:
        if ev.direction == "send" and ev.kind in ("forward", "release"):
            what = "release" if ev.kind == "release" else "send"
            if what == "release" and ev.stage != 0:
                return  # one release event per request (it is sent to every stage)
            history.add(Event(ev.t_s, tenant, what, ev.kind, ev.req, ev.seq, ev.epoch, session.epoch, {"stage": ev.stage, "queued": ev.queued}))
        elif ev.direction == "recv" and ev.kind in ("result", "error"):
            history.add(Event(ev.t_s, tenant, "recv", ev.kind, ev.req, ev.seq, ev.epoch, session.epoch, {"code": ev.code} if ev.code else None))
        elif ev.direction == "use":
            history.add(Event(ev.t_s, tenant, "take", ev.kind, ev.req, ev.seq, ev.epoch, session.epoch, {"trace": _trace_summary(ev.trace)}))

    def logged_recover(cause: Any, budget: Any) -> None:
        links = session.links
        window = max((links.stage_window_s(i) for i in range(len(links))), default=None)
        history.add(Event(time.monotonic(), tenant, "recover_start", type(cause).__name__, detail=str(cause)[:200], window_s=window))
        n = len(session.recovery_records)
        try:
            recover(cause, budget)
        finally:
            recs = session.recovery_records[n:]
            detail = {k: getattr(recs[-1], k) for k in ("probe_ms", "hook_ms", "handshake_ms", "attempts", "replaced")} if recs else None
            history.add(Event(time.monotonic(), tenant, "recover_end", session_epoch=session.epoch, detail=detail))

    session.observe(observed)
    session.recover = logged_recover


def _trace_summary(trace: tuple) -> dict:
    """A result's per-stage trace, summed: time queued, computing, and the largest batch."""
    entries = [t for t in trace if isinstance(t, dict)]
    return {"queue_ms": round(sum(float(t.get("queue_ms") or 0) for t in entries), 1),
            "compute_ms": round(sum(float(t.get("compute_ms") or 0) for t in entries), 1),
            "stage_queue_ms": [t.get("queue_ms") for t in entries], "batch": [t.get("batch") for t in entries],
            "stage_compute_ms": [t.get("compute_ms") for t in entries], "stage_tokens": [t.get("tokens_computed") for t in entries],
            "stage_graph_captures": [t.get("graph_captures", 0) for t in entries],
            # [received, sent on] per stage, CLOCK_MONOTONIC (only when the stages run with SPLITNET_TRACE_CLOCK=1)
            "stage_clock_s": [t.get("clock_s") for t in entries],
            # per stage, what ran there while this step was queued: [rounds, compute ms, straggler wait ms, send ms]
            "stage_ahead": [[t.get("ahead_rounds"), t.get("ahead_busy_ms"), t.get("ahead_wait_ms"), t.get("ahead_send_ms")] for t in entries]}


def check_history(events: list[Event]) -> dict:
    """The history's invariants: replies used only from the session's current epoch, no step
    used twice in one epoch, no forward sent for a request after its release."""
    old_epoch_used, taken_twice, after_release = 0, 0, 0
    taken: set[tuple[int, str, int, int]] = set()
    released: set[tuple[int, str]] = set()
    stale_received = 0
    for e in events:
        if e.what == "take":
            if e.epoch < e.session_epoch:
                old_epoch_used += 1
            key = (e.tenant, e.req, e.seq, e.session_epoch)
            if key in taken:
                taken_twice += 1
            taken.add(key)
        elif e.what == "recv" and e.epoch < e.session_epoch:
            stale_received += 1
        elif e.what == "release":
            released.add((e.tenant, e.req))
        elif e.what == "send" and e.kind == "forward" and (e.tenant, e.req) in released:
            after_release += 1
    return {"old_epoch_replies_used": old_epoch_used, "steps_taken_twice": taken_twice, "forwards_after_release": after_release,
            "old_epoch_replies_received_and_dropped": stale_received, "events": len(events)}


__all__ = ["Event", "History", "check_history", "instrument"]
