"""Chaos: a seeded fault campaign against real stage processes, checked like a Jepsen history.

Real ``serve-stage`` processes of tiny built-in models (``launch_pipeline``), several tenants at
once (one :class:`~splitnet.edge.sdk.Session` each, ``generate`` / ``stream`` /
``generate_many``, greedy and seeded sampling), clients connected with a recovery hook that
hands out warm standbys (:class:`StandbyPool`), and a seeded, recorded schedule of faults:

- ``kill_prefill`` / ``kill_decode``: SIGKILL of one stage while a request is in its prefill
  (a later chunk is being sent) or in its decode (after some tokens);
- ``kill_two``: two stages at once;
- ``stop_short`` / ``stop_long``: SIGSTOP, then SIGCONT after half / one and a half liveness
  windows (the short one must cause no failover; the long one is replaced);
- ``kill_in_recovery``: a stage is killed, and the first replacement handed out for it is killed
  before the client's handshake (a fault inside the recovery);
- ``restart_same_endpoint``: the stage is killed and a fresh process binds the same endpoint (as
  a supervisor restart does); the hook gives the clients that endpoint back.

The schedule is drawn from ``--seed``; a kill waits for a warm standby per stage, and while the
standbys warm up (a stage process takes seconds to start) short freezes are injected as
fillers. Every fault actually injected, fillers included, is recorded in order (``runs[].faults``).

Every send and receive of every client is logged with (req, seq, epoch) and the session's epoch
(a wrapper around the session's links and reply store), and checked afterwards: each request's
tokens equal those of the fault-free run of the same request (run first, on the same pipeline:
the baseline), streamed tokens arrive exactly once (no offset twice, none missing), no reply of
an older epoch is used, no step is taken twice, no forward is sent for a released request, and
every stage holds no cache at the end (``info.cached_requests``).

Figures: ``faults_injected``, ``requests``, ``token_identical``, ``lost``, ``duplicated``,
``typed_errors``, ``untyped_errors``, ``false_failovers``, ``detect_s`` / ``recover_s`` /
``fault_to_token_s`` / ``replay_over_prefill`` (p50, p90, max), ``pending_max`` (the most
replies a session held), ``cold_start_s`` (what a respawn without a standby costs: a new stage
process to READY), the fault schedule and what each fault caused.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

FAULT_KINDS = ("kill_prefill", "kill_decode", "kill_two", "stop_short", "stop_long", "kill_in_recovery", "restart_same_endpoint")
# campaign mix: freezes are cheap, kills cost a standby each (a stage process takes seconds to start)
_WEIGHTS = {"kill_prefill": 3, "kill_decode": 4, "kill_two": 1, "stop_short": 5, "stop_long": 2, "kill_in_recovery": 1, "restart_same_endpoint": 1}
_QUICK_SCHEDULE = ("stop_short", "kill_decode", "kill_prefill", "kill_in_recovery", "restart_same_endpoint")
_REPLACES = {"kill_prefill": 1, "kill_decode": 1, "kill_two": 2, "stop_long": 1, "kill_in_recovery": 2, "restart_same_endpoint": 0, "stop_short": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny-gpt2 only, 2 tenants, one fault of five kinds (for CI)")
    p.add_argument("--faults", type=int, default=200, help="faults to inject (spread over the models); quick: 5")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule and of the request mix")
    p.add_argument("--models", default="tiny-gpt2,tiny-llama", help="built-in decoders, one pipeline each, one after the other")
    p.add_argument("--tenants", type=int, default=3, help="clients at once (one session each); quick: 2")
    p.add_argument("--time-budget-s", type=float, default=540.0, help="stop injecting when the campaign has run this long (reported)")
    p.add_argument("--heartbeat-interval-s", type=float, default=None, help="ClientConfig.heartbeat_interval_s (default: the SDK default)")
    p.add_argument("--standbys", type=int, default=1, help="warm standby processes kept per stage")


# ---------------------------------------------------------------------- the history ------------
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


class History:
    """Every client's events, in order, and the one armed fault's trigger."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self.trigger: "Trigger | None" = None

    def add(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)
            trig = self.trigger
        if trig is not None:
            trig.offer(ev)

    def since(self, t: float) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.t >= t]


