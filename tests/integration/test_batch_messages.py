"""Batch messages between real stage processes and the client (issue #16): one message per batch
from stage to stage, results batched per client, generate_many feeding its ready sequences as one
message. Tokens equal each sequence run alone; a member fails alone; replay works with batches;
a client cannot claim another origin through a batch; the one-message-per-member path (an older
peer) still works."""

from __future__ import annotations

import os
import queue

import numpy as np
import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.sampling import SamplingConfig
from splitnet.errors import UnknownRequest
from splitnet.model import load_model
from splitnet.runtime.config import StageWorkerConfig
from splitnet.runtime.launcher import launch_pipeline
from splitnet.runtime.worker import StageWorker
from splitnet.wire import Message, decode_message, encode_message
from splitnet.wire.batches import batch_message
from splitnet.wire.headers import BatchMember, ForwardHeader

pytestmark = pytest.mark.timeout(240)

CFG = ClientConfig(timeout_s=60)
FAST = ClientConfig(timeout_s=30, heartbeat_interval_s=0.3, heartbeat_liveness=3, prefill_chunk_tokens=8)
PROMPTS = [[int(x) for x in np.random.default_rng(i).integers(1, 250, 5 + 2 * i)] for i in range(5)]


def _batch_counts(session) -> list[tuple[int, int]]:
    return [(st["stats"]["batch_messages_in"], st["stats"]["batch_messages_out"]) for st in session.refresh()]


@pytest.fixture(scope="module")
def pipe():
    with launch_pipeline("tiny-gpt2", [2, 4]) as p:  # three stages: a batch crosses two cuts, then comes back as one result batch
        yield p


def test_generate_many_travels_as_batches_and_each_sequence_gets_its_tokens_alone(pipe):
    with splitnet.connect(pipe.endpoints, config=CFG) as s:
        assert s.batch_messages
        alone = [s.generate(p, 10).tokens for p in PROMPTS]
        before = _batch_counts(s)
        together = s.generate_many(PROMPTS, 10)
        after = _batch_counts(s)
    assert [r.tokens for r in together] == alone
    grew = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before)]
    assert all(n_in >= 8 for n_in, _ in grew), grew  # every stage took decode steps as batch messages, client included
    assert all(n_out >= 8 for _, n_out in grew), grew  # ... and sent them on as batches (the last: one result batch per step)
    assert all(r.stats["decode_wire_bytes"] > 0 for r in together)  # each step's share of the batch's bytes is counted


def test_sampled_sequences_are_unchanged_by_batching(pipe):
    sampling = SamplingConfig(temperature=1.0, top_k=20, seed=11)
    with splitnet.connect(pipe.endpoints, config=CFG) as s:
        alone = [s.generate(p, 8, sampling=sampling).tokens for p in PROMPTS[:3]]
        together = [r.tokens for r in s.generate_many(PROMPTS[:3], 8, sampling=sampling)]
    assert together == alone


def _logits_alone(s, prompt: list[int], token: int) -> np.ndarray:
    req = s.open_request()
    try:
        s.send_tokens(req, 0, prompt + [token], pos=0, want_result=True, rewind=False, all_logits=False, head={})
        _, msg, _ = s.wait_reply({(req, 0)})
        return np.array(msg.tensors["logits"])
    finally:
        s.release(req)


