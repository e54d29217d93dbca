"""Continuous batching in the stage worker (splitnet.runtime.worker + runtime.batching).

A worker is built in this process and fed rounds of work directly (so which requests share a
forward is known, not left to timing); its results come back over a real socket. Then real stage
processes: concurrent clients are batched and get the tokens they get alone."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import pytest
import torch
import zmq

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.errors import LimitExceeded
from splitnet.model import load_model
from splitnet.runtime.batching import BatchLimits, Member, pick_group, take_round
from splitnet.runtime.config import StageWorkerConfig
from splitnet.runtime.launcher import launch_pipeline
from splitnet.runtime.worker import StageWorker, _Work, cache_key
from splitnet.wire import Message, SocketConfig, decode_message, make_socket

pytestmark = pytest.mark.timeout(180)


class _Bench:
    """A worker of tiny-llama (whole model) run by hand, its results read from a ROUTER here."""

    def __init__(self, **config):
        self.worker = StageWorker(StageWorkerConfig(model="tiny-llama", start_block=0, end_block=load_model("tiny-llama").num_blocks, **config))
        self.ctx = zmq.Context.instance()
        self.inbox = make_socket(self.ctx, zmq.ROUTER, SocketConfig(), server=True)
        self.reply_to = f"tcp://127.0.0.1:{self.inbox.bind_to_random_port('tcp://127.0.0.1')}"
        self.peers: dict = {}
        self.backlog: deque = deque()

    def put(self, req: str, seq: int, ids: list[int], pos: int, want_result: bool = True) -> None:
        meta = {"cache": True, "pos": pos, "reply_to": self.reply_to, "head": "logits", "want_result": want_result}
        msg = Message(kind="forward", req=req, seq=seq, tensors={"input_ids": np.asarray([ids], dtype=np.int64)}, meta=meta)
        self.backlog.append(_Work(msg, 0, 0.0))

    def release(self, req: str) -> None:
        self.backlog.append(_Work(Message(kind="release", req=req), 0, 0.0))

    def round(self) -> None:
        self.worker._run_round(self.backlog, self.peers)

    def replies(self, n: int) -> dict[tuple[str, int], Message]:
        out = {}
        for _ in range(n):
            assert self.inbox.poll(10_000), "no reply within 10 s"
            msg = decode_message(self.inbox.recv_multipart()[1:])
            out[(msg.req, msg.seq)] = msg
        return out

    def close(self) -> None:
        for s in self.peers.values():
            s.close(linger=0)
        self.inbox.close(linger=0)


@pytest.fixture
def bench():
    b = _Bench()
    yield b
    b.close()


def _alone(prompt: list[int], step: int) -> torch.Tensor:
    full = load_model("tiny-llama").full()
    return full({"input_ids": torch.tensor([prompt + [step]])}, full.new_cache())["logits"][0]


def test_a_batch_member_failing_alone_and_the_others_unchanged(bench):
    prompts = {"a": [1, 2, 3, 4, 5], "b": [9, 8, 7], "c": [4, 4, 4, 4, 4, 4, 4]}
    for req, ids in prompts.items():
        bench.put(req, 0, ids, 0)
    bench.round()  # prefills of different lengths: one padded forward
    assert bench.worker.stats["ragged_batches"] == 1 and bench.worker.stats["batches"] == 1
    for req, msg in bench.replies(3).items():
        assert (torch.from_numpy(np.array(msg.tensors["logits"][0])) - _alone(prompts[req[0]][:-1], prompts[req[0]][-1])).abs().max() <= 1e-4
    bench.put("a", 1, [11], 5)
    bench.put("b", 1, [10**6], 3)  # outside the vocabulary: fails inside the batched forward
    bench.put("c", 1, [13], 7)
    bench.round()
    got = bench.replies(3)
    assert got[("b", 1)].kind == "error" and "outside the vocabulary" in got[("b", 1)].meta["msg"]
    for req, step in (("a", 11), ("c", 13)):
        msg = got[(req, 1)]
        assert msg.kind == "result", msg.meta
        assert (torch.from_numpy(np.array(msg.tensors["logits"][0])) - _alone(prompts[req], step)).abs().max() <= 1e-4
        assert msg.meta["trace"][0]["batch"] == 1  # the failed batch of 3 was retried one by one
    bench.put("a", 2, [12], 6)
    bench.put("c", 2, [14], 8)
    bench.round()
    got = bench.replies(2)
    assert all(m.meta["trace"][0]["batch"] == 2 for m in got.values())
    assert bench.worker.stats["max_batch"] == 3  # the prefill round


def test_one_step_per_request_per_round_in_arrival_order(bench):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    bench.put("x", 0, prompt[:4], 0)
    bench.put("x", 1, prompt[4:], 4)  # the next chunk of the same request waits a round
    bench.put("y", 0, [7, 7, 7, 7], 0)
    bench.round()
    first = bench.replies(2)
    assert set(first) == {("x", 0), ("y", 0)} and first[("x", 0)].meta["trace"][0]["batch"] == 2
    bench.round()
    second = bench.replies(1)
    full = load_model("tiny-llama").full()
    expected = full({"input_ids": torch.tensor([prompt])}, full.new_cache())["logits"][0]
    assert (torch.from_numpy(np.array(second[("x", 1)].tensors["logits"][0])) - expected).abs().max() <= 1e-4


def test_the_trace_says_what_ran_ahead_of_a_queued_step(bench):
    """A step queued behind another round's forward names that round in its trace (rounds,
    compute, straggler wait, sends), so a slow reply's queue time can be taken apart."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    bench.put("x", 0, prompt[:4], 0)
    bench.put("x", 1, prompt[4:], 4)  # the same request's next chunk: it waits a round
    for w in list(bench.backlog):  # through the worker's queue, as the I/O thread queues them
        assert bench.worker._enqueue(w, 1)
    bench.backlog.clear()
    bench.backlog.extend([bench.worker._take(None), bench.worker._take(None)])
    bench.round()
    bench.round()
    got = bench.replies(2)
    first, second = got[("x", 0)].meta["trace"][0], got[("x", 1)].meta["trace"][0]
    assert first["ahead_rounds"] == 0 and first["ahead_busy_ms"] == 0
    assert second["ahead_rounds"] == 1
    assert second["ahead_busy_ms"] == pytest.approx(first["compute_ms"], abs=1e-3)  # the round ahead was the first chunk's
    assert second["ahead_wait_ms"] == 0 and second["ahead_send_ms"] > 0  # no straggler wait by hand; the first reply was sent


