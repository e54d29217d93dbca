"""Chaos: a seeded fault campaign against real stage processes, checked like a Jepsen history.

Real ``serve-stage`` processes of tiny built-in models (``launch_pipeline``), several tenants at
once (one :class:`~splitnet.edge.sdk.Session` each, ``generate`` / ``stream`` /
``generate_many``, greedy and seeded sampling), every stage behind a link relay on 127.0.0.1
(:mod:`splitnet.lab.relay`; ``--no-relays`` connects directly and leaves the link faults out),
clients connected with a recovery hook that hands out warm standbys
(:class:`~splitnet.bench.chaos_pool.StandbyPool`), and a seeded, recorded schedule of faults of
the kinds in :mod:`splitnet.bench.chaos_faults` (kills in prefill and decode, two at once, short
and long SIGSTOP, a kill during recovery, a restart on the same endpoint, a frozen compute
thread, a link cut, a one-way partition either way, a cut with no recovery possible).

The schedule is drawn from ``--seed``; a kill waits for a warm standby per stage, and while the
standbys warm up (a stage process takes seconds to start) short freezes are injected as
fillers. Every fault actually injected, fillers included, is recorded in order (``runs[].faults``)
with the outcome its kind must have and the one it had.

Every send and receive of every client is logged with (req, seq, epoch) and the session's epoch
(the session's public message hook), and checked afterwards: each request's tokens equal those
of the fault-free run of the same request (run first, on the same pipeline: the baseline),
streamed tokens arrive exactly once, no reply of an older epoch is used, no step is taken twice,
no forward is sent for a released request, and every stage holds no cache at the end.

``--impair delay=200,jitter=20,loss=0.01`` runs no faults: the tenants run through relays that
add that one-way delay (ms), jitter (+- ms) and segment loss (a fraction) to every link, and the
figures say whether any recovery started (``false_failovers``, which must be 0) and whether the
tokens equal the unimpaired run's.

Figures: ``faults_injected``, ``requests``, ``token_identical``, ``lost``, ``duplicated``,
``typed_errors`` (``typed_errors_expected``: those of the recovery-impossible faults, each
within 2 x the window or not), ``untyped_errors``, ``false_failovers``, ``detect_s`` /
``recover_s`` / ``fault_to_token_s`` (p50, p90, max; also per kind), ``fault_to_token_parts``
(where that time went: detection, probe, hook, handshake, replay send and wait, the replay's
queue and compute time at the stages), ``replay_over_prefill`` (recovery end to the next
token, a resume or a replay, over a fresh prefill of the request's context, prompt + tokens so
far, in the same campaign), ``pending_max``, ``cold_start_s`` (a new stage
process to READY), ``outcomes_ok`` (faults whose outcome was the expected one), the schedule.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from splitnet.bench.chaos_faults import FAULT_KINDS, LINK_KINDS, PARTS, QUICK_SCHEDULE, REPLACES, WEIGHTS, FaultRecord, inject, settle
from splitnet.runtime.retire import RETIRE_AFTER_S
from splitnet.bench.chaos_history import History, check_history, instrument
from splitnet.bench.chaos_pool import StandbyPool


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help=f"tiny-gpt2 only, 2 tenants, one fault of {len(QUICK_SCHEDULE)} kinds (for CI)")
    p.add_argument("--faults", type=int, default=200,
                   help=f"scheduled faults to inject (spread over the models; fillers come on top); quick: {len(QUICK_SCHEDULE)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule and of the request mix")
    p.add_argument("--models", default="tiny-gpt2,tiny-llama", help="built-in decoders, one pipeline each")
    p.add_argument("--concurrent-models", action="store_true",
                   help="run the models' campaigns at the same time, each with the whole time budget (for hosts with many cores)")
    p.add_argument("--tenants", type=int, default=3, help="clients at once per pipeline (one session each); quick: 2")
    p.add_argument("--time-budget-s", type=float, default=540.0, help="stop injecting when the campaign has run this long (reported)")
    p.add_argument("--heartbeat-interval-s", type=float, default=None, help="ClientConfig.heartbeat_interval_s (default: the SDK default)")
    p.add_argument("--standbys", type=int, default=1, help="warm standby processes kept per stage")
    p.add_argument("--standby-refill-delay-s", type=float, default=0.0,
                   help="start the next standby this long after one was handed out (0: at once)")
    p.add_argument("--retire-delay-s", type=float, default=RETIRE_AFTER_S,
                   help="a condemned stage process is stopped (SIGSTOP) when replaced and killed this long after, as "
                        "splitnet.runtime.fleet.local_starter does (0: killed at once, its CUDA teardown beside the replay)")
    p.add_argument("--start-workers", type=int, default=2, help="standby processes started at once per pipeline")
    p.add_argument("--one-fault-per-request", action="store_true",
                   help="before each scheduled fault, wait until every tenant runs a request started after the last one "
                        "(as --quick does): each request meets one scheduled fault, so every typed error is one fault's; "
                        "without it faults come back to back and a long request may meet several and spend its recovery budget")
    p.add_argument("--kinds", default="",
                   help=f"only these fault kinds, comma-separated, drawn with their usual weights (default all: {', '.join(FAULT_KINDS)})")
    p.add_argument("--no-relays", action="store_true", help="clients and stages connect directly (no link faults, no --impair)")
    p.add_argument("--device", default="cpu",
                   help="torch device of every stage process, standbys and restarts included: cpu, cuda, cuda:N "
                        "(CUDA stages start as fresh interpreters, not forks)")
    p.add_argument("--impair", default="", help="no faults: every link through a relay with delay=MS,jitter=MS,loss=FRACTION")


def parse_impair(text: str) -> Any:
    """``delay=200,jitter=20,loss=0.01`` -> an Impairment (ms, ms, loss as a fraction of segments)."""
    from splitnet.errors import ConfigError
    from splitnet.lab.relay import Impairment

    values = {"delay": 0.0, "jitter": 0.0, "loss": 0.0}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, _, val = part.partition("=")
        if key not in values:
            raise ConfigError(f"--impair: unknown key {key!r}; known: delay (ms), jitter (ms), loss (fraction, e.g. 0.01)")
        try:
            values[key] = float(val)
        except ValueError:
            raise ConfigError(f"--impair: {key}={val!r} is not a number") from None
    if not 0 <= values["loss"] < 1:
        raise ConfigError(f"--impair: loss is a fraction in [0, 1), got {values['loss']}")
    return Impairment(delay_ms=values["delay"], jitter_ms=values["jitter"], loss_pct=values["loss"] * 100)


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
        # one-sequence prompts span the lengths a replay has (prompt + tokens so far), so that
        # a replay of N chunks has fresh prefills of N chunks to be compared with
        lengths = (20, 40) if mode == "generate_many" else (16, 104)
        prompts = tuple(tuple(rng.randrange(1, vocab) for _ in range(rng.randint(*lengths))) for _ in range(2 if mode == "generate_many" else 1))
        specs.append(RequestSpec(mode, prompts, rng.randint(24, 40), None if k % 2 == 0 else rng.randrange(1, 10_000)))
    return specs


# ---------------------------------------------------------------------- one model's campaign ---
def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "max": None, "n": 0}
    s = sorted(xs)
    return {"p50": round(statistics.median(s), 3), "p90": round(s[min(len(s) - 1, int(0.9 * len(s)))], 3), "max": round(s[-1], 3), "n": len(s)}


def _parts(breakdowns: list[dict]) -> dict:
    """Percentiles of each part of fault_to_token_s over the faults that have one."""
    return {k: _percentiles([b[k] for b in breakdowns if isinstance(b.get(k), (int, float))]) for k in PARTS}


@dataclass
class _Tenants:
    """The tenants of one pipeline: each a session running requests until ``stop``."""

    outcomes: list = field(default_factory=list)
    sessions: dict = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list = field(default_factory=list)
    started: dict = field(default_factory=dict)  # tenant -> when its request in flight started

    def wait_fresh_requests(self, since: float, timeout_s: float) -> None:
        """Wait until every live tenant runs a request started after ``since`` (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(self.started.get(i, 0.0) <= since for i, th in enumerate(self.threads) if th.is_alive()):
            time.sleep(0.05)

    def start(self, n: int, seed: int, specs: list, endpoints: list[str], config: Any, history: History, pool: StandbyPool | None) -> None:
        import splitnet

        def tenant(tid: int) -> None:
            trng = random.Random(seed * 1000 + tid)
            try:
                hook = pool.hook_for(tid) if pool is not None else None
                with splitnet.connect(endpoints, config=config, recovery=hook) as s:
                    instrument(s, tid, history)
                    while not self.stop.is_set():
                        k = trng.randrange(len(specs))
                        o = Outcome(k, tid)
                        self.started[tid] = time.monotonic()
                        run_request(s, specs[k], o)
                        with self.lock:
                            self.outcomes.append(o)
                    self.sessions[tid] = {"pending_max": s.reply_counts.most_held, "epoch": s.epoch, "recoveries": len(s.recoveries),
                                          "reply_counts": asdict(s.reply_counts)}
            except Exception as e:  # noqa: BLE001 - a tenant that could not run is a finding
                self.sessions[tid] = {"pending_max": None, "failed": f"{type(e).__name__}: {e}"[:300]}

        self.threads = [threading.Thread(target=tenant, args=(t,), name=f"chaos-tenant-{t}", daemon=True) for t in range(n)]
        for th in self.threads:
            th.start()

    def finish(self, timeout_s: float = 180) -> list[str]:
        self.stop.set()
        for th in self.threads:
            th.join(timeout=timeout_s)
        return [th.name for th in self.threads if th.is_alive()]


def _restart_burst(splitnet: Any, endpoints: list[str], config: Any, specs: list, k: int, rounds: int) -> list[tuple[int, float]]:
    """What a client without recovery meets when one loss ends ``k`` requests at once and all
    of them start again: ``rounds`` times, ``k`` sessions start a fresh one-sequence request
    together (a barrier); (prompt tokens, time to first token) of each. No faults, the
    campaign's links; two new tokens each (the first token is what is timed)."""
    import threading

    ones = [sp for sp in specs if sp.mode != "generate_many"]
    if k < 2 or not ones:
        return []
    samples: list[tuple[int, float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(k, timeout=60)

    def one(j: int) -> None:
        with splitnet.connect(endpoints, config=config) as s:
            for r in range(rounds):
                sp = ones[(r * k + j) % len(ones)]
                spec = RequestSpec("generate", sp.prompts, 2, None)
                o = Outcome(-1, -1)
                barrier.wait()
                run_request(s, spec, o)
                if o.error or not o.ttft_s:
                    raise RuntimeError(f"restart burst: request failed without a fault: {o.error}")
                with lock:
                    samples.append((len(sp.prompts[0]), o.ttft_s))

    errors: list[BaseException] = []

    def guarded(j: int) -> None:
        try:
            one(j)
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=guarded, args=(j,), name=f"chaos-burst-{j}", daemon=True) for j in range(k)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    if errors:
        raise RuntimeError(f"restart burst failed: {type(errors[0]).__name__}: {errors[0]}")
    return samples


def _line(samples: list[tuple[int, float]]) -> "tuple[float, float] | None":
    """Least squares ``seconds = a + b * tokens`` over (tokens, seconds) samples."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mx, my = sum(x for x, _ in samples) / n, sum(y for _, y in samples) / n
    sxx = sum((x - mx) ** 2 for x, _ in samples)
    b = sum((x - mx) * (y - my) for x, y in samples) / sxx if sxx else 0.0
    return my - b * mx, b


def _reference(splitnet: Any, endpoints: list[str], config: Any, specs: list) -> list:
    """The baseline: every request once, no faults, direct links."""
    reference = []
    with splitnet.connect(endpoints, config=config) as probe:
        for k, spec in enumerate(specs):
            o = Outcome(k, -1)
            run_request(probe, spec, o)
            if o.error:
                raise RuntimeError(f"fault-free run of request {k} failed: {o.error}")
            reference.append(o)
    return reference


def _campaign(model: str, kinds: list[str], rng: random.Random, args: argparse.Namespace, deadline: float, config: Any) -> dict:
    import splitnet
    from splitnet.runtime.launcher import launch_pipeline

    history = History()
    relays = not args.no_relays
    with launch_pipeline(model, num_stages=3, extra_args=("--device", args.device)) as pipe:
        pool = StandbyPool(pipe, args.standbys, relays=relays, start_workers=args.start_workers, refill_delay_s=args.standby_refill_delay_s,
                           retire_delay_s=args.retire_delay_s)
        try:
            t_pool = time.monotonic()
            pool.start()
            window_s = config.heartbeat_interval_s * config.heartbeat_liveness
            specs = _specs(rng, 256, 12)  # byte-level tiny models: ids 1..255 are text bytes
            reference = _reference(splitnet, pipe.endpoints, config, specs)
            burst = _restart_burst(splitnet, pipe.endpoints, config, specs, args.tenants, 2 if args.quick else 6)
            tenants = _Tenants()
            tenants.start(args.tenants, args.seed, specs, pool.endpoints, config, history, pool)
            time.sleep(1.0)
            faults: list[FaultRecord] = []
            kinds = [k for k in kinds if relays or k not in LINK_KINDS]
            for kind in kinds:
                if time.monotonic() > deadline:
                    break
                # a kill needs a warm standby per stage (a process takes seconds to start): while
                # the pool refills, short freezes are injected (recorded as fillers, counted in
                # faults_injected but not against the schedule: every scheduled kind gets its turn)
                while not args.quick and REPLACES[kind] and not pool.all_ready(0) and time.monotonic() < deadline:
                    faults.append(inject(len(faults), "stop_short", model, rng, pipe, pool, history, window_s, config.compute_stall_s))
                    faults[-1].note = "filler while the standbys warm up"
                    settle(history, faults[-1], args.tenants, window_s)
                if time.monotonic() > deadline:
                    break
                if REPLACES[kind] and not pool.all_ready(90):
                    faults.append(FaultRecord(len(faults), kind, [], "", model, note="no warm standby within 90 s; not injected"))
                    continue
                if (args.quick or args.one_fault_per_request) and faults:
                    # CI checks each kind's outcome: a request meets one fault at most (a long one that
                    # meets several runs out of its recovery budget, max_recoveries: the full campaign shows that)
                    tenants.wait_fresh_requests(faults[-1].t_heal or faults[-1].t_fault, 120)
                faults.append(inject(len(faults), kind, model, rng, pipe, pool, history, window_s, config.compute_stall_s))
                settle(history, faults[-1], args.tenants, window_s)
                print(f"chaos {model}: fault {len(faults)} {kind} -> {faults[-1].outcome} "
                      f"(detect {faults[-1].detect_s}, to token {faults[-1].fault_to_token_s})", flush=True)
            hung = tenants.finish()
            cached, mean_batch = _cached_requests(splitnet, pool.endpoints, config)
        finally:
            pool.close()
    doc = _figures(model, specs, reference, tenants, faults, history, hung, cached, pool, window_s, time.monotonic() - t_pool, burst, args.tenants)
    doc["stage_mean_batch"] = mean_batch
    return doc


def _impaired(model: str, rng: random.Random, args: argparse.Namespace, deadline: float, config: Any) -> dict:
    """No faults: tenants through impaired relays on every link; any recovery is a false failover."""
    import splitnet
    from splitnet.runtime.launcher import launch_pipeline

    history = History()
    imp = parse_impair(args.impair)
    with launch_pipeline(model, num_stages=3, extra_args=("--device", args.device)) as pipe:
        pool = StandbyPool(pipe, 0, relays=True, impairment=imp, start_workers=1)
        try:
            t0 = time.monotonic()
            pool.start()
            window_s = config.heartbeat_interval_s * config.heartbeat_liveness
            specs = _specs(rng, 256, 12)
            reference = _reference(splitnet, pipe.endpoints, config, specs)  # direct links, no impairment
            tenants = _Tenants()
            tenants.start(args.tenants, args.seed, specs, pool.endpoints, config, history, None)
            while time.monotonic() < deadline and any(th.is_alive() for th in tenants.threads):
                time.sleep(0.5)
            hung = tenants.finish(timeout_s=240)
            cached, mean_batch = _cached_requests(splitnet, pool.endpoints, config)
        finally:
            pool.close()
    doc = _figures(model, specs, reference, tenants, [], history, hung, cached, pool, window_s, time.monotonic() - t0)
    doc["stage_mean_batch"] = mean_batch
    starts = [e for e in history.events if e.what == "recover_start"]
    doc["false_failovers"] = sum(1 for e in starts if e.kind == "StageUnavailable")
    doc["false_replacements"] = sum(1 for e in history.events if e.what == "recover_end" and (e.detail or {}).get("replaced"))
    doc["replays_without_failover"] = sum(1 for e in starts if e.kind != "StageUnavailable")
    doc["recovery_causes"] = [str(e.detail)[:200] for e in starts[:10]]
    doc["impairment"] = asdict(imp)
    doc["request_s"] = _percentiles([o.t_end - o.t_start for o in tenants.outcomes if not o.error])
    return doc


def _cached_requests(splitnet: Any, endpoints: list[str], config: Any) -> tuple[list[int | None], list[float | None]]:
    """Each live stage's cached requests once the tenants are gone (releases are asynchronous:
    asked again for a few seconds until every cache is released), and its mean batch (requests
    per forward) over its life: the live stages are the last replacements, so it covers the
    replays they took."""
    counts: list[int | None] = []
    infos: list[dict] = []
    with splitnet.connect(endpoints, config=config) as s:
        for _ in range(40):
            infos = s.refresh()
            counts = [info.get("cached_requests") for info in infos]
            if all(c == 0 for c in counts):
                break
            time.sleep(0.25)
    means = []
    for info in infos:
        st = info.get("stats") or {}
        means.append(round(st["batched_requests"] / st["batches"], 3) if st.get("batches") else None)
    return counts, means


def _during(fault: FaultRecord, t: float, window_s: float) -> bool:
    """Whether ``t`` falls in ``fault``: from its injection to its heal plus one window."""
    return fault.t_fault <= t <= (fault.t_heal or fault.t_fault) + window_s


def _replay_ratios(outcomes: list, history: History, specs: list, samples: dict | None = None,
                   impossible: "list | None" = None, window_s: float = 0.0) -> list[float]:
    """Per recovery of a one-sequence request: the time from its end to the tenant's next reply
    used (a resume of the stages' surviving caches, or a full replay of prompt + tokens so far),
    over a fresh prefill of as many tokens as the request held then (its prompt plus the tokens
    it had taken: what a client without recovery would prefill again), measured in the same
    campaign: the median time to first token of the fault-free one-sequence requests, by prompt
    length, interpolated between the nearest lengths measured and held at the ends.
    ``samples``, when given, gets what the ratios rest on: the fresh medians by prompt tokens,
    and each recovery's context tokens, seconds, fresh seconds, tenant, cause and forwards
    sent. Recoveries that start during a recovery-impossible fault (``impossible``: from its
    injection to its heal plus one window) are left out, as from ``detect_s`` and
    ``fault_to_token_s``: what they replay after is a link that came back, not a stage
    replaced; ``samples["left_out"]`` keeps them."""
    import bisect

    fresh: dict[int, list[float]] = {}
    for o in outcomes:
        if not o.error and o.replays == 0 and o.ttft_s and specs[o.spec].mode != "generate_many":
            fresh.setdefault(len(specs[o.spec].prompts[0]), []).append(o.ttft_s)
    if not fresh:
        return []
    xs = sorted(fresh)
    ys = [statistics.median(fresh[x]) for x in xs]
    if samples is not None:
        samples["fresh_ttft_s_by_prompt_tokens"] = {str(x): [round(y, 4), len(fresh[x])] for x, y in zip(xs, ys)}
        # the ratio's noise floor: each fresh request's own TTFT over the median it is compared with
        # (a replay is one sample against a median: a p90 of fresh / fresh above 1 is load, not recovery)
        floor = [t / ys[j] for j, x in enumerate(xs) for t in fresh[x]]
        samples["fresh_over_fresh_median"] = _percentiles(floor)
        samples["replays"] = []
        samples["left_out"] = []

    def fresh_s(n: int) -> float:
        if n <= xs[0]:
            return ys[0]
        if n >= xs[-1]:
            return ys[-1]
        k = next(j for j in range(len(xs)) if xs[j] >= n)
        if xs[k] == n:
            return ys[k]
        return ys[k - 1] + (ys[k] - ys[k - 1]) * (n - xs[k - 1]) / (xs[k] - xs[k - 1])

    ratios: list[float] = []
    kept: list = []  # (the lost stage's words in the cause, cause time, ratio) per ratio
    evs = history.events
    takes: dict[int, list[float]] = {}  # per tenant, the times of the replies it used (one token each: no drafts here)
    for e in evs:
        if e.what == "take":
            takes.setdefault(e.tenant, []).append(e.t)
    for times in takes.values():
        times.sort()
    for k, e in enumerate(evs):
        if e.what != "recover_end":
            continue
        own = next((o for o in outcomes if o.tenant == e.tenant and o.t_start <= e.t <= o.t_end), None)
        if own is None or specs[own.spec].mode == "generate_many":
            continue
        nxt_k = next((j for j in range(k + 1, len(evs)) if evs[j].tenant == e.tenant and evs[j].what in ("take", "recover_start")), None)
        if nxt_k is None or evs[nxt_k].what != "take":
            continue
        sent = sum(1 for x in evs[k + 1:nxt_k] if x.tenant == e.tenant and x.what == "send" and x.kind == "forward")
        if not sent:
            continue
        times = takes.get(e.tenant, [])
        taken = bisect.bisect_right(times, e.t) - bisect.bisect_left(times, own.t_start)
        context = len(specs[own.spec].prompts[0]) + taken
        cause = next((evs[j] for j in range(k - 1, -1, -1) if evs[j].tenant == e.tenant and evs[j].what == "recover_start"), None)
        t_cause = cause.t if cause is not None else e.t
        left_out = any(_during(f, t_cause, window_s) for f in impossible or [])
        replay_s, prefill_s = evs[nxt_k].t - e.t, fresh_s(context)
        detail = (cause.detail or "") if cause is not None else ""
        if not left_out:
            ratios.append(replay_s / prefill_s)
            kept.append(([w.rstrip(":") for w in detail.split()[:2]], t_cause, replay_s / prefill_s, context, replay_s))
        if samples is not None:
            trace = (evs[nxt_k].detail or {}).get("trace") or {}
            samples["left_out" if left_out else "replays"].append([context, round(replay_s, 4), round(prefill_s, 4), e.tenant,
                                                                   detail[:120], sent, trace.get("stage_queue_ms"),
                                                                   trace.get("stage_ahead"), trace.get("batch"), trace.get("stage_compute_ms"),
                                                                   trace.get("stage_tokens"), trace.get("stage_graph_captures"),
                                                                   _replay_timeline(evs, k, nxt_k, trace.get("stage_clock_s"))])
    if samples is not None:
        samples["by_requests_rebuilt_together"] = _by_requests_rebuilt_together(kept, window_s)
        samples["replays_with_together"] = [[n, [x[3], x[4]]] for n, x in zip(_together_counts(kept, window_s), kept)]
    return ratios


def _replay_timeline(evs: list, k: int, take_k: int, clocks: "list | None") -> "list[float] | None":
    """Where one replay's time went, in ms, from the recovery's end (``evs[k]``) to the reply
    used (``evs[take_k]``): to the client's first send, first to last send (fills before the
    step), then per stage the hop to it and its time held (received -> sent on), the hop back
    to the client, and the client's time from receiving the reply to using it. Needs the
    stages' clock stamps (``SPLITNET_TRACE_CLOCK=1``, one host); None without them."""
    if not clocks or any(not c for c in clocks):
        return None
    tenant, take = evs[k].tenant, evs[take_k]
    sends = [e.t for e in evs[k + 1:take_k] if e.tenant == tenant and e.what == "send" and e.kind == "forward"]
    recv = next((e.t for e in evs[k + 1:take_k + 1] if e.tenant == tenant and e.what == "recv" and e.req == take.req and e.seq == take.seq), take.t)
    if not sends:
        return None
    out, t = [sends[0] - evs[k].t, sends[-1] - sends[0]], sends[-1]
    for received, sent_on in clocks:
        out += [received - t, sent_on - received]
        t = sent_on
    out += [recv - t, take.t - recv]
    return [round(x * 1e3, 2) for x in out]


def _together_counts(kept: list, window_s: float) -> list[int]:
    """Per replay in ``kept``, how many replays (itself included) resumed from the same loss:
    the same stage named in the cause, recoveries started within one window of each other."""
    return [sum(1 for other in kept if other[0] == x[0] and abs(other[1] - x[1]) <= max(window_s, 0.5)) for x in kept]


def _burst_figures(burst, k: int, samples: dict) -> dict | None:
    """The restart baseline of ``k`` requests at once (:func:`_restart_burst`) and each replay
    of a loss that ``k`` requests resumed from over it: the time its first token would have
    taken had all of them started again (a line in the context's tokens, fitted to the burst;
    contexts past the burst's longest prompt are held there, as the fresh medians are)."""
    fit = _line(list(burst))
    if fit is None:
        return None
    a, b = fit
    longest = max(x for x, _ in burst)
    pairs = [cr for n, cr in samples.get("replays_with_together", []) if n == k]
    ratios = [replay_s / (a + b * min(context, longest)) for context, replay_s in pairs]
    return {"requests_at_once": k, "ttft_s": _percentiles([y for _, y in burst]), "fit_s": [round(a, 4), round(b, 6)],
            "replay_over_restart": _percentiles(ratios)}


def _by_requests_rebuilt_together(kept: list, window_s: float) -> dict:
    """The ratios by how many requests resumed from the same loss (the same stage, recoveries
    started within one window of each other): a replaced stage rebuilds the cache of every
    request it held, so with K of them it computes K contexts before the last resumes, while
    a fresh prefill (the ratio's denominator) is one request's."""
    groups: dict[int, list[float]] = {}
    for k, x in zip(_together_counts(kept, window_s), kept):
        groups.setdefault(k, []).append(x[2])
    return {str(k): _percentiles(v) for k, v in sorted(groups.items())}


def _figures(model, specs, reference, tenants, faults, history, hung, cached, pool, window_s, wall_s, burst=(), burst_k=0) -> dict:
    outcomes, sessions = tenants.outcomes, tenants.sessions
    replay_samples: dict = {}
    identical = lost = duplicated = typed = untyped = 0
    errors: list[str] = []
    unrecoverable = [f for f in faults if f.fired and f.kind == "cut_unrecoverable"]
    expected_errors, error_s = 0, []
    for o in outcomes:
        ref = reference[o.spec].tokens
        duplicated += o.duplicated
        if o.error:
            typed += int(o.typed)
            untyped += int(not o.typed)
            causes = [f"{e.kind}@{e.t - o.t_start:.2f}s" for e in history.events
                      if e.tenant == o.tenant and e.what == "recover_start" and o.t_start <= e.t <= o.t_end]
            errors.append(f"{o.error} [recoveries in this request: {', '.join(causes) or 'none'}]")
            owner = next((f for f in unrecoverable if _during(f, o.t_end, window_s)), None)
            if owner is not None and o.typed and "NoStandby" in o.error:  # ended by the refused replacement, nothing else
                expected_errors += 1
                error_s.append(o.t_end - max(owner.t_fault, o.t_start))
            continue
        if o.tokens == ref:
            identical += 1
        for got, arrived, want in zip(o.tokens or [], o.delivered, ref or []):
            lost += max(0, len(want) - len(got))
            duplicated += max(0, len(arrived) - len(got))
            if arrived[:len(got)] != got:
                lost += 1  # what arrived is not what the result says
    for f in unrecoverable:  # its requests must end in a typed error within 2 x the window
        errs = [o for o in outcomes if o.error and o.typed and "NoStandby" in o.error and _during(f, o.t_end, window_s)]
        worst = max((o.t_end - max(f.t_fault, o.t_start) for o in errs), default=None)
        # the window the sessions applied: the base, widened by each stage's round trips (a loaded host's are long)
        applied = max([window_s] + [e.window_s for e in history.since(f.t_fault) if e.what == "recover_start" and e.window_s
                                    and e.t <= (f.t_heal or f.t_fault) + 2 * window_s])
        f.outcome = (f"typed error after {worst:.2f} s (window applied {applied:.2f} s)" if worst is not None
                     else ("no failover" if not f.failovers else "recovered"))
        f.outcome_ok = worst is not None and worst <= 2 * applied
    checks = check_history(history.events)
    fired = [f for f in faults if f.fired]
    stop_short_ids = [f for f in fired if f.kind == "stop_short"]
    timed = [f for f in fired if f.kind not in ("stop_short", "cut_unrecoverable")]
    return {
        "model": model,
        "faults_injected": len(fired),
        "faults_by_kind": {k: sum(1 for f in fired if f.kind == k) for k in FAULT_KINDS},
        "fillers": sum(1 for f in fired if f.note.startswith("filler")),  # short freezes while the standbys warmed up (counted in faults_injected)
        "scheduled_injected": sum(1 for f in fired if not f.note.startswith("filler")),  # of the schedule's faults
        "requests": len(outcomes),
        "token_identical": identical,
        "lost": lost,
        "duplicated": duplicated,
        "typed_errors": typed,
        "typed_errors_expected": expected_errors,
        "typed_error_s": _percentiles(error_s),
        "untyped_errors": untyped,
        "errors": errors[:20],
        "false_failovers": sum(f.failovers > 0 for f in stop_short_ids),  # any recovery started (a replacement or a replay)
        "false_replacements": sum(f.outcome == "replaced" for f in stop_short_ids),
        "outcomes_ok": sum(1 for f in fired if f.outcome_ok),
        "outcomes_not_ok": [{"index": f.index, "kind": f.kind, "expected": f.expected, "outcome": f.outcome, "cause": f.first_cause[:160]}
                            for f in fired if f.outcome_ok is False],
        "detect_s": _percentiles([f.detect_s for f in timed if f.detect_s is not None]),
        "recover_s": _percentiles([f.recover_s for f in timed if f.recover_s is not None]),
        "fault_to_token_s": _percentiles([f.fault_to_token_s for f in timed if f.fault_to_token_s is not None]),
        "fault_to_token_by_kind": {k: _percentiles([f.fault_to_token_s for f in timed if f.kind == k and f.fault_to_token_s is not None])
                                   for k in FAULT_KINDS if any(f.kind == k for f in timed)},
        "fault_to_token_parts": _parts([f.breakdown for f in timed if f.breakdown]),
        "replay_over_prefill": _percentiles(_replay_ratios(outcomes, history, specs, replay_samples, unrecoverable, window_s)),
        "fresh_over_fresh_median": replay_samples.get("fresh_over_fresh_median"),  # the same ratio for fresh prefills: its noise floor
        "replay_over_prefill_by_requests_rebuilt_together": replay_samples.get("by_requests_rebuilt_together"),
        "restart_burst": _burst_figures(burst, burst_k, replay_samples),
        "replay_samples": replay_samples,  # per replay [context, replay s, fresh s, tenant, cause, forwards sent, and its reply's
        # queue ms / what ran ahead [rounds, compute ms, wait ms, send ms] / batch / compute ms / tokens computed / decode
        # graphs captured, at each stage, and the timeline of _replay_timeline]; fresh [median s, n] by prompt tokens
        "pending_max": max((v["pending_max"] or 0 for v in sessions.values()), default=None),
        "sessions": list(sessions.values()),
        "tenant_failures": [v["failed"] for v in sessions.values() if "failed" in v],
        "history": checks,
        "caches_left": cached,
        "hung_tenants": hung,
        "replacements": pool.replacements,
        "cold_start_s": _percentiles(pool.cold_start_s),
        "baseline_fault_free": {"requests": len(reference), "request_s": _percentiles([o.t_end - o.t_start for o in reference])},
        "window_s": window_s,
        "wall_s": round(wall_s, 1),
        "faults": [{k: v for k, v in asdict(f).items() if k not in ("t_fault", "t_heal")} for f in faults],
        "storms": _storms(fired, history, len(sessions) or 1),
    }


def _storms(fired: list, history: History, tenants: int, limit: int = 10) -> list[dict]:
    """Faults that started more recoveries than there are tenants (one each is what a loss
    should cost), with their recovery events: tenant, seconds after the fault, what, cause."""
    out = []
    for f in fired:
        if f.failovers <= tenants or len(out) >= limit:
            continue
        evs = [e for e in history.since(f.t_fault) if e.what in ("recover_start", "recover_end")][:4 * f.failovers]
        out.append({"index": f.index, "kind": f.kind, "stages": f.stages, "failovers": f.failovers,
                    "events": [[e.tenant, round(e.t - f.t_fault, 3), e.what, e.kind, str(e.detail)[:200]] for e in evs]})
    return out


# ---------------------------------------------------------------------- the suite --------------
def _schedule(rng: random.Random, n: int, quick: bool, only: "list[str] | None" = None) -> list[str]:
    if quick:
        return list(QUICK_SCHEDULE[:n])
    kinds = [k for k in WEIGHTS if not only or k in only]
    return rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds], k=n)


