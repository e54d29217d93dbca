"""Real stage processes on random 127.0.0.1 ports, driven through the SDK."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.sampling import SamplingConfig
from splitnet.errors import PlanMismatch, ProtocolError, StageUnavailable, UnknownRequest
from splitnet.model import load_model
from splitnet.runtime.launcher import launch_pipeline
from splitnet.wire import Message, decode_message, encode_message

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def minilm_pipe():
    with launch_pipeline("minilm", [2, 4]) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def gpt_pipe():
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        yield pipe


def test_stages_are_distinct_processes(minilm_pipe):
    import os

    assert len(set(minilm_pipe.pids)) == 3 and os.getpid() not in minilm_pipe.pids
    with splitnet.connect(minilm_pipe.endpoints) as s:
        assert [tuple(x["blocks"]) for x in s.stages] == [(0, 2), (2, 4), (4, 6)]
        assert [x["pid"] for x in s.stages] == minilm_pipe.pids


def test_minilm_split_equals_unsplit(minilm_pipe):
    texts = ["hello world", "edge devices send features to the cloud", "x"]
    with splitnet.connect(minilm_pipe.endpoints, timeout_s=30) as s:
        out = s.infer({"text": texts})["embedding"]
        stats = s.last_stats
    bm = load_model("minilm")
    ref = bm.full()(bm.tokenize(texts))["embedding"].numpy()
    assert np.abs(out - ref).max() <= 1e-4
    # two cuts of (3, T, 384) fp32 hidden states plus headers
    T = bm.tokenize(texts)["input_ids"].shape[1]
    assert all(b > 3 * T * 384 * 4 for b in stats["cut_bytes"])
    assert [t["stage"] for t in stats["trace"]] == [0, 1, 2]


@pytest.mark.parametrize("reply_via", ["connection", "bind"])
def test_results_come_back_either_way(minilm_pipe, reply_via):
    """Default: over the client's own connection to the last stage (no port bound on the client,
    so it works behind NAT); "bind": the last stage connects back to an endpoint the client binds."""
    with splitnet.connect(minilm_pipe.endpoints, config=ClientConfig(timeout_s=30, reply_via=reply_via)) as s:
        assert s.reply_to.startswith("peer:" if reply_via == "connection" else "tcp://127.0.0.1:")
        assert s.links.binds_results == (reply_via == "bind")
        out = s.infer({"text": ["results find their way home"]})["embedding"]
        assert out.shape == (1, 384) and s.last_stats["result_bytes"] > 384 * 4
        assert len(s.ping()) == 3


def test_a_result_for_an_unknown_peer_is_dropped_and_the_stage_serves_on(minilm_pipe):
    """A forward whose reply_to names a routing id nobody connected with: the last stage drops the
    result (nothing to send it to) and keeps serving."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(minilm_pipe.endpoints[0])
    try:
        ids = np.array([[101, 7592, 102]], dtype=np.int64)
        msg = Message(kind="forward", req="ghost", tensors={"input_ids": ids, "attention_mask": np.ones_like(ids)},
                      meta={"route": minilm_pipe.endpoints[1:], "reply_to": "peer:" + "ab" * 16, "cache": False})
        sock.send_multipart(encode_message(msg))
        time.sleep(0.5)
        with splitnet.connect(minilm_pipe.endpoints, timeout_s=30) as s:
            assert s.infer({"text": ["still serving"]})["embedding"].shape == (1, 384)
    finally:
        sock.close(linger=0)


def test_generate_matches_unsplit_greedy_and_uses_kv_cache(gpt_pipe):
    prompt = list(b"import os\nprint(")
    bm = load_model("tiny-gpt2")
    full = bm.full()
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(full({"input_ids": torch.tensor([ids])})["logits"].argmax(-1)))
    config = ClientConfig(timeout_s=30, prefill_chunk_tokens=5)  # 16-token prompt in 4 chunks
    with splitnet.connect(gpt_pipe.endpoints, config=config) as s:
        res = s.generate(prompt, 12)
    assert res.tokens == ids[len(prompt):]
    assert res.stats["tokens_computed"] == [len(prompt) + 11] * 3