def test_a_member_at_a_wrong_position_fails_alone_and_the_others_complete(pipe):
    with splitnet.connect(pipe.endpoints, config=CFG) as s:
        reqs = [s.open_request() for _ in range(3)]
        for req, p in zip(reqs, PROMPTS):
            s.send_tokens(req, 0, p, pos=0, want_result=True, rewind=False, all_logits=False, head={})
        for req in reqs:
            s.wait_reply({(req, 0)})
        positions = [len(PROMPTS[0]), len(PROMPTS[1]) + 5, len(PROMPTS[2])]  # the middle one is wrong
        s.send_token_steps([(req, 1, 7, pos) for req, pos in zip(reqs, positions)], head={})
        got = {}
        for req in (reqs[0], reqs[2]):
            _, msg, _ = s.wait_reply({(req, 1)})
            got[req] = np.array(msg.tensors["logits"])
        with pytest.raises(UnknownRequest, match="position"):
            s.wait_reply({(reqs[1], 1)})
        for req in reqs:
            s.release(req)
        for req, p in ((reqs[0], PROMPTS[0]), (reqs[2], PROMPTS[2])):
            assert np.abs(got[req] - _logits_alone(s, p, 7)).max() <= 1e-4


def test_the_one_message_per_member_path_still_works_with_an_older_peer(pipe):
    """A stage that does not announce batch messages (an older release) is never sent one: the
    client sends each step alone, no stage sends a batch on, and the tokens are the same."""
    with splitnet.connect(pipe.endpoints, config=CFG) as probe:
        with splitnet.connect(pipe.endpoints, config=CFG) as s:
            expected = [r.tokens for r in s.generate_many(PROMPTS[:3], 8)]
            s._infos[2] = {k: v for k, v in s._infos[2].items() if k != "batch_messages"}  # as an older last stage answers info
            assert not s.batch_messages
            before = [(st["stats"]["batch_messages_in"], st["stats"]["batch_messages_out"], st["stats"]["batches"]) for st in probe.refresh()]
            got = [r.tokens for r in s.generate_many(PROMPTS[:3], 8)]
            after = [(st["stats"]["batch_messages_in"], st["stats"]["batch_messages_out"], st["stats"]["batches"]) for st in probe.refresh()]
    assert got == expected
    assert [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before)] == [(0, 0)] * 3
    assert all(a[2] > b[2] for a, b in zip(after, before))


def test_replay_after_a_killed_stage_with_batch_messages(kill_leftovers):
    prompts = ["def f(x):", "class Log:\n    def", "import os\nimport"]
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        with splitnet.connect(pipe.endpoints, config=FAST) as s:
            expected = [r.tokens for r in s.generate_many(prompts, 10)]
        with splitnet.connect(pipe.endpoints, config=FAST, recovery=pipe.respawn_stage) as s:
            assert s.batch_messages
            seen: list[tuple[int, int]] = []

            def on_token(i: int, tok: int) -> None:
                seen.append((i, tok))
                if len(seen) == 12:
                    pipe.kill_stage(1)

            results = s.generate_many(prompts, 10, on_token=on_token)
            assert [r.tokens for r in results] == expected
            assert len(seen) == 30, "a token was produced twice or lost"
            assert len(s.recoveries) == 1 and s.recoveries[0]["replaced"] == [1]
            counts = _batch_counts(s)
    assert counts[1][0] > 0 and counts[2][0] > 0, counts  # the new stage 1 took batches after the replay, and the last stage too


# ------------------------------------------------------------------ origins -----------------------
STAGE_KEY = "rq:rAELpZqL*+#Vn!9sGhf7:Wr>I&sS*5Hx^/N6w"
VICTIM = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
ATTACKER = "D:)Q[IlAW!ahhC2ac:9*A}h:p?([4%wOTJ%JR%cs"


class _Router:
    """Records what a stage would answer on its ROUTER."""

    def __init__(self):
        self.sent: list[Message] = []

    def send_multipart(self, frames, copy=False):
        self.sent.append(decode_message([bytes(getattr(f, "buffer", f)) for f in frames[1:]]))


@pytest.fixture(scope="module")
def worker():
    w = StageWorker(StageWorkerConfig(model="tiny-llama", start_block=0, end_block=load_model("tiny-llama").num_blocks))
    w._stage_keys = {STAGE_KEY.encode()}  # as --stage-keys-dir lists it
    return w


