"""CPU cost of one batched decode round, per member and per round, part by part (issue #16).

What runs: two real :class:`~splitnet.runtime.worker.StageWorker` s (``tiny-llama``, blocks
0-3 and 3-6, on the CPU), each in threads of this process (their own ``run()``: the I/O thread
on a real ROUTER bound to ``tcp://127.0.0.1:0``, the compute thread with its DEALERs), and a
real :class:`~splitnet.edge.sdk.Session` from :func:`splitnet.connect` in the main thread
driving N one-token prompts with ``generate_many`` (greedy: the last stage reduces to argmax).
Every message is a real one (``encode_message``/``decode_message``, real headers, real
``forward_batch``/``result_batch`` over real sockets). The model's transformer forward is
replaced by a stand-in: each stage's ``_run_shell`` returns zeros of the right shape, so the
stage still runs its input checks, token-id copy, slot-cache view, masks, cache advance and
LM head (tiny), but no attention or MLP.

Time is ``time.thread_time()`` (CPU time of the calling thread: not wall time, so the load of
other processes on a shared machine and blocking waits are not counted), taken by wrappers
around the real methods:

- ``io_recv_split_queue``: the stage's I/O thread ``_handle`` of a ``forward_batch`` (decode,
  split, header checks, origins, queue);
- ``prepare_group``: the compute thread's ``_run_round`` minus the three parts below
  (cancelled-step scan, round pick, ``_prepare`` per member, group pick, rhythm/ledger/metrics
  bookkeeping, cache checks, ``_finish``);
- ``forward_standin``: ``_forward_members`` with the stand-in forward (what remains is the
  stage's own Python around the model, kept apart since on the GPU graphs replace part of it);
- ``to_host``: ``_to_host``; ``send``: ``_send_on`` (traces, headers, batch message, encode,
  socket send);
- client: ``deliver`` (the links' handling of a ``result_batch``: decode, split, reply store),
  ``accept`` (``SequenceState.accept``: stats and sampling, for all members), ``build_send``
  (``send_token_steps``: headers, batch message, encode, send), and ``client_round`` = all CPU
  of the client thread from one ``send_token_steps`` to the next (poll loop included).

N=1 takes the one-message path (``generate_many`` of one sequence sends plain ``forward``s).
Reported: the median over rounds whose batch held all N members, in us per round and per member.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch_round_overhead.py --sizes 1,8,32,64 --rounds 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

import splitnet
from splitnet.edge import generation
from splitnet.edge.config import ClientConfig
from splitnet.runtime.config import StageWorkerConfig
from splitnet.runtime.worker import StageWorker

STAGE_PARTS = ("io_recv_split_queue", "prepare_group", "forward_standin", "to_host", "send")
CLIENT_PARTS = ("deliver", "accept", "build_send", "client_round")


def _standin_shell(stage) -> None:
    hidden = stage.arch.hf.hidden_size

    def run_shell(device, **kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        return SimpleNamespace(last_hidden_state=torch.zeros(x.shape[0], x.shape[1], hidden, device=device))

    stage.__dict__["_run_shell"] = run_shell


class _StageClock:
    """thread_time of a worker's methods, one record per round (a forward_batch handled, a round run)."""

    def __init__(self, w: StageWorker):
        self.rounds: list[dict] = []
        self.io: list[tuple[float, int]] = []
        self._cur: dict = {}
        self._wrap_io(w)
        for name in ("_forward_members", "_to_host", "_send_on"):
            self._wrap_part(w, name)
        inner = w._run_round

        def run_round(backlog, peers):
            self._cur = defaultdict(float)
            n0 = w.stats["batched_requests"]
            t = time.thread_time()
            inner(backlog, peers)
            total = time.thread_time() - t
            c = self._cur
            c["prepare_group"] = total - c["_forward_members"] - c["_to_host"] - c["_send_on"]
            c["members"] = w.stats["batched_requests"] - n0
            self.rounds.append(dict(c))

        w._run_round = run_round

    def _wrap_part(self, w: StageWorker, name: str) -> None:
        inner = getattr(w, name)

        def timed(*a, **k):
            t = time.thread_time()
            try:
                return inner(*a, **k)
            finally:
                self._cur[name] += time.thread_time() - t

        setattr(w, name, timed)

    def _wrap_io(self, w: StageWorker) -> None:
        inner = w._handle

        def handle(router, frames, dropped=0):
            before = w.stats["batch_messages_in"], w.work.qsize()
            t = time.thread_time()
            inner(router, frames, dropped)
            dt = time.thread_time() - t
            if w.stats["batch_messages_in"] != before[0]:
                self.io.append((dt, 1))  # a forward_batch: one round's steps
            elif w.work.qsize() > before[1]:
                self.io.append((dt, 0))  # one forward (or release) of its own

        w._handle = handle