def _header(frames: list) -> dict:
    try:
        h = msgpack.unpackb(bytes(frames[0]), raw=False)
        return h if isinstance(h, dict) else {}
    except Exception:  # noqa: BLE001 - a frame we cannot read is logged without fields
        return {}


def instrument(session: Any, tenant: int, history: History) -> None:
    """Log every send, receive, reply used, release and recovery of ``session`` (wrappers on
    the session's links, reply store and recovery; the SDK's behaviour is unchanged)."""
    links, replies = session.links, session._replies
    send_frames, on_message, take, release, recover = links.send_frames, links._on_message, replies.take, session.release, session.recover

    def logged_send(i: int, frames: list) -> bool:
        ok = send_frames(i, frames)
        h = _header(frames)
        if h.get("kind") in ("forward", "release"):
            history.add(Event(time.monotonic(), tenant, "send", str(h.get("kind")), str(h.get("req", "")), int(h.get("seq", -1)),
                              int(h.get("epoch", -1)), session.epoch, {"stage": i, "queued": ok}))
        return ok

    def logged_receive(stage: int | None, msg: Any, nbytes: int) -> None:
        if msg.kind in ("result", "error"):
            history.add(Event(time.monotonic(), tenant, "recv", msg.kind, msg.req, msg.seq, msg.epoch, session.epoch,
                              {"code": msg.meta.get("code")} if msg.kind == "error" else None))
        on_message(stage, msg, nbytes)

    def logged_take(keys: set) -> Any:
        got = take(keys)
        if got is not None:
            (req, seq), msg, _ = got
            history.add(Event(time.monotonic(), tenant, "take", msg.kind, req, seq, msg.epoch, session.epoch))
        return got

    def logged_release(req: str) -> None:
        history.add(Event(time.monotonic(), tenant, "release", "", req, -1, -1, session.epoch))
        release(req)

    def logged_recover(cause: Any, budget: Any) -> None:
        history.add(Event(time.monotonic(), tenant, "recover_start", type(cause).__name__, detail=str(cause)[:200]))
        try:
            recover(cause, budget)
        finally:
            history.add(Event(time.monotonic(), tenant, "recover_end", session_epoch=session.epoch))

    links.send_frames = logged_send
    links._on_message = logged_receive
    replies.take = logged_take
    session.release = logged_release
    session.recover = logged_recover


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


# ---------------------------------------------------------------------- faults -----------------
@dataclass
class Trigger:
    """Fires ``action`` once, on the first event that matches (in the thread that logged it)."""

    phase: str  # "prefill": a later prefill chunk is sent; "decode": the k-th reply of a request is used; "now"
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
        self.action()
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
    detect_s: float | None = None
    recover_s: float | None = None
    fault_to_token_s: float | None = None
    failovers: int = 0  # recoveries started by any tenant because of this fault
    first_cause: str = ""  # what the first recovery after it was for
    note: str = ""


def _is_stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