def test_a_chunk_without_a_result_fills_the_cache_and_skips_the_head(bench):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    calls = []
    head = bench.worker.stage.head
    original = head.logits
    head.logits = lambda h: (calls.append(h.shape), original(h))[1]
    bench.put("x", 0, prompt[:5], 0, want_result=False)
    bench.round()
    assert not bench.inbox.poll(300) and calls == []  # no reply, no LM head
    bench.put("x", 1, prompt[5:], 5)
    bench.round()
    got = bench.replies(1)[("x", 1)]
    full = load_model("tiny-llama").full()
    expected = full({"input_ids": torch.tensor([prompt])}, full.new_cache())["logits"][0]
    assert (torch.from_numpy(np.array(got.tensors["logits"][0])) - expected).abs().max() <= 1e-4
    assert len(calls) == 1


def test_back_pressure_is_a_typed_limit_error():
    b = _Bench(max_requests=2)
    try:
        for req in ("p", "q", "r"):
            b.put(req, 0, [1, 2, 3], 0)
        b.round()
        got = b.replies(3)
        assert got[("r", 0)].kind == "error" and got[("r", 0)].meta["code"] == LimitExceeded.code
        assert "limit is 2" in got[("r", 0)].meta["msg"]
        assert got[("p", 0)].kind == got[("q", 0)].kind == "result"
        b.release("p")
        b.put("r", 1, [1, 2, 3], 0)  # a freed slot serves the next request
        b.round()
        assert b.replies(1)[("r", 1)].kind == "result"
    finally:
        b.close()


def test_take_round_and_pick_group_rules():
    items = deque([("a", "fwd"), ("a", "fwd2"), ("b", "rel"), ("c", "fwd"), ("b", "fwd"), ("d", "fwd")])
    releases, taken = take_round(items, key_of=lambda w: w[0], is_release=lambda w: w[1] == "rel", max_members=2)
    assert releases == [("b", "rel")] and taken == [("a", "fwd"), ("c", "fwd")]
    assert list(items) == [("a", "fwd2"), ("b", "fwd"), ("d", "fwd")]
    members = [Member(i, {}, None, str(i), sig, tok) for i, (sig, tok) in enumerate([("s", 3), ("t", 1), ("s", 2), ("s", 4)])]
    group, rest = pick_group(members, BatchLimits(max_batch_size=8, max_batch_tokens=6))
    assert [m.work for m in group] == [0, 2] and [m.work for m in rest] == [1, 3]
    # cached members (one sequence each) of different lengths stack while the padding stays within
    # max_padding of the real tokens, and the padded positions count against max_batch_tokens
    cached = [Member(i, {}, object(), str(i), "s", tok) for i, tok in enumerate([64, 40, 1, 48, 64])]
    group, rest = pick_group(cached, BatchLimits(max_batch_size=8, max_batch_tokens=4096, max_padding=0.5))
    assert [m.work for m in group] == [0, 1, 3, 4] and [m.work for m in rest] == [2]
    group, _ = pick_group(cached, BatchLimits(max_batch_size=8, max_batch_tokens=4096, max_padding=0))
    assert [m.work for m in group] == [0, 4]
    group, _ = pick_group(cached, BatchLimits(max_batch_size=8, max_batch_tokens=150, max_padding=0.5))
    assert [m.work for m in group] == [0, 1]


