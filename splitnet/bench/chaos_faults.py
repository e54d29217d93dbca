"""The chaos campaign's faults: what each kind does to a stage or its links, when it fires, and
what it caused (detection, recovery, the time to the next token and where that time went).

Kinds (each with the outcome it must have):

- ``kill_prefill`` / ``kill_decode``: SIGKILL of one stage while a request is in its prefill (a
  later chunk is being sent) or in its decode (after some tokens); replaced, replayed.
- ``kill_two``: two stages at once; both replaced in one recovery.
- ``stop_short`` / ``stop_long``: SIGSTOP, then SIGCONT after half / three base liveness
  windows (heartbeat interval x liveness): the short one must cause no failover, the long one is
  replaced. A stage's own window is the base plus 4 x its recent heartbeat round trips, which on
  a loaded host can add most of a base window: three base windows is a stop longer than any.
- ``kill_in_recovery``: a stage is killed, and the first replacement handed out for it is killed
  before the client's handshake (a fault inside the recovery).
- ``restart_same_endpoint``: killed, and a fresh process binds the same endpoint (a supervisor
  restart); the clients reconnect to it. Replaced (a tenant's hook handed out a standby first) or
  replayed on the restarted process (its pongs carry a new pid) are both right.
- ``freeze_compute``: only the stage's compute thread is stopped (``PTRACE_SEIZE`` +
  ``PTRACE_INTERRUPT`` on that thread; its I/O thread still answers pings): detected by the
  heartbeats' compute progress (``ClientConfig.compute_stall_s``) and replaced. A thread stopped
  while it holds the GIL stops the I/O thread too; the stage is then found by its silence (the
  fault's ``note`` says which).
- ``cut``: the stage's relay stops both directions (every link into it: the client's and the
  upstream stage's): detected by silence and replaced; healed afterwards.
- ``partition_up`` / ``partition_down``: one direction of the stage's links stops (towards it /
  back from it). The data path breaks for ``up`` and, for the last stage, ``down``: detected and
  replaced; a ``down`` partition of another stage leaves its results flowing through the stages
  after it (its traces prove it works), so it may pass with no failover: both are accepted.
- ``cut_unrecoverable``: a cut while the pool refuses every replacement for that stage: the
  requests in flight must end in a typed error within 2 x the liveness window of the fault.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from splitnet.bench.chaos_history import Event, History
from splitnet.bench.chaos_pool import StandbyPool

log = logging.getLogger("splitnet.bench.chaos")

#: a long stop lasts this many base windows (see ``stop_long`` above)
STOP_LONG_WINDOWS = 3.0
FAULT_KINDS = ("kill_prefill", "kill_decode", "kill_two", "stop_short", "stop_long", "kill_in_recovery", "restart_same_endpoint",
               "freeze_compute", "cut", "partition_up", "partition_down", "cut_unrecoverable")
LINK_KINDS = ("cut", "partition_up", "partition_down", "cut_unrecoverable")  # need relays
# campaign mix: freezes are cheap, kills cost a standby each (a stage process takes seconds to start)
WEIGHTS = {"kill_prefill": 3, "kill_decode": 4, "kill_two": 1, "stop_short": 5, "stop_long": 2, "kill_in_recovery": 1,
           "restart_same_endpoint": 1, "freeze_compute": 1, "cut": 1, "partition_up": 1, "partition_down": 1, "cut_unrecoverable": 1}
QUICK_SCHEDULE = ("stop_short", "kill_decode", "kill_prefill", "kill_in_recovery", "restart_same_endpoint", "freeze_compute", "cut",
                  "partition_up", "cut_unrecoverable")
REPLACES = {"kill_prefill": 1, "kill_decode": 1, "kill_two": 2, "stop_long": 1, "kill_in_recovery": 2, "restart_same_endpoint": 0,
            "stop_short": 0, "freeze_compute": 1, "cut": 1, "partition_up": 1, "partition_down": 1, "cut_unrecoverable": 0}


@dataclass
class Trigger:
    """Fires ``action`` once, on the first event that matches (in the thread that logged it)."""

    phase: str  # "prefill": a later prefill chunk is sent; "decode": the k-th reply of a request is used
    after_replies: int
    action: Any
    fired_at: float | None = None
    _replies: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: threading.Event = field(default_factory=threading.Event)

    def offer(self, ev: Event) -> None:
        match = False
        if self.phase == "prefill":
            match = ev.what == "send" and ev.kind == "forward" and ev.seq >= 1 and self._replies.get((ev.tenant, ev.req), 0) == 0
        elif self.phase == "decode" and ev.what == "take":
            n = self._replies[(ev.tenant, ev.req)] = self._replies.get((ev.tenant, ev.req), 0) + 1
            match = n >= self.after_replies
        if ev.what == "take" and self.phase == "prefill":
            self._replies[(ev.tenant, ev.req)] = self._replies.get((ev.tenant, ev.req), 0) + 1
        if not match:
            return
        with self._lock:
            if self.fired_at is not None:
                return
            self.fired_at = time.monotonic()
        # the action runs on its own thread: the tenant that logged the event must not wait for it
        threading.Thread(target=self._fire, daemon=True).start()

    def _fire(self) -> None:
        try:
            self.action()
        finally:
            self._done.set()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)


@dataclass
class FaultRecord:
    index: int
    kind: str
    stages: list[int]
    phase: str
    model: str
    fired: bool = False
    t_fault: float = 0.0
    t_heal: float | None = None  # when a link fault was healed (or its stage replaced), or a restarted stage serves again
    detect_s: float | None = None
    recover_s: float | None = None
    fault_to_token_s: float | None = None
    breakdown: dict | None = None  # where fault_to_token_s went (see breakdown())
    failovers: int = 0  # recoveries started by any tenant because of this fault
    first_cause: str = ""  # what the first recovery after it was for
    expected: str = ""  # the outcome this kind must have
    outcome: str = ""  # what it had: "replaced", "no failover", "typed error", ...
    outcome_ok: bool | None = None
    note: str = ""


# ---------------------------------------------------------------------- a frozen compute thread --
_PTRACE_SEIZE, _PTRACE_INTERRUPT, _PTRACE_DETACH = 0x4206, 0x4207, 17
_WALL, _WNOHANG = 0x40000000, 1


def compute_thread(pid: int) -> int:
    """The tid of a stage process's compute thread: its busiest thread that is neither the main
    (I/O) thread nor one of libzmq's (``ZMQbg/*``). A stage started by the launcher has no other
    Python thread unless it serves metrics."""
    best, best_cpu = 0, -1
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        if tid == pid:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("ZMQbg"):
                    continue
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = int(parts[11]) + int(parts[12])  # utime + stime
        if cpu > best_cpu:
            best, best_cpu = tid, cpu
    if not best:
        raise RuntimeError(f"stage process {pid} has no compute thread to freeze")
    return best


class ThreadFreeze:
    """Stops one thread of another process with ptrace (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``;
    the other threads run on) until :meth:`release` or ``max_hold_s``. Every ptrace call is made
    from the one thread that seized it (ptrace's rule); a tracee killed meanwhile is reaped."""

    def __init__(self, tid: int, max_hold_s: float):
        self.tid = tid
        self.max_hold_s = max_hold_s
        self.error = ""
        self._release = threading.Event()
        self._frozen = threading.Event()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.ptrace.restype = ctypes.c_long
        self._libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self._thread = threading.Thread(target=self._run, name=f"chaos-freeze-{tid}", daemon=True)

    def start(self, timeout_s: float = 5.0) -> bool:
        """Freeze it; False (with :attr:`error`) when ptrace refused (no CAP_SYS_PTRACE)."""
        self._thread.start()
        self._frozen.wait(timeout_s)
        return not self.error and self._frozen.is_set()

    def release(self) -> None:
        self._release.set()

    def _ptrace(self, req: int) -> None:
        if self._libc.ptrace(req, self.tid, None, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace({req:#x}, {self.tid}): {os.strerror(err)}")

    def _run(self) -> None:
        try:
            self._ptrace(_PTRACE_SEIZE)
            self._ptrace(_PTRACE_INTERRUPT)
            os.waitpid(self.tid, _WALL)  # the interrupt's stop
        except OSError as e:
            self.error = str(e)
            self._frozen.set()
            return
        self._frozen.set()
        deadline = time.monotonic() + self.max_hold_s
        while not self._release.is_set() and time.monotonic() < deadline:
            try:
                got, status = os.waitpid(self.tid, _WALL | _WNOHANG)
            except ChildProcessError:
                return  # gone and reaped
            if got and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                return  # the process was killed (replaced): nothing to detach
            self._release.wait(0.05)
        try:
            self._ptrace(_PTRACE_DETACH)
        except OSError:
            pass  # it died meanwhile


# ---------------------------------------------------------------------- injecting --------------
def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _expected(kind: str, stage: int, nst: int) -> str:
    if kind == "stop_short":
        return "no failover"
    if kind == "cut_unrecoverable":
        return "typed error within 2 x window"
    if kind == "partition_down" and stage != nst - 1:
        return "replaced or no failover"
    if kind == "restart_same_endpoint":  # the new process serves the old endpoint: a replay there is the cure, a standby is too
        return "replaced or replayed"
    return "replaced"


def inject(n: int, kind: str, model: str, rng: random.Random, pipe: Any, pool: StandbyPool, history: History, window_s: float,
           compute_stall_s: float) -> FaultRecord:
    """Arm one fault of ``kind``, wait (30 s at most) until a request reaches its phase, fire it."""
    nst = len(pipe.stages)
    stages = sorted(rng.sample(range(nst), 2)) if kind == "kill_two" else [rng.randrange(nst)]
    phase = "prefill" if kind == "kill_prefill" else "decode"
    rec = FaultRecord(n, kind, stages, phase, model, expected=_expected(kind, stages[0], nst))
    pids = [pipe.stages[i].pid for i in stages]
    served = pool.served(stages[0])
    hold_link_s = 3 * window_s  # a link fault lasts until its stage is replaced, or this long

    def heal_later(check_s: float) -> None:
        deadline = time.monotonic() + check_s
        while time.monotonic() < deadline and pool.served(stages[0]) is served:
            time.sleep(0.05)
        pool.refuse.discard(stages[0])
        rec.t_heal = time.monotonic()
        if pool.served(stages[0]) is served and served.relay is not None:
            try:
                served.relay.heal()
            except RuntimeError as e:  # the relay is gone (its stage replaced meanwhile)
                log.info("heal: %s", e)

    def action() -> None:
        if kind in ("kill_prefill", "kill_decode", "kill_two", "kill_in_recovery"):
            if kind == "kill_in_recovery":
                pool.kill_next[stages[0]] = pool.kill_next.get(stages[0], 0) + 1
            for pid in pids:
                _signal(pid, signal.SIGKILL)
        elif kind in ("stop_short", "stop_long"):
            _signal(pids[0], signal.SIGSTOP)
            hold = window_s * (0.5 if kind == "stop_short" else STOP_LONG_WINDOWS)
            threading.Timer(hold, _signal, (pids[0], signal.SIGCONT)).start()
        elif kind == "restart_same_endpoint":
            ev = pool.in_place[stages[0]] = threading.Event()
            _signal(pids[0], signal.SIGKILL)

            def restart() -> None:
                try:
                    old = pipe.stages[stages[0]]
                    old.popen.wait(timeout=10)
                    # a supervisor's restart on the same endpoint; a tenant's hook may hand out a
                    # warm standby meanwhile (StandbyPool.replace), and then this one becomes a standby
                    new = pipe.start_stage(stages[0], old.blocks, bind=old.endpoint, codec=pipe.codec_of(stages[0]))
                    pool.restarted_in_place(stages[0], old, new)
                finally:
                    rec.t_heal = time.monotonic()  # the endpoint serves again: progress counts from here (settle)
                    ev.set()
                    pool.in_place.pop(stages[0], None)

            threading.Thread(target=restart, daemon=True).start()
        elif kind == "freeze_compute":
            freeze = ThreadFreeze(compute_thread(pids[0]), max_hold_s=2 * compute_stall_s + 2 * window_s + 10)
            if not freeze.start():
                rec.note = f"ptrace refused: {freeze.error}"
        elif kind in LINK_KINDS:
            if kind == "cut_unrecoverable":
                pool.refuse.add(stages[0])
            {"cut": served.relay.cut, "cut_unrecoverable": served.relay.cut, "partition_up": lambda: served.relay.partition("up"),
             "partition_down": lambda: served.relay.partition("down")}[kind]()
            threading.Thread(target=heal_later, args=(hold_link_s,), daemon=True).start()

    trig = Trigger(phase, rng.randint(1, 8) if phase == "decode" else 0, action)
    history.trigger = trig
    rec.fired = trig.wait(30)
    history.trigger = None
    rec.t_fault = trig.fired_at or 0.0
    if not rec.fired:
        rec.note = f"no request reached the {phase} within 30 s; not injected"
    elif rec.note.startswith("ptrace refused"):
        rec.fired = False
    return rec


# ---------------------------------------------------------------------- what it caused ---------
def settle(history: History, rec: FaultRecord, tenants: int, window_s: float) -> None:
    """Wait until every tenant used a reply after the fault (or 60 s), then note what it caused."""
    if not rec.fired:
        return
    hold = window_s * STOP_LONG_WINDOWS if rec.kind == "stop_long" else window_s * 0.5 if rec.kind == "stop_short" else 0.0
    deadline = time.monotonic() + 60 + hold + (3 * window_s if rec.kind in LINK_KINDS else 0)
    expect_failover = rec.expected == "replaced"
    while time.monotonic() < deadline:
        since_fault = history.since(rec.t_fault)
        evs = history.since(rec.t_fault + hold)
        if expect_failover:  # the tenants' progress counts after the first recovery (replies already on their way do not)
            first = next((e.t for e in since_fault if e.what == "recover_start"), None)
            evs = [e for e in since_fault if first is not None and e.t > first]
        elif rec.kind in LINK_KINDS or rec.kind == "restart_same_endpoint":
            # progress counts once the link is healed, or the endpoint serves again: before that
            # a reply that had passed the restarted stage, taken, would end the wait before the
            # next step meets the dead stage (seen at real sizes, where a step takes 50 ms: the
            # outcome was judged "no failover" and the next fault met the recovery)
            evs = [e for e in since_fault if rec.t_heal is not None and e.t > rec.t_heal]
        if len({e.tenant for e in evs if e.what == "take"}) >= tenants and not _recovering(since_fault):
            break
        time.sleep(0.1)
    evs = history.since(rec.t_fault)
    starts = [e for e in evs if e.what == "recover_start"]
    rec.failovers = len(starts)
    if starts:
        rec.first_cause = f"{starts[0].kind}: {starts[0].detail}"
        rec.detect_s = round(starts[0].t - rec.t_fault, 3)
        ends = [e for e in evs if e.what == "recover_end" and e.tenant == starts[0].tenant and e.t >= starts[0].t]
        if ends:
            rec.recover_s = round(ends[0].t - starts[0].t, 3)
            after = [e for e in evs if e.what == "take" and e.t > ends[0].t and e.tenant == starts[0].tenant]
            if after:
                rec.fault_to_token_s = round(after[0].t - rec.t_fault, 3)
                rec.breakdown = breakdown(rec.t_fault, starts[0], ends[0], after[0], evs)
    replaced = any(e.what == "recover_end" and (e.detail or {}).get("replaced") for e in evs)
    rec.outcome = "replaced" if replaced else "no failover" if not starts else "recovered without replacement"
    if rec.kind == "freeze_compute" and replaced:
        # a thread stopped while it holds the GIL stops the I/O thread too: the stage is then
        # silent, and found by its silence; either way it must be replaced
        rec.outcome_ok = True
        rec.note = ("detected by compute progress (the I/O thread kept answering)" if "compute thread" in rec.first_cause
                    else "detected by silence (the frozen thread likely held the GIL, so the I/O thread stopped too)")
    elif rec.expected == "replaced":
        rec.outcome_ok = replaced
    elif rec.expected == "no failover":
        rec.outcome_ok = not starts
    elif rec.expected == "replaced or no failover":
        rec.outcome_ok = replaced or not starts
    elif rec.expected == "replaced or replayed":
        rec.outcome_ok = bool(starts)
        in_flight = _steps_in_flight(history.until(rec.t_fault))
        if not starts and not any(e.what == "send" and in_flight.get(e.tenant) == e.req for e in evs):
            # no request that had a step in flight at the fault sent another one: each ended
            # with that step (the stages after the restarted one answered it, or it had passed
            # them all), and the next requests are served by the restarted process, as they should be
            rec.outcome_ok = True
            rec.note = "no request in flight at the fault needed the restarted stage again: nothing to recover"


def _steps_in_flight(evs: list[Event]) -> dict[int, str]:
    """Tenant -> request, for the tenants whose last step in ``evs`` (the events up to a moment)
    was sent and its reply not used yet."""
    last: dict[int, Event] = {}
    for e in evs:
        if e.what == "take" or (e.what == "send" and e.kind in ("forward", "forward_batch")):
            last[e.tenant] = e
    return {tenant: e.req for tenant, e in last.items() if e.what == "send"}


def breakdown(t_fault: float, start: Event, end: Event, first: Event, evs: list[Event]) -> dict:
    """Where one fault's time to the next token went, for the first tenant that recovered:
    ``detect_s`` (fault -> its recovery starts), ``probe_s`` / ``hook_s`` / ``handshake_s`` (the
    recovery: finding the dead stages, the hook handing out replacements, connecting and the
    ``info`` handshake; ``recovery_other_s`` is failed attempts and back-off), ``replay_send_s``
    (recovery end -> the replay's last chunk sent: prompt + tokens so far, in chunks),
    ``replay_wait_s`` (-> its reply, which carries the next token), and of that wait the time
    queued and computing at each stage, and each stage's batch, for that reply."""
    d = end.detail or {}
    rec_s = end.t - start.t
    parts = {k[:-3] + "_s": round(float(d.get(k, 0.0)) / 1e3, 3) for k in ("probe_ms", "hook_ms", "handshake_ms")}
    sends = [e for e in evs if e.what == "send" and e.kind == "forward" and e.tenant == start.tenant and end.t <= e.t <= first.t]
    last_send = sends[-1].t if sends else end.t
    trace = (first.detail or {}).get("trace") or {}
    return {"detect_s": round(start.t - t_fault, 3), **parts,
            "recovery_other_s": round(max(0.0, rec_s - sum(parts.values())), 3),
            "replay_send_s": round(last_send - end.t, 3), "replay_wait_s": round(first.t - last_send, 3),
            "replay_chunks": len(sends), "replay_queue_ms": trace.get("queue_ms"), "replay_compute_ms": trace.get("compute_ms"),
            "replay_stage_queue_ms": trace.get("stage_queue_ms"), "replay_batch": trace.get("batch"),
            "replay_stage_ahead": trace.get("stage_ahead"), "attempts": d.get("attempts")}


PARTS = ("detect_s", "probe_s", "hook_s", "handshake_s", "recovery_other_s", "replay_send_s", "replay_wait_s", "replay_queue_ms", "replay_compute_ms")


def _recovering(evs: list[Event]) -> bool:
    open_: dict[int, int] = {}
    for e in evs:
        if e.what == "recover_start":
            open_[e.tenant] = open_.get(e.tenant, 0) + 1
        elif e.what == "recover_end" and open_.get(e.tenant, 0) > 0:
            open_[e.tenant] -= 1
    return any(open_.values())


__all__ = ["FAULT_KINDS", "FaultRecord", "LINK_KINDS", "QUICK_SCHEDULE", "REPLACES", "ThreadFreeze", "Trigger", "WEIGHTS",
           "compute_thread", "inject", "settle"]