class StandbyPool:
    """The clients' recovery hook: stage ``i`` down -> a warm standby for its blocks takes its
    place (or, with none ready, a process started now). Several sessions ask at once: the first
    replaces the stage, the others get the live replacement. Kept warm by a background thread."""

    def __init__(self, pipe: Any, per_stage: int):
        self.pipe = pipe
        self.per_stage = per_stage
        self.ready: dict[int, list[Any]] = {i: [] for i in range(len(pipe.stages))}
        self.locks = {i: threading.Lock() for i in self.ready}
        self.kill_next: dict[int, int] = {}  # stage -> replacements to kill right after handing them out
        self.in_place: dict[int, threading.Event] = {}
        self.cold_start_s: list[float] = []
        self.replacements = 0
        self._pool_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._starting: dict[int, int] = {}  # stage -> standbys being started now
        # two starts at once: a stage process spends most of its start-up importing and loading
        self._threads = [threading.Thread(target=self._refill, name=f"chaos-standbys-{k}", daemon=True) for k in range(2)]

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.ready)) as pool:
            for i, sp in zip(self.ready, pool.map(self._spawn, self.ready)):
                self.ready[i].append(sp)
        for th in self._threads:
            th.start()

    def _spawn(self, i: int) -> Any:
        t0 = time.monotonic()
        sp = self.pipe.start_stage(i, self.pipe.stages[i].blocks)
        self.cold_start_s.append(time.monotonic() - t0)
        return sp

    def _refill(self) -> None:
        while not self._stop.is_set():
            with self._pool_lock:
                short = [i for i, lst in self.ready.items() if len(lst) + self._starting.get(i, 0) < self.per_stage]
                if short:
                    self._starting[short[0]] = self._starting.get(short[0], 0) + 1
            if not short:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                sp = self._spawn(short[0])
            except Exception:  # noqa: BLE001 - a standby that failed to start is tried again
                time.sleep(1.0)
                sp = None
            with self._pool_lock:
                self._starting[short[0]] -= 1
                if sp is not None:
                    self.ready[short[0]].append(sp)

    def all_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if all(len(lst) >= self.per_stage for lst in self.ready.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def __call__(self, i: int) -> str:
        with self.locks[i]:
            waiting = self.in_place.get(i)
            if waiting is not None:
                waiting.wait(120)  # a restart on the same endpoint is under way: that is the replacement
            cur = self.pipe.stages[i]
            if cur.popen.poll() is None and not _is_stopped(cur.pid) and self.kill_next.get(i, 0) == 0:
                return cur.endpoint  # alive and running: another session replaced it already
            if cur.popen.poll() is None:
                cur.popen.kill()  # condemned (frozen): the replacement takes its blocks
                cur.popen.wait(timeout=10)
            with self._pool_lock:
                sp = self.ready[i].pop(0) if self.ready[i] else None
            if sp is None:
                sp = self._spawn(i)
            self._wake.set()
            self.pipe.stages[i] = sp
            self.replacements += 1
            if self.kill_next.get(i, 0) > 0:
                self.kill_next[i] -= 1
                sp.popen.kill()  # a fault inside the recovery: the replacement dies before the handshake
                sp.popen.wait(timeout=10)
            return sp.endpoint

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for th in self._threads:
            th.join(timeout=60)
        for lst in self.ready.values():
            for sp in lst:
                if sp.popen.poll() is None:
                    sp.popen.kill()


# ---------------------------------------------------------------------- tenants ----------------
@dataclass(frozen=True)
class RequestSpec:
    mode: str  # generate | stream | generate_many
    prompts: tuple[tuple[int, ...], ...]
    new_tokens: int
    sampling_seed: int | None  # None: greedy


@dataclass
class Outcome:
    spec: int
    tenant: int
    tokens: list[list[int]] | None = None
    delivered: list[list[int]] = field(default_factory=list)  # tokens as they arrived (stream offsets / on_token)
    duplicated: int = 0
    error: str = ""
    typed: bool = False
    ttft_s: float | None = None  # first token of the first sequence, from the call
    replays: int = 0
    t_start: float = 0.0
    t_end: float = 0.0


def _sampling(spec: RequestSpec) -> Any:
    from splitnet.edge.sampling import SamplingConfig

    return None if spec.sampling_seed is None else SamplingConfig(temperature=1.0, top_k=40, seed=spec.sampling_seed)


def run_request(session: Any, spec: RequestSpec, out: Outcome) -> None:
    """One request of ``spec``; what it gave (and how it arrived) into ``out``."""
    from splitnet.edge.generation import GenerationResult, TokenChunk
    from splitnet.errors import SplitnetError

    out.t_start = time.monotonic()
    try:
        if spec.mode == "generate":
            r = session.generate(list(spec.prompts[0]), spec.new_tokens, sampling=_sampling(spec))
            out.tokens = [r.tokens]
            out.delivered = [list(r.tokens)]
            out.ttft_s, out.replays = r.ttft_ms / 1e3, r.replays
        elif spec.mode == "stream":
            seen: list[int] = []
            for ev in session.stream(list(spec.prompts[0]), spec.new_tokens, sampling=_sampling(spec)):
                if isinstance(ev, TokenChunk):
                    if ev.offset != len(seen):
                        out.duplicated += int(ev.offset < len(seen))
                    if ev.offset >= len(seen):
                        seen.append(ev.token)
                elif isinstance(ev, GenerationResult):
                    out.tokens = [ev.tokens]
                    out.ttft_s, out.replays = ev.ttft_ms / 1e3, ev.replays
            out.delivered = [seen]
        else:
            arrived: list[list[int]] = [[] for _ in spec.prompts]
            rs = session.generate_many([list(p) for p in spec.prompts], spec.new_tokens, sampling=_sampling(spec),
                                       on_token=lambda i, tok: arrived[i].append(tok))
            out.tokens = [r.tokens for r in rs]
            out.delivered = arrived
            out.ttft_s, out.replays = min(r.ttft_ms for r in rs) / 1e3, sum(r.replays for r in rs)
    except SplitnetError as e:
        out.error, out.typed = f"{type(e).__name__}: {e}"[:300], True
    except Exception as e:  # noqa: BLE001 - an untyped failure is a finding, reported
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.t_end = time.monotonic()


def _specs(rng: random.Random, vocab: int, n: int) -> list[RequestSpec]:
    specs = []
    modes = ("generate", "stream", "generate_many")
    for k in range(n):
        mode = modes[k % 3]
        prompts = tuple(tuple(rng.randrange(1, vocab) for _ in range(rng.randint(20, 40))) for _ in range(2 if mode == "generate_many" else 1))
        specs.append(RequestSpec(mode, prompts, rng.randint(24, 40), None if k % 2 == 0 else rng.randrange(1, 10_000)))
    return specs


# ---------------------------------------------------------------------- one model's campaign ---
def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "max": None, "n": 0}
    s = sorted(xs)
    return {"p50": round(statistics.median(s), 3), "p90": round(s[min(len(s) - 1, int(0.9 * len(s)))], 3), "max": round(s[-1], 3), "n": len(s)}