def _claiming(origin: str | None, n: int = 2) -> Message:
    members = [BatchMember(f"r{i}", 0, 0, 1, header=ForwardHeader(reply_to="peer:" + "cd" * 16, cache=True, pos=0, origin=origin)) for i in range(n)]
    return decode_message([bytes(f) for f in encode_message(batch_message("forward_batch", members, {"input_ids": np.ones((n, 1), np.int64)}))])


def test_a_client_cannot_claim_another_origin_through_a_batch(worker):
    router = _Router()
    worker._queue_batch(router, b"attacker", _claiming(VICTIM), ATTACKER, 100)
    items = worker._take(None)
    assert [w.origin for w in items] == [ATTACKER, ATTACKER]  # a client speaks for itself only, member by member
    worker._queue_batch(router, b"stage0", _claiming(VICTIM), STAGE_KEY, 100)
    assert [w.origin for w in worker._take(None)] == [VICTIM, VICTIM]  # a trusted stage vouches for its members
    worker._queue_batch(router, b"stage0", _claiming(None), STAGE_KEY, 100)
    assert [w.origin for w in worker._take(None)] == [STAGE_KEY, STAGE_KEY]  # nothing vouched: the sender's own key
    assert sum(w.wire_bytes for w in items) == 100 and not router.sent
    with pytest.raises(queue.Empty):
        worker._take(None)


def test_a_malformed_batch_is_refused_whole_before_any_work(worker):
    router = _Router()
    msg = _claiming(None)
    bad = Message(msg.kind, msg.req, msg.seq, msg.epoch, {"input_ids": np.ones((3, 1), np.int64)}, msg.meta)  # 3 rows for 2 members
    worker._queue_batch(router, b"x", bad, ATTACKER, 10)
    assert [m.kind for m in router.sent] == ["error"] and router.sent[0].meta["code"] == "protocol"
    with pytest.raises(queue.Empty):
        worker._take(None)


def test_curve_stages_send_batch_results_only_to_the_origin_that_sent_them(kill_leftovers):
    """On CurveZMQ: an insider's batch claiming the victim's origin is computed as the insider's own
    (its results come back over the insider's connection to the last stage, which the stage
    would refuse to use for anyone else's results)."""
    from splitnet.bench.attacks import HostileLab
    from splitnet.wire.security import load_public_key

    lab = HostileLab("curvezmq")
    try:
        victim = load_public_key(lab.key("victim").removesuffix("_secret")).decode()
        stage1 = load_public_key(str(lab.dir / "stage1.key")).decode()
        rid = os.urandom(16).hex().encode()  # a client's routing id: hex digits, named in reply_to
        s0, s1 = lab.raw_socket(0, "insider", routing_id=rid), lab.raw_socket(1, "insider", routing_id=rid)
        try:
            s1.send_multipart(encode_message(Message(kind="ping", req="hello")))  # the last stage learns who holds the id
            assert s1.poll(5000)
            s1.recv_multipart()
            from splitnet.edge.sdk import _has_parameter

            inputs = lab.tokenizer(["a hostile peer"], max_length=8, **({"numpy": True} if _has_parameter(lab.tokenizer, "numpy") else {}))
            tensors = {k: np.repeat(np.asarray(v), 2, axis=0) for k, v in inputs.items()}
            members = [BatchMember(f"h{i}", 0, 0, 1, header=ForwardHeader(reply_to="peer:" + rid.decode(), route=(lab.endpoints[1],), route_keys=(stage1,), origin=victim,
                                                                          batch_messages=True)) for i in range(2)]
            s0.send_multipart(encode_message(batch_message("forward_batch", members, tensors)))
            got: list[Message] = []
            while sum(len(m.meta.get("members", [1])) for m in got) < 2 and s1.poll(10_000):
                msg = decode_message(s1.recv_multipart())
                if msg.kind == "ping":  # the stage asks who holds the connection before it sends a result
                    s1.send_multipart(encode_message(Message(kind="pong", req=msg.req, seq=msg.seq)))
                    continue
                got.append(msg)
        finally:
            s0.close(linger=0)
            s1.close(linger=0)
        assert [m.kind for m in got] in (["result_batch"], ["result", "result"]), [(m.kind, m.meta) for m in got]
        assert lab.stage_info(1)["stats"]["replies_refused"] == 0  # delivered as the insider's own, never held back as another's
        assert lab.stages_alive() and lab.legit_client_ok()
    finally:
        lab.close()


