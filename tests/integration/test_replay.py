"""Fault-tolerant replay: a stage killed mid-generation is moved to a new process, the request's
own inputs are replayed to rebuild the KV caches, and the tokens equal a run without faults."""

from __future__ import annotations

import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.generation import GenerationResult, TokenChunk
from splitnet.edge.sampling import SamplingConfig
from splitnet.errors import StageUnavailable
from splitnet.runtime.launcher import launch_pipeline

pytestmark = pytest.mark.timeout(240)

FAST = ClientConfig(timeout_s=30, heartbeat_interval_s=0.3, heartbeat_liveness=3, prefill_chunk_tokens=8)


@pytest.mark.parametrize("victim,sampling", [(0, None), pytest.param(2, SamplingConfig(temperature=1.0, top_k=40, seed=3), marks=pytest.mark.slow)])  # the seeded last-stage case runs in the slow suite (CI time)
def test_generation_survives_a_killed_stage(kill_leftovers, victim, sampling):
    prompt = "def replay(log):\n    for token in log:"
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        with splitnet.connect(pipe.endpoints, config=FAST) as s:
            expected = s.generate(prompt, 24, sampling=sampling).tokens
        with splitnet.connect(pipe.endpoints, config=FAST, recovery=pipe.respawn_stage) as s:
            old_pid = pipe.stages[victim].pid
            got, results = [], []
            for event in s.stream(prompt, 24, sampling=sampling):
                if isinstance(event, TokenChunk):
                    got.append(event.token)
                    if len(got) == 10:
                        pipe.kill_stage(victim)
                else:
                    results.append(event)
            assert got == expected
            [result] = results
            assert isinstance(result, GenerationResult) and result.tokens == expected and result.finish_reason == "length"
            assert result.replays == 1
            stats = result.stats
            assert len(stats["replays"]) == 1 and stats["replays"][0]["after_tokens"] == 10
            assert s.recoveries[0]["replaced"] == [victim] and s.epoch == 1
            assert pipe.stages[victim].pid != old_pid
            # every stage's cache now holds the whole request exactly once
            assert stats["tokens_computed"] == [len(s.tokenizer.encode(prompt)) + 23] * 3


def test_infer_is_resent_after_recovery(kill_leftovers):
    with launch_pipeline("minilm", [3]) as pipe:
        with splitnet.connect(pipe.endpoints, config=FAST, recovery=pipe.respawn_stage) as s:
            before = s.infer({"text": ["same input"]})["embedding"]
            pipe.kill_stage(1)
            after = s.infer({"text": ["same input"]})["embedding"]
            assert abs(before - after).max() < 1e-6
            assert s.recoveries and s.recoveries[0]["replaced"] == [1]


def test_without_a_recovery_hook_the_error_is_raised(kill_leftovers):
    with launch_pipeline("tiny-gpt2", [3]) as pipe:
        with splitnet.connect(pipe.endpoints, config=FAST) as s:
            gen = s.stream("abc", 50)
            next(gen)
            pipe.kill_stage(1)
            with pytest.raises(StageUnavailable):
                list(gen)


def test_generate_many_survives_a_killed_stage(kill_leftovers):
    """Decode pipelined across 3 sequences; stage 1 dies after 12 tokens in all: every unfinished
    sequence is replayed from its own log and the tokens equal a fault-free run."""
    prompts = ["def f(x):", "class Log:\n    def", "import os\nimport"]
    sampling = SamplingConfig(temperature=1.0, top_k=40, seed=5)
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        with splitnet.connect(pipe.endpoints, config=FAST) as s:
            expected = [r.tokens for r in s.generate_many(prompts, 10, sampling=sampling)]
        with splitnet.connect(pipe.endpoints, config=FAST, recovery=pipe.respawn_stage) as s:
            seen: list[tuple[int, int]] = []

            def on_token(i: int, tok: int) -> None:
                seen.append((i, tok))
                if len(seen) == 12:
                    pipe.kill_stage(1)

            results = s.generate_many(prompts, 10, sampling=sampling, on_token=on_token)
            assert [r.tokens for r in results] == expected and [r.index for r in results] == [0, 1, 2]
            assert len(seen) == 30, "a token was produced twice or lost"
            assert len(s.last_stats["replays"]) == 3  # one recovery, each of the 3 unfinished sequences replayed once
            assert len(s.recoveries) == 1 and s.recoveries[0]["replaced"] == [1]