def _campaign(model: str, kinds: list[str], rng: random.Random, args: argparse.Namespace, deadline: float, config: Any) -> dict:
    import splitnet
    from splitnet.runtime.launcher import launch_pipeline

    history = History()
    with launch_pipeline(model, num_stages=3) as pipe:
        pool = StandbyPool(pipe, args.standbys)
        try:
            t_pool = time.monotonic()
            pool.start()
            window_s = config.heartbeat_interval_s * config.heartbeat_liveness
            with splitnet.connect(pipe.endpoints, config=config) as probe:
                specs = _specs(rng, 256, 12)  # byte-level tiny models: ids 1..255 are text bytes
                reference: list[Outcome] = []
                for k, spec in enumerate(specs):  # the baseline: every request once, no faults
                    o = Outcome(k, -1)
                    run_request(probe, spec, o)
                    if o.error:
                        raise RuntimeError(f"fault-free run of request {k} failed: {o.error}")
                    reference.append(o)
            ref_s = [o.t_end - o.t_start for o in reference]
            stop = threading.Event()
            outcomes: list[Outcome] = []
            out_lock = threading.Lock()
            sessions: dict[int, Any] = {}

            def tenant(tid: int) -> None:
                trng = random.Random(args.seed * 1000 + tid)
                try:
                    with splitnet.connect(pipe.endpoints, config=config, recovery=pool) as s:
                        instrument(s, tid, history)
                        while not stop.is_set():
                            k = trng.randrange(len(specs))
                            o = Outcome(k, tid)
                            run_request(s, specs[k], o)
                            with out_lock:
                                outcomes.append(o)
                        sessions[tid] = {"pending_max": s.reply_counts.most_held, "epoch": s.epoch, "recoveries": len(s.recoveries),
                                         "reply_counts": asdict(s.reply_counts)}
                except Exception as e:  # noqa: BLE001 - a tenant that could not run is a finding
                    sessions[tid] = {"pending_max": None, "failed": f"{type(e).__name__}: {e}"[:300]}

            threads = [threading.Thread(target=tenant, args=(t,), name=f"chaos-tenant-{t}", daemon=True) for t in range(args.tenants)]
            for th in threads:
                th.start()
            time.sleep(1.0)
            faults: list[FaultRecord] = []
            for kind in kinds:
                if time.monotonic() > deadline:
                    break
                # a kill needs a warm standby per stage (a process takes seconds to start): while
                # the pool refills, short freezes are injected (recorded as fillers)
                while not args.quick and _REPLACES[kind] and not pool.all_ready(0) and time.monotonic() < deadline \
                        and sum(f.fired for f in faults) < len(kinds):
                    faults.append(_inject(len(faults), "stop_short", model, rng, pipe, pool, history, window_s))
                    faults[-1].note = "filler while the standbys warm up"
                    _settle(history, faults[-1], args.tenants, window_s)
                if sum(f.fired for f in faults) >= len(kinds) or time.monotonic() > deadline:
                    break
                if _REPLACES[kind] and not pool.all_ready(90):
                    faults.append(FaultRecord(len(faults), kind, [], "", model, note="no warm standby within 90 s; not injected"))
                    continue
                faults.append(_inject(len(faults), kind, model, rng, pipe, pool, history, window_s))
                _settle(history, faults[-1], args.tenants, window_s)
            stop.set()
            for th in threads:
                th.join(timeout=180)
            hung = [th.name for th in threads if th.is_alive()]
            cached = _cached_requests(splitnet, pipe, config)
        finally:
            pool.close()
    return _figures(model, specs, reference, ref_s, outcomes, faults, history, sessions, hung, cached, pool, window_s, time.monotonic() - t_pool)