class _ClientClock:
    def __init__(self, session):
        self.rounds: list[dict] = []
        self._cur: dict = defaultdict(float)
        self._round_start: float | None = None
        links = session.links
        inner_deliver = links._deliver

        def deliver(stage, body, decoded=None):
            if decoded is not None:
                return inner_deliver(stage, body, decoded)
            t = time.thread_time()
            try:
                return inner_deliver(stage, body, decoded)
            finally:
                self._cur["deliver"] += time.thread_time() - t

        links._deliver = deliver
        inner_send = session.send_token_steps

        def send_token_steps(steps, *, head):
            t = time.thread_time()
            if self._round_start is not None:
                self._cur["client_round"] = t - self._round_start
                self._cur["members"] = len(steps)
                self.rounds.append(dict(self._cur))
            self._cur = defaultdict(float)
            self._round_start = t
            out = inner_send(steps, head=head)
            self._cur["build_send"] += time.thread_time() - t
            return out

        session.send_token_steps = send_token_steps
        inner_accept = generation.SequenceState.accept
        clock = self

        def accept(self_, msg, t0, received):
            t = time.thread_time()
            try:
                return inner_accept(self_, msg, t0, received)
            finally:
                clock._cur["accept"] += time.thread_time() - t

        self._restore = (generation.SequenceState, inner_accept)
        generation.SequenceState.accept = accept

    def close(self) -> None:
        cls, fn = self._restore
        cls.accept = fn


def _start(cfg: StageWorkerConfig) -> tuple[StageWorker, threading.Thread]:
    w = StageWorker(cfg)
    _standin_shell(w.stage)
    t = threading.Thread(target=w.run, name=f"stage{cfg.stage_index}-io", daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not w.endpoint and time.monotonic() < deadline:
        time.sleep(0.01)
    return w, t


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def measure(n: int, rounds: int, warmup: int) -> dict:
    common = dict(model="tiny-llama", max_batch_size=max(64, n), batch_wait_ms=20.0, cuda_graphs=False)
    w0, t0 = _start(StageWorkerConfig(start_block=0, end_block=3, stage_index=0, **common))
    w1, t1 = _start(StageWorkerConfig(start_block=3, end_block=6, stage_index=1, **common))
    clocks = [_StageClock(w0), _StageClock(w1)]
    try:
        with splitnet.connect([w0.endpoint, w1.endpoint], config=ClientConfig(timeout_s=60)) as s:
            cc = _ClientClock(s)
            try:
                prompts = [[1 + (i % 250)] for i in range(n)]  # one token: every step is a one-token decode step
                s.generate_many(prompts, warmup + rounds)
            finally:
                cc.close()
    finally:
        for w in (w0, w1):
            w.stop()
        t0.join(5)
        t1.join(5)
    out: dict = {"members": n, "stages": []}
    for i, c in enumerate(clocks):
        full = [r for r in c.rounds if r.get("members") == n][warmup:]
        io_round = [dt for dt, batch in c.io if batch == (1 if n > 1 else 0)][warmup:]  # one forward_batch per round (N=1: one forward)
        parts = {
            "io_recv_split_queue": _median(io_round),
            "prepare_group": _median([r["prepare_group"] for r in full]),
            "forward_standin": _median([r.get("_forward_members", 0.0) for r in full]),
            "to_host": _median([r.get("_to_host", 0.0) for r in full]),
            "send": _median([r.get("_send_on", 0.0) for r in full]),
        }
        out["stages"].append({"stage": i, "rounds_used": len(full), "io_messages_used": len(io_round),
                              "per_round_us": {k: round(v * 1e6, 1) for k, v in parts.items()},
                              "per_member_us": {k: round(v * 1e6 / n, 2) for k, v in parts.items()},
                              "python_per_round_us": round(sum(v for k, v in parts.items() if k != "forward_standin") * 1e6, 1)})
    full = [r for r in cc.rounds if r.get("members") == n][warmup:]
    if n > 1:
        cparts = {k: _median([r.get(k, 0.0) for r in full]) for k in CLIENT_PARTS}
        out["client"] = {"rounds_used": len(full), "per_round_us": {k: round(v * 1e6, 1) for k, v in cparts.items()},
                         "per_member_us": {k: round(v * 1e6 / n, 2) for k, v in cparts.items()}}
    else:
        out["client"] = {"note": "one sequence takes the one-message path (no send_token_steps): client parts not split"}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=60, help="measured decode rounds per size")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        r = measure(n, args.rounds, args.warmup)
        results.append(r)
        c = r["client"].get("per_member_us", {})
        print(f"N={n}: " + " | ".join(
            f"stage {st['stage']} python {st['python_per_round_us']:.0f} us/round ({st['python_per_round_us'] / n:.1f}/member) "
            + " ".join(f"{k}={v:.1f}" for k, v in st["per_member_us"].items()) for st in r["stages"])
              + (" | client/member " + " ".join(f"{k}={v:.1f}" for k, v in c.items()) if c else ""), flush=True)
    doc = {"bench": "batch_round_overhead", "command": " ".join([sys.executable, *sys.argv]), "results": results,
           "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
                           "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "clock": "time.thread_time (CPU time per thread), medians over rounds"}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
