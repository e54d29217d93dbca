"""A stage runs a request's consecutive queued prompt chunks as one forward (merge_chunk_tokens):
the tokens are those of the unsplit model, the merge really happens, and it can be turned off."""

from __future__ import annotations

import pytest
import zmq

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.runtime.launcher import launch_pipeline
from splitnet.wire.message import Message, decode_message, encode_message

PROMPT = [(7 * i + 3) % 250 + 1 for i in range(60)]


def _unsplit_greedy(model: str, prompt: list[int], n: int) -> list[int]:
    import torch

    from splitnet.model.loading import load_model

    full = load_model(model).full()
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full({"input_ids": torch.tensor([ids])})["logits"].argmax(-1)))
    return ids[len(prompt):]


def _stats(endpoint: str) -> dict:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        s.send_multipart(encode_message(Message(kind="info", req="info")))
        return decode_message(s.recv_multipart()).meta["stats"]
    finally:
        s.close()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_queued_chunks_merge_and_give_the_unsplit_tokens(kill_leftovers, model):
    want = _unsplit_greedy(model, PROMPT, 5)
    with launch_pipeline(model, num_stages=3) as pipe:
        # 4-token chunks all sent at once: they queue at stage 0 while its first forward runs
        with splitnet.connect(pipe.endpoints, config=ClientConfig(prefill_chunk_tokens=4), timeout_s=60) as s:
            for _ in range(3):
                assert s.generate(PROMPT, max_new_tokens=5).tokens == want
        merged = [_stats(e)["merged_chunks"] for e in pipe.endpoints]
    assert merged[0] > 0  # 15 chunks of 4: fewer forwards than chunks at stage 0


def test_merging_can_be_turned_off(kill_leftovers):
    want = _unsplit_greedy("tiny-gpt2", PROMPT, 3)
    with launch_pipeline("tiny-gpt2", num_stages=2, extra_args=["--merge-chunk-tokens", "1"]) as pipe:
        with splitnet.connect(pipe.endpoints, config=ClientConfig(prefill_chunk_tokens=4), timeout_s=60) as s:
            assert s.generate(PROMPT, max_new_tokens=3).tokens == want
        assert [_stats(e)["merged_chunks"] for e in pipe.endpoints] == [0, 0]