def _inject(n: int, kind: str, model: str, rng: random.Random, pipe: Any, pool: StandbyPool, history: History, window_s: float) -> FaultRecord:
    nst = len(pipe.stages)
    stages = sorted(rng.sample(range(nst), 2)) if kind == "kill_two" else [rng.randrange(nst)]
    phase = "prefill" if kind == "kill_prefill" else "decode"
    rec = FaultRecord(n, kind, stages, phase, model)
    pids = [pipe.stages[i].pid for i in stages]

    def action() -> None:
        if kind in ("kill_prefill", "kill_decode", "kill_two", "kill_in_recovery"):
            if kind == "kill_in_recovery":
                pool.kill_next[stages[0]] = pool.kill_next.get(stages[0], 0) + 1
            for pid in pids:
                _signal(pid, signal.SIGKILL)
        elif kind in ("stop_short", "stop_long"):
            _signal(pids[0], signal.SIGSTOP)
            hold = window_s * (0.5 if kind == "stop_short" else 1.5)
            threading.Timer(hold, _signal, (pids[0], signal.SIGCONT)).start()
        elif kind == "restart_same_endpoint":
            ev = pool.in_place[stages[0]] = threading.Event()
            _signal(pids[0], signal.SIGKILL)

            def restart() -> None:
                try:
                    pipe.stages[stages[0]].popen.wait(timeout=10)
                    pipe.restart_stage_in_place(stages[0])
                finally:
                    ev.set()
                    pool.in_place.pop(stages[0], None)

            threading.Thread(target=restart, daemon=True).start()

    trig = Trigger(phase, rng.randint(1, 8) if phase == "decode" else 0, action)
    history.trigger = trig
    rec.fired = trig.wait(30)
    history.trigger = None
    rec.t_fault = trig.fired_at or 0.0
    if not rec.fired:
        rec.note = f"no request reached the {phase} within 30 s; not injected"
    return rec


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _settle(history: History, rec: FaultRecord, tenants: int, window_s: float) -> None:
    """Wait until every tenant used a reply after the fault (or 60 s), then note what it caused."""
    if not rec.fired:
        return
    hold = window_s * 1.5 if rec.kind == "stop_long" else window_s * 0.5 if rec.kind == "stop_short" else 0.0
    deadline = time.monotonic() + 60 + hold
    expect_failover = rec.kind != "stop_short"
    while time.monotonic() < deadline:
        evs = history.since(rec.t_fault + hold)
        since_fault = history.since(rec.t_fault)
        if expect_failover:  # the tenants' progress counts after the first recovery (replies already on their way do not)
            first = next((e.t for e in since_fault if e.what == "recover_start"), None)
            evs = [e for e in since_fault if first is not None and e.t > first]
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
            after = [e for e in evs if e.what == "take" and e.t > ends[0].t]
            if after:
                rec.fault_to_token_s = round(after[0].t - rec.t_fault, 3)


def _recovering(evs: list[Event]) -> bool:
    open_: dict[int, int] = {}
    for e in evs:
        if e.what == "recover_start":
            open_[e.tenant] = open_.get(e.tenant, 0) + 1
        elif e.what == "recover_end" and open_.get(e.tenant, 0) > 0:
            open_[e.tenant] -= 1
    return any(open_.values())