def test_stream_and_seeded_sampling(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, timeout_s=30) as s:
        events = list(s.stream("abc", 6))
        result = s.generate("abc", 6)
        assert [e.token for e in events[:-1]] == result.tokens and events[-1].tokens == result.tokens
        assert [e.offset for e in events[:-1]] == list(range(6)) and "".join(e.text for e in events[:-1]) == result.text
        a = s.generate("abc", 8, sampling=SamplingConfig(temperature=1.5, top_k=50, seed=7)).tokens
        b = s.generate("abc", 8, sampling=SamplingConfig(temperature=1.5, top_k=50, seed=7)).tokens
        c = s.generate("abc", 8, sampling=SamplingConfig(temperature=1.5, top_k=50, seed=8)).tokens
    assert a == b and a != c


def test_generate_many_equals_one_at_a_time(gpt_pipe):
    prompts = ["first prompt", "second, longer prompt", "3"]
    with splitnet.connect(gpt_pipe.endpoints, timeout_s=30) as s:
        together = s.generate_many(prompts, 6)
        alone = [s.generate(p, 6).tokens for p in prompts]
    assert [r.tokens for r in together] == alone
    assert [r.text for r in together] == [s.tokenizer.decode(t) for t in alone] and {r.finish_reason for r in together} == {"length"}


def test_decode_step_without_prefill_is_a_typed_error(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, timeout_s=10) as s:
        s._send_forward("nosuchreq", 0, {"input_ids": np.array([[1]])}, {"cache": True, "pos": 5})
        with pytest.raises(UnknownRequest, match="position 5"):
            s._wait_any({("nosuchreq", 0)})
        assert UnknownRequest.code == "unknown_request"


def test_bad_messages_get_typed_errors_and_worker_keeps_serving(minilm_pipe):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(minilm_pipe.endpoints[1])
    try:
        bad = [
            [b"\x93\x01\x02"],  # msgpack array, not a map
            [msgpack.packb({"v": 42, "kind": "forward", "req": "", "seq": 0, "epoch": 0, "tensors": []})],
            [bytes(f) for f in encode_message(Message(kind="forward", tensors={"h": np.zeros(4, np.float32)}))][:1],
            [bytes(f) for f in encode_message(Message(kind="forward", meta={"reply_to": "tcp://127.0.0.1:1"}, tensors={}))][:1] + [b"x"],
            [bytes(f) for f in encode_message(Message(kind="forward", meta={}))],  # no reply_to
            [bytes(f) for f in encode_message(Message(kind="result"))],
        ]
        for frames in bad:
            sock.send_multipart(frames)
            assert sock.poll(5000), "worker did not answer a bad message"
            reply = decode_message(sock.recv_multipart())
            assert reply.kind == "error" and reply.meta["code"] in ("protocol", "limit"), reply.meta
    finally:
        sock.close()
    with splitnet.connect(minilm_pipe.endpoints, timeout_s=30) as s:
        assert s.infer({"text": ["still serving"]})["embedding"].shape == (1, 384)
    assert ProtocolError.code == "protocol"


def test_wrong_stage_order_is_a_plan_mismatch(minilm_pipe):
    eps = minilm_pipe.endpoints
    with pytest.raises(PlanMismatch, match="start at block"):
        splitnet.connect([eps[1], eps[0], eps[2]])
    with pytest.raises(PlanMismatch, match="must end at the head"):
        splitnet.connect(eps[:2])