def test_a_later_stage_waits_for_no_straggler_of_a_batch_that_came_whole(worker):
    from collections import deque

    router = _Router()
    worker.stage.embed, saved = None, worker.stage.embed  # seen as a later stage (its inputs come from a stage)
    try:
        worker._queue_batch(router, b"stage0", _claiming(None), STAGE_KEY, 100)
        assert worker._batch_complete(deque(worker._take(None)))  # all its members are here: nothing to wait for

        def part(first: int) -> Message:  # one of two messages of a batch of 4 too large for one (marked, as a stage marks it)
            members = [BatchMember(f"s{i}", 0, 0, 1, header=ForwardHeader(reply_to="peer:" + "cd" * 16, upstream_batch=(9, 4))) for i in range(first, first + 2)]
            return decode_message([bytes(f) for f in encode_message(batch_message("forward_batch", members, {"input_ids": np.ones((2, 1), np.int64)}))])

        backlog: deque = deque()
        worker._queue_batch(router, b"stage0", part(0), STAGE_KEY, 100)
        backlog.extend(worker._take(None))
        assert not worker._batch_complete(backlog)  # 2 of the 4 sent this way: the rest is coming
        worker._queue_batch(router, b"stage0", part(2), STAGE_KEY, 100)
        backlog.extend(worker._take(None))
        assert worker._batch_complete(backlog)
    finally:
        worker.stage.embed = saved


def test_infer_returns_the_head_at_every_position_as_asked(pipe):
    from splitnet.errors import ConfigError

    ids = np.asarray([PROMPTS[1]], dtype=np.int64)
    with splitnet.connect(pipe.endpoints, config=CFG) as s:
        logits = s.infer({"input_ids": ids}, all_logits=True)["logits"]
        argmax = s.infer({"input_ids": ids}, all_logits=True, head="argmax")["argmax"]
        top = s.infer({"input_ids": ids}, head="topk", top_k=3)
        with pytest.raises(ConfigError, match="top_k"):
            s.infer({"input_ids": ids}, head="topk")
    assert logits.shape[:2] == ids.shape and argmax.shape == ids.shape
    assert (argmax == logits.argmax(-1)).all()
    assert top["topk_indices"].shape[-1] == 3 and (top["topk_indices"][..., 0] == logits[:, -1].argmax(-1)).all()


def test_queue_depth_counts_the_members_of_a_batch():
    """Back-pressure counts steps, not messages: a batch of 4 members into a stage whose queue takes
    3 is refused, every member with a typed LimitExceeded, and nothing is queued; a batch of 3 fits,
    and then one more forward is refused."""
    w = StageWorker(StageWorkerConfig(model="tiny-llama", start_block=0, end_block=load_model("tiny-llama").num_blocks, queue_depth=3))
    router = _Router()
    w._queue_batch(router, b"c", _claiming(None, n=4), ATTACKER, 100)
    assert [(m.kind, m.meta.get("code")) for m in router.sent] == [("error", "limit")] * 4
    assert w.info()["queue_depth"] == 0
    with pytest.raises(queue.Empty):
        w._take(None)
    router.sent.clear()
    w._queue_batch(router, b"c", _claiming(None, n=3), ATTACKER, 100)
    assert not router.sent and w.info()["queue_depth"] == 3
    assert not w._enqueue(object(), 1)  # full: one more step is refused
    assert len(w._take(None)) == 3 and w.info()["queue_depth"] == 0