def _cached_requests(splitnet: Any, pipe: Any, config: Any) -> list[int | None]:
    """Each live stage's cached requests once the tenants are gone (releases are asynchronous:
    asked again for a few seconds until every cache is released)."""
    counts: list[int | None] = []
    with splitnet.connect(pipe.endpoints, config=config) as s:
        for _ in range(20):
            counts = [info.get("cached_requests") for info in s.refresh()]
            if all(c == 0 for c in counts):
                break
            time.sleep(0.25)
    return counts


def _replay_ratios(outcomes: list[Outcome], history: History, reference: list[Outcome]) -> list[float]:
    """Per recovery: the time from its end to the tenant's next reply used (the replay of the
    sequence's log), over a fresh prefill of the same request under the same load (the median
    time to first token of that request's runs without a fault; the fault-free run alone when
    there is none)."""
    fresh: dict[int, list[float]] = {}
    for o in outcomes:
        if not o.error and o.replays == 0 and o.ttft_s:
            fresh.setdefault(o.spec, []).append(o.ttft_s)
    ratios = []
    evs = history.events
    for k, e in enumerate(evs):
        if e.what != "recover_end":
            continue
        nxt = next((x for x in evs[k + 1:] if x.tenant == e.tenant and x.what == "take"), None)
        own = next((o for o in outcomes if o.tenant == e.tenant and o.t_start <= e.t <= o.t_end), None)
        if nxt is None or own is None:
            continue
        prefill = statistics.median(fresh[own.spec]) if own.spec in fresh else reference[own.spec].ttft_s
        if prefill:
            ratios.append((nxt.t - e.t) / prefill)
    return ratios


def _figures(model, specs, reference, ref_s, outcomes, faults, history, sessions, hung, cached, pool, window_s, wall_s) -> dict:
    identical = lost = duplicated = typed = untyped = 0
    errors: list[str] = []
    for o in outcomes:
        ref = reference[o.spec].tokens
        duplicated += o.duplicated
        if o.error:
            typed += int(o.typed)
            untyped += int(not o.typed)
            errors.append(o.error)
            continue
        if o.tokens == ref:
            identical += 1
        for got, arrived, want in zip(o.tokens or [], o.delivered, ref or []):
            lost += max(0, len(want) - len(got))
            duplicated += max(0, len(arrived) - len(got))
            if arrived[:len(got)] != got:
                lost += 1  # what arrived is not what the result says
    checks = check_history(history.events)
    fired = [f for f in faults if f.fired]
    stop_short_ids = [f for f in fired if f.kind == "stop_short"]
    return {
        "model": model,
        "faults_injected": len(fired),
        "faults_by_kind": {k: sum(1 for f in fired if f.kind == k) for k in FAULT_KINDS},
        "requests": len(outcomes),
        "token_identical": identical,
        "lost": lost,
        "duplicated": duplicated,
        "typed_errors": typed,
        "untyped_errors": untyped,
        "errors": errors[:20],
        "false_failovers": sum(f.failovers > 0 for f in stop_short_ids),
        "detect_s": _percentiles([f.detect_s for f in fired if f.detect_s is not None and f.kind != "stop_short"]),
        "recover_s": _percentiles([f.recover_s for f in fired if f.recover_s is not None and f.kind != "stop_short"]),
        "fault_to_token_s": _percentiles([f.fault_to_token_s for f in fired if f.fault_to_token_s is not None and f.kind != "stop_short"]),
        "replay_over_prefill": _percentiles(_replay_ratios(outcomes, history, reference)),
        "pending_max": max((v["pending_max"] or 0 for v in sessions.values()), default=None),
        "sessions": list(sessions.values()),
        "tenant_failures": [v["failed"] for v in sessions.values() if "failed" in v],
        "history": checks,
        "caches_left": cached,
        "hung_tenants": hung,
        "replacements": pool.replacements,
        "cold_start_s": _percentiles(pool.cold_start_s),
        "baseline_fault_free": {"requests": len(reference), "request_s": _percentiles(ref_s)},
        "window_s": window_s,
        "wall_s": round(wall_s, 1),
        "faults": [{k: v for k, v in asdict(f).items() if k != "t_fault"} for f in faults],
    }


