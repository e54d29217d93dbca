"""Compact codes across real stage processes: a tiny-gpt2 pipeline with fp16 on both cuts generates
exactly what the same stages, chunks and fp16 round trips give in-process, while each stage sends
its requests' later steps in the compact form (meta.cc); a compact step no full entry bound is a
typed error (replay), and the stage serves on."""

from __future__ import annotations

import pytest
import torch

import splitnet
from splitnet.codecs import make_codec
from splitnet.edge.config import ClientConfig
from splitnet.errors import UnknownRequest
from splitnet.model import load_model
from splitnet.runtime.launcher import launch_pipeline

pytestmark = pytest.mark.timeout(180)
CUTS = [2, 4]
CHUNK = 5


@pytest.fixture(scope="module")
def fp16_pipe():
    with launch_pipeline("tiny-gpt2", CUTS, codecs=["fp16", "fp16"]) as pipe:
        yield pipe


def _in_process_greedy(prompt: list[int], new_tokens: int) -> list[int]:
    """The three stages with their own caches, fp16 round trips on both cuts, the same chunks as the client."""
    bm = load_model("tiny-gpt2")
    bounds = [0, *CUTS, bm.num_blocks]
    stages = [bm.stage(a, b) for a, b in zip(bounds, bounds[1:])]
    caches = [s.new_cache() for s in stages]
    fp16 = make_codec("fp16")

    def run(tokens: list[int]) -> int:
        x = {"input_ids": torch.tensor([tokens])}
        with torch.no_grad():
            for i, (stage, cache) in enumerate(zip(stages, caches)):
                out = stage(x, cache)
                if i < len(stages) - 1:
                    h = out["hidden"].float().numpy()
                    x = {"hidden": torch.from_numpy(fp16.decode(fp16.encode(h)))}
        logits = out["logits"].float()
        return int(logits.reshape(1, -1, logits.shape[-1])[0, -1].argmax())

    for k in range(0, len(prompt), CHUNK):
        tok = run(prompt[k:k + CHUNK])
    out = [tok]
    while len(out) < new_tokens:
        out.append(run([out[-1]]))
    return out


def test_generation_with_compact_steps_equals_the_in_process_split(fp16_pipe):
    prompt = list(b"import os\nprint(")
    want = _in_process_greedy(prompt, 12)
    with splitnet.connect(fp16_pipe.endpoints, config=ClientConfig(timeout_s=30, prefill_chunk_tokens=CHUNK)) as s:
        assert [info.get("compact_codes") for info in s.stages] == [1, 1, 1]
        res = s.generate(prompt, 12)
        again = s.generate_many([prompt, prompt[:7]], 12)  # two requests in flight: each its own binding
    assert res.tokens == want
    assert again[0].tokens == want and again[1].tokens == _in_process_greedy(prompt[:7], 12)
    assert res.stats["replays"] == []


def test_a_compact_step_no_full_entry_bound_is_unknown_request(fp16_pipe):
    with splitnet.connect(fp16_pipe.endpoints, timeout_s=30) as s:
        s._send_forward("0123456789abcdef", 0, {}, {"cache": True, "pos": 3, "cc": [1, bytes(2 * 64)]})
        with pytest.raises(UnknownRequest, match="replay the request"):
            s._wait_any({("0123456789abcdef", 0)})
        assert s.generate("still serving", 3).tokens