def check_device(device: str) -> dict:
    """``--device``: ``cpu`` or ``cuda[:N]`` with that GPU present, before any work; what the
    run records of it (the GPU's name and memory on CUDA)."""
    from splitnet.errors import ConfigError

    if device == "cpu":
        return {"device": "cpu"}
    head, _, index = device.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    k = int(index or 0)
    if k >= n:
        raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s); use --device cpu or a present index")
    props = torch.cuda.get_device_properties(k)
    return {"device": device, "gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}


def parse_kinds(text: str) -> list[str]:
    """``--kinds``: known fault kinds, in order, or a ConfigError naming the known ones."""
    from splitnet.errors import ConfigError

    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ConfigError(f"--kinds: unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}")
    return kinds


def _prepare_models(models: list[str]) -> None:
    """Resolve every model once, in this thread, before campaigns run in parallel threads:
    transformers' lazy imports are not safe when two threads trigger them at once (seen:
    ``cannot import name 'AutoConfig'``), and a built-in's files are written on first use."""
    from splitnet.model.loading import architecture_for, resolve_model_dir
    from splitnet.model.weights import read_config

    for m in models:
        architecture_for(read_config(resolve_model_dir(m)))


def run(args: argparse.Namespace) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from splitnet.edge.config import ClientConfig
    from splitnet.runtime.worker import TRACE_CLOCK_ENV

    os.environ.setdefault(TRACE_CLOCK_ENV, "1")  # the stages (one host) stamp their traces: each replay's timeline
    quick = bool(args.quick)
    n_faults = args.faults if not quick or args.faults != 200 else len(QUICK_SCHEDULE)
    models = ["tiny-gpt2"] if quick else [m for m in args.models.split(",") if m]
    if quick:
        args.tenants = min(args.tenants, 2)
    if args.impair and args.no_relays:
        from splitnet.errors import ConfigError

        raise ConfigError("--impair runs every link through a relay; drop --no-relays")
    if args.retire_delay_s < 0 or args.standby_refill_delay_s < 0:
        from splitnet.errors import ConfigError

        raise ConfigError("--retire-delay-s and --standby-refill-delay-s are seconds >= 0")
    only = parse_kinds(args.kinds)
    device = check_device(args.device)
    if only and args.no_relays and all(k in LINK_KINDS for k in only):
        from splitnet.errors import ConfigError

        raise ConfigError(f"--kinds {args.kinds} are link faults, which need relays; drop --no-relays")
    rng = random.Random(args.seed)
    kinds = [] if args.impair else _schedule(rng, n_faults, quick, only)
    cfg: dict[str, Any] = {"prefill_chunk_tokens": 8}
    if args.heartbeat_interval_s:
        cfg["heartbeat_interval_s"] = args.heartbeat_interval_s
    config = ClientConfig(**cfg)
    t0 = time.monotonic()
    deadline = t0 + args.time_budget_s
    per_model = [kinds[i::len(models)] for i in range(len(models))]
    seeds = [random.Random(rng.random()) for _ in models]
    if args.impair:
        models = models[:1]
        runs = [_impaired(models[0], seeds[0], args, deadline, config)]
    elif args.concurrent_models:
        _prepare_models(models)
        with ThreadPoolExecutor(max_workers=len(models)) as ex:
            runs = list(ex.map(lambda j: _campaign(models[j], per_model[j], seeds[j], args, deadline, config), range(len(models))))
    else:
        runs = []
        for j, (m, ks) in enumerate(zip(models, per_model)):  # each model gets its share of the time budget
            share = t0 + args.time_budget_s * (j + 1) / len(models)
            runs.append(_campaign(m, ks, seeds[j], args, min(share, deadline), config))
    total = {k: sum(r[k] for r in runs) for k in ("faults_injected", "requests", "token_identical", "lost", "duplicated", "typed_errors",
                                                  "typed_errors_expected", "untyped_errors", "false_failovers", "false_replacements", "fillers",
                                                  "scheduled_injected",
                                                  "replacements", "outcomes_ok")}
    hist = {k: sum(r["history"][k] for r in runs) for k in runs[0]["history"]}
    fired = [f for r in runs for f in r["faults"] if f["fired"]]
    timed = [f for f in fired if f["kind"] not in ("stop_short", "cut_unrecoverable")]
    unexpected_errors = total["typed_errors"] - total["typed_errors_expected"]
    ok = (total["lost"] == 0 and total["duplicated"] == 0 and total["untyped_errors"] == 0 and unexpected_errors == 0
          and total["token_identical"] == total["requests"] - total["typed_errors_expected"] and total["false_failovers"] == 0
          and hist["old_epoch_replies_used"] == 0 and hist["steps_taken_twice"] == 0 and hist["forwards_after_release"] == 0
          and all(all(c == 0 for c in r["caches_left"]) for r in runs) and not any(r["hung_tenants"] or r["tenant_failures"] for r in runs)
          and not any(r["outcomes_not_ok"] for r in runs))
    return {
        "config": {"quick": quick, "one_fault_per_request": bool(args.one_fault_per_request), "faults_requested": n_faults, "seed": args.seed, "models": models, "tenants": args.tenants, "kinds": only or list(FAULT_KINDS),
                   "stages": 3, "standbys_per_stage": args.standbys, "start_workers": args.start_workers, "standby_refill_delay_s": args.standby_refill_delay_s, "retire_delay_s": args.retire_delay_s, "relays": not args.no_relays,
                   "impair": args.impair, "concurrent_models": bool(args.concurrent_models), "time_budget_s": args.time_budget_s,
                   "cpus_usable": len(os.sched_getaffinity(0)), **device,
                   "client_config": {"heartbeat_interval_s": config.heartbeat_interval_s, "heartbeat_liveness": config.heartbeat_liveness, "max_rtt_slack_s": config.max_rtt_slack_s,
                                     "disconnect_grace_s": config.disconnect_grace_s, "compute_stall_s": config.compute_stall_s,
                                     "max_recoveries": config.max_recoveries, "prefill_chunk_tokens": config.prefill_chunk_tokens},
                   "schedule": kinds},
        **total,
        "typed_errors_unexpected": unexpected_errors,
        "history": hist,
        "detect_s": _percentiles([f["detect_s"] for f in timed if f["detect_s"] is not None]),
        "recover_s": _percentiles([f["recover_s"] for f in timed if f["recover_s"] is not None]),
        "fault_to_token_s": _percentiles([f["fault_to_token_s"] for f in timed if f["fault_to_token_s"] is not None]),
        "fault_to_token_by_kind": {k: _percentiles([f["fault_to_token_s"] for f in timed if f["kind"] == k and f["fault_to_token_s"] is not None])
                                   for k in FAULT_KINDS if any(f["kind"] == k for f in timed)},
        "fault_to_token_parts": _parts([f["breakdown"] for f in timed if f["breakdown"]]),
        "replay_over_prefill": {r["model"]: r["replay_over_prefill"] for r in runs},
        "fresh_over_fresh_median": {r["model"]: r["fresh_over_fresh_median"] for r in runs},
        "pending_max": max((r["pending_max"] or 0) for r in runs),
        "invariants_hold": ok,
        "wall_s": round(time.monotonic() - t0, 1),
        "runs": runs,
        "exit_code": 0 if ok else 1,
    }


def summarize(doc: dict) -> str:
    return (f"chaos: {doc['faults_injected']} faults ({doc['outcomes_ok']} with the expected outcome), {doc['requests']} requests, "
            f"{doc['token_identical']} token-identical, lost {doc['lost']}, duplicated {doc['duplicated']}, typed errors {doc['typed_errors']} "
            f"({doc['typed_errors_expected']} expected), untyped {doc['untyped_errors']}, false failovers {doc['false_failovers']}; "
            f"detect p50 {doc['detect_s']['p50']} s max {doc['detect_s']['max']} s; fault to token p50 {doc['fault_to_token_s']['p50']} s; "
            f"invariants {'hold' if doc['invariants_hold'] else 'VIOLATED'} ({doc['wall_s']} s)")