# ---------------------------------------------------------------------- the suite --------------
def _schedule(rng: random.Random, n: int, quick: bool) -> list[str]:
    if quick:
        return list(_QUICK_SCHEDULE[:n])
    kinds = list(_WEIGHTS)
    return rng.choices(kinds, weights=[_WEIGHTS[k] for k in kinds], k=n)


def run(args: argparse.Namespace) -> dict:
    from splitnet.edge.config import ClientConfig

    quick = bool(args.quick)
    n_faults = args.faults if not quick or args.faults != 200 else len(_QUICK_SCHEDULE)
    models = ["tiny-gpt2"] if quick else [m for m in args.models.split(",") if m]
    if quick:
        args.tenants = min(args.tenants, 2)
    rng = random.Random(args.seed)
    kinds = _schedule(rng, n_faults, quick)
    cfg = {"prefill_chunk_tokens": 8}
    if args.heartbeat_interval_s:
        cfg["heartbeat_interval_s"] = args.heartbeat_interval_s
    config = ClientConfig(**cfg)
    t0 = time.monotonic()
    deadline = t0 + args.time_budget_s
    per_model = [kinds[i::len(models)] for i in range(len(models))]
    runs = []
    for j, (m, ks) in enumerate(zip(models, per_model)):  # each model gets its share of the time budget
        share = t0 + args.time_budget_s * (j + 1) / len(models)
        runs.append(_campaign(m, ks, random.Random(rng.random()), args, min(share, deadline), config))
    total = {k: sum(r[k] for r in runs) for k in ("faults_injected", "requests", "token_identical", "lost", "duplicated", "typed_errors",
                                                  "untyped_errors", "false_failovers", "replacements")}
    hist = {k: sum(r["history"][k] for r in runs) for k in runs[0]["history"]}
    fired = [f for r in runs for f in r["faults"] if f["fired"]]
    ok = (total["lost"] == 0 and total["duplicated"] == 0 and total["token_identical"] == total["requests"] and total["untyped_errors"] == 0
          and hist["old_epoch_replies_used"] == 0 and hist["steps_taken_twice"] == 0 and hist["forwards_after_release"] == 0
          and all(all(c == 0 for c in r["caches_left"]) for r in runs) and not any(r["hung_tenants"] or r["tenant_failures"] for r in runs))
    return {
        "config": {"quick": quick, "faults_requested": n_faults, "seed": args.seed, "models": models, "tenants": args.tenants,
                   "stages": 3, "standbys_per_stage": args.standbys, "time_budget_s": args.time_budget_s,
                   "client_config": {"heartbeat_interval_s": config.heartbeat_interval_s, "heartbeat_liveness": config.heartbeat_liveness,
                                     "disconnect_grace_s": config.disconnect_grace_s, "max_recoveries": config.max_recoveries,
                                     "prefill_chunk_tokens": config.prefill_chunk_tokens},
                   "schedule": kinds},
        **total,
        "history": hist,
        "detect_s": _percentiles([f["detect_s"] for f in fired if f["detect_s"] is not None and f["kind"] != "stop_short"]),
        "recover_s": _percentiles([f["recover_s"] for f in fired if f["recover_s"] is not None and f["kind"] != "stop_short"]),
        "fault_to_token_s": _percentiles([f["fault_to_token_s"] for f in fired if f["fault_to_token_s"] is not None and f["kind"] != "stop_short"]),
        "replay_over_prefill": {r["model"]: r["replay_over_prefill"] for r in runs},
        "pending_max": max((r["pending_max"] or 0) for r in runs),
        "invariants_hold": ok,
        "wall_s": round(time.monotonic() - t0, 1),
        "runs": runs,
        "exit_code": 0 if ok else 1,
    }


def summarize(doc: dict) -> str:
    return (f"chaos: {doc['faults_injected']} faults, {doc['requests']} requests, {doc['token_identical']} token-identical, "
            f"lost {doc['lost']}, duplicated {doc['duplicated']}, typed errors {doc['typed_errors']}, untyped {doc['untyped_errors']}, "
            f"false failovers {doc['false_failovers']}; detect p50 {doc['detect_s']['p50']} s max {doc['detect_s']['max']} s; "
            f"recover p50 {doc['recover_s']['p50']} s; invariants {'hold' if doc['invariants_hold'] else 'VIOLATED'} ({doc['wall_s']} s)")