def test_concurrent_clients_are_batched_and_get_their_own_tokens(kill_leftovers):
    prompts = [[int(x) for x in np.random.default_rng(i).integers(0, 250, 6 + i)] for i in range(6)]
    with launch_pipeline("tiny-llama", [1]) as pipe:
        with splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=60)) as s:
            alone = [s.generate(p, 12).tokens for p in prompts]
            together = [r.tokens for r in s.generate_many(prompts, 12)]
        got: dict[int, list[int]] = {}
        sessions = [splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=60)) for _ in prompts]
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, sessions[i].generate(prompts[i], 12).tokens)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for s in sessions:
            s.close()
        with splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=60)) as s:
            stats = [info["stats"] for info in s.refresh()]
    assert together == alone
    assert [got[i] for i in range(len(prompts))] == alone
    assert all(st["max_batch"] > 1 for st in stats), stats


def test_a_later_stage_waits_for_the_whole_upstream_batch():
    b = _Bench()
    try:
        w = b.worker
        w.stage.embed, saved = None, w.stage.embed  # seen as a later stage (its inputs come from a stage)
        mark = [7, 3]
        items = deque(_Work(Message(kind="forward", req=r, meta={"upstream_batch": mark}), 0, 0.0) for r in ("a", "b"))
        assert not w._batch_complete(items)  # 2 of 3 members queued: wait
        items.append(_Work(Message(kind="forward", req="c", meta={"upstream_batch": mark}), 0, 0.0))
        assert w._batch_complete(items)
        assert w._batch_complete(deque([_Work(Message(kind="forward", req="x", meta={"upstream_batch": "junk"}), 0, 0.0)]))  # bad marks never wait
        w.stage.embed = saved
    finally:
        b.close()


def test_the_first_stage_waits_only_for_requests_it_expects():
    b = _Bench()
    try:
        w = b.worker
        items = deque(_Work(Message(kind="forward", req=r), 0, 0.0, origin="o") for r in ("a", "b"))
        keys = {r: cache_key("o", r) for r in ("a", "b", "c")}
        assert not w._batch_complete(items, {keys["a"], keys["b"], keys["c"]})  # c is due: wait for it
        assert w._batch_complete(items, {keys["a"], keys["b"]})  # everyone due is queued
        assert w._batch_complete(items, set())
    finally:
        b.close()


def test_a_release_cancels_the_steps_queued_before_it(bench):
    bench.put("gone", 0, [1, 2, 3], 0, want_result=False)
    bench.put("gone", 1, [4, 5], 3, want_result=False)
    bench.release("gone")
    bench.put("kept", 0, [1, 2, 3], 0)
    for w in bench.backlog:  # arrival order: the release came after both chunks of "gone"
        w.received_at = {"gone": 1.0, "kept": 3.0}[w.msg.req] + 0.1 * w.msg.seq
    bench.backlog[2].received_at = 2.0
    bench.round()
    bench.round()
    assert bench.replies(1)[("kept", 0)].kind == "result"
    assert bench.worker.stats["cancelled_steps"] == 2 and bench.worker.stats["forwards"] == 1
    assert not bench.worker.caches.caches.get(cache_key("", "gone"))


def test_a_step_of_an_older_epoch_is_refused_and_leaves_the_cache_alone(bench):
    bench.put("r", 0, [1, 2, 3], 0)
    bench.backlog[-1].msg = Message(kind="forward", req="r", seq=0, epoch=2, tensors=bench.backlog[-1].msg.tensors, meta=bench.backlog[-1].msg.meta)
    bench.round()
    assert bench.replies(1)[("r", 0)].kind == "result"
    bench.put("r", 1, [4], 3)  # epoch 0: sent before the client's recovery
    bench.round()
    err = bench.replies(1)[("r", 1)]
    assert err.kind == "error" and err.meta["code"] == "stale_epoch"
    assert bench.worker.caches.caches[cache_key("", "r")].length == 3


def test_heartbeats_report_compute_progress(bench):
    p = bench.worker.progress()
    assert set(p) >= {"forwards", "queued", "compute_tick_age_s"} and p["compute_tick_age_s"] >= 0


def test_cpu_pinning_options():
    import os

    from splitnet.errors import ConfigError
    from splitnet.runtime.cli_serve import parse_cpus
    from splitnet.runtime.launcher import disjoint_cpus

    cores = sorted(os.sched_getaffinity(0))
    assert parse_cpus(f"{cores[0]}") == (cores[0],)
    assert parse_cpus("") == ()
    with pytest.raises(ConfigError, match="outside"):
        parse_cpus("100000")
    with pytest.raises(ConfigError, match="look like"):
        parse_cpus("a-b")
    sets = disjoint_cpus(len(cores), 1)
    assert len(set(sets)) == len(cores)
    with pytest.raises(ConfigError, match="need"):
        disjoint_cpus(len(cores) + 1, 1)