def test_connect_to_nothing_raises_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(StageUnavailable, match="no answer"):
        splitnet.connect(["tcp://127.0.0.1:1"], config=ClientConfig(connect_timeout_s=1.0))
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("victim", [1, pytest.param(2, marks=pytest.mark.slow)])  # the last stage too, in the slow suite (CI time)
def test_killed_stage_raises_stage_unavailable(kill_leftovers, victim):
    config = ClientConfig(timeout_s=20, heartbeat_interval_s=0.3, heartbeat_liveness=3)
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        with splitnet.connect(pipe.endpoints, config=config) as s:
            assert len(s.generate("warm", 2).tokens) == 2
            gen = s.stream("a prompt that keeps going", 1000)
            next(gen)
            pipe.kill_stage(victim)
            t0 = time.monotonic()
            with pytest.raises(StageUnavailable) as info:
                for _ in gen:
                    pass
            waited = time.monotonic() - t0
    assert waited < config.timeout_s
    assert f"stage {victim}" in str(info.value) or "stage" in str(info.value)


def test_killed_stage_during_infer(kill_leftovers):
    config = ClientConfig(timeout_s=15, heartbeat_interval_s=0.3, heartbeat_liveness=3)
    with launch_pipeline("minilm", [3]) as pipe:
        with splitnet.connect(pipe.endpoints, config=config) as s:
            s.infer({"text": ["ok"]})
            pipe.kill_stage(1)
            t0 = time.monotonic()
            with pytest.raises(StageUnavailable):
                s.infer({"text": ["the second stage is gone"]})
            assert time.monotonic() - t0 < config.timeout_s


def test_connect_from_plan_file_checks_model_hash(minilm_pipe, tmp_path):
    import yaml

    from splitnet.model import load_model as _load

    fp = _load("minilm", blocks=[0]).fingerprint()
    plan = {  # the smallest plan the one validated reader takes: three stages, raw cuts
        "version": 1,
        "model": "minilm",
        "model_hash": fp,
        "num_blocks": 6,
        "stages": [{"index": i, "blocks": list(b), "device": f"host{i}", "endpoint": ep} for i, (b, ep) in enumerate(zip([(0, 2), (2, 4), (4, 6)], minilm_pipe.endpoints))],
        "cuts": [{"after_block": b, "codec": "raw", "bytes_per_token": 1536.0} for b in (1, 3)],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with splitnet.connect(path, timeout_s=30) as s:
        assert s.infer({"text": ["from a plan"]})["embedding"].shape == (1, 384)
    plan["model_hash"] = "0" * 16
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(PlanMismatch, match="model hash"):
        splitnet.connect(path, timeout_s=30)


def test_vit_infer_over_two_stages(kill_leftovers):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with launch_pipeline("tiny-vit", [3]) as pipe, splitnet.connect(pipe.endpoints, timeout_s=30) as s:
        assert s.kind == "vision"
        logits = s.infer({"pixel_values": x})["logits"]
    ref = load_model("tiny-vit").full()({"pixel_values": torch.from_numpy(x)})["logits"].numpy()
    assert logits.shape == (2, 10) and np.abs(logits - ref).max() < 1e-4


@pytest.mark.parametrize("codec,tol", [("fp16", 1e-3), ("int8", 2e-2)])
def test_codecs_on_cuts_send_fewer_bytes_and_skip_padding(kill_leftovers, codec, tol):
    texts = ["a long sentence that sets the padded length of this batch quite far out", "short"]
    bm = load_model("minilm")
    ref = bm.full()(bm.tokenize(texts))["embedding"].numpy()
    n_real = int(bm.tokenize(texts)["attention_mask"].sum())
    with launch_pipeline("minilm", [3], codecs=[codec]) as pipe, splitnet.connect(pipe.endpoints, timeout_s=30) as s:
        assert s.stages[0]["codec_out"] == codec
        out = s.infer({"text": texts})["embedding"]
        cut = s.last_stats["cut_bytes"][0]
    assert np.abs(out - ref).max() < tol
    bytes_per_value = {"fp16": 2, "int8": 1}[codec]
    # only real tokens cross the cut (plus per-token side info, the mask and headers)
    assert n_real * 384 * bytes_per_value < cut < n_real * 384 * bytes_per_value + n_real * 8 + 2000
