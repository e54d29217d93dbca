"""Client-side recovery (#18) against real stage processes: stage 0 lost before a
generate_many feed, a fault inside a recovery, a budget that refills with progress, two stages
lost at once, and replies of an old epoch dropped."""

from __future__ import annotations

import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.sampling import SamplingConfig
from splitnet.errors import StageUnavailable
from splitnet.runtime.launcher import launch_pipeline

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

FAST = ClientConfig(timeout_s=30, connect_timeout_s=20, heartbeat_interval_s=0.3, heartbeat_liveness=3, prefill_chunk_tokens=8)
PROMPTS = ["def f(x):", "class Log:\n    def", "import os\nimport"]
SAMPLING = SamplingConfig(temperature=1.0, top_k=40, seed=5)


@pytest.fixture(scope="module")
def pipe():
    with launch_pipeline("tiny-gpt2", [2, 4]) as p:
        yield p


@pytest.fixture(scope="module")
def expected(pipe):
    with splitnet.connect(pipe.endpoints, config=FAST) as s:
        return [r.tokens for r in s.generate_many(PROMPTS, 10, sampling=SAMPLING)]


def test_generate_many_recovers_when_stage_0_is_lost_before_a_feed(pipe, expected):
    """on_token runs before that sequence's next feed: stage 0 is dead when it is sent."""
    with splitnet.connect(pipe.endpoints, config=FAST, recovery=pipe.respawn_stage) as s:
        seen: list[tuple[int, int]] = []

        def on_token(i: int, tok: int) -> None:
            seen.append((i, tok))
            if len(seen) == 7:
                pipe.kill_stage(0)

        got = s.generate_many(PROMPTS, 10, sampling=SAMPLING, on_token=on_token)
        assert [r.tokens for r in got] == expected
        assert len(seen) == 30, "a token was produced twice or lost"
        assert [r["replaced"] for r in s.recoveries] == [[0]] and s.epoch == 1


def test_a_stage_killed_during_recovery_does_not_end_it(pipe, expected):
    """The first replacement dies before its handshake: the recovery tries again within its budget."""
    calls: list[int] = []

    def flaky_respawn(i: int) -> str:
        endpoint = pipe.respawn_stage(i)
        calls.append(i)
        if len(calls) == 1:
            pipe.kill_stage(i)  # the new process is lost inside the recovery
        return endpoint

    with splitnet.connect(pipe.endpoints, config=FAST, recovery=flaky_respawn) as s:
        seen: list[int] = []

        def on_token(i: int, tok: int) -> None:
            seen.append(tok)
            if len(seen) == 12:
                pipe.kill_stage(1)

        got = s.generate_many(PROMPTS, 10, sampling=SAMPLING, on_token=on_token)
        assert [r.tokens for r in got] == expected and len(seen) == 30
        assert calls == [1, 1]
        [record] = s.recovery_records
        assert record.replaced == [1] and record.attempts == 2


def test_a_hook_that_fails_once_is_retried(pipe, expected):
    calls: list[int] = []

    def hook(i: int) -> str:
        calls.append(i)
        if len(calls) == 1:
            raise RuntimeError("the scheduler had no capacity yet")
        return pipe.respawn_stage(i)

    with splitnet.connect(pipe.endpoints, config=FAST, recovery=hook) as s:
        gen = s.generate_many
        n = [0]

        def on_token(i: int, tok: int) -> None:
            n[0] += 1
            if n[0] == 5:
                pipe.kill_stage(2)

        assert [r.tokens for r in gen(PROMPTS, 10, sampling=SAMPLING, on_token=on_token)] == expected
        assert calls == [2, 2] and s.recovery_records[0].attempts == 2


def test_the_budget_refills_with_progress(pipe):
    """One recovery allowed, given back per 6 tokens: two faults far apart both recover."""
    config = ClientConfig(**{**FAST.__dict__, "max_recoveries": 1, "recovery_refill_tokens": 6})
    with splitnet.connect(pipe.endpoints, config=FAST) as s:
        want = s.generate("abc", 24).tokens
    with splitnet.connect(pipe.endpoints, config=config, recovery=pipe.respawn_stage) as s:
        got = []
        for event in s.stream("abc", 24):
            if hasattr(event, "token"):
                got.append(event.token)
                if len(got) in (4, 16):
                    pipe.kill_stage(1)
            else:
                result = event
        assert got == want and result.tokens == want and result.replays == 2
        assert len(s.recoveries) == 2
    without_refill = ClientConfig(**{**FAST.__dict__, "max_recoveries": 1, "recovery_refill_tokens": 0})
    with splitnet.connect(pipe.endpoints, config=without_refill, recovery=pipe.respawn_stage) as s:
        got = []
        with pytest.raises(StageUnavailable):
            for event in s.stream("abc", 24):
                if hasattr(event, "token"):
                    got.append(event.token)
                    if len(got) in (4, 16):
                        pipe.kill_stage(1)
        assert got == want[:16] and len(s.recoveries) == 1
    pipe.respawn_stage(1)  # the module's pipeline, whole again for the next tests


def test_two_stages_lost_at_once_are_replaced_in_one_recovery(pipe, expected):
    with splitnet.connect(pipe.endpoints, config=FAST, recovery=pipe.respawn_stage) as s:
        n = [0]

        def on_token(i: int, tok: int) -> None:
            n[0] += 1
            if n[0] == 9:
                pipe.kill_stage(1)
                pipe.kill_stage(2)

        assert [r.tokens for r in s.generate_many(PROMPTS, 10, sampling=SAMPLING, on_token=on_token)] == expected
        assert [r["replaced"] for r in s.recoveries] == [[1, 2]]


def test_a_reply_of_an_old_epoch_is_dropped(pipe):
    """A result sent to the pipeline generation before a recovery arrives after it: dropped."""
    with splitnet.connect(pipe.endpoints, config=FAST) as s:
        want = s.generate("abc", 3).tokens
        req = s.open_request()
        s.send_tokens(req, 0, s.tokenizer.encode("abc"), pos=0, want_result=True, rewind=False, all_logits=False, head={"head": "argmax"})
        s._new_epoch()  # what a recovery does while that reply is on its way
        with pytest.raises(StageUnavailable, match="no result within"):
            s.wait_reply({(req, 0)}, timeout_s=3)
        assert s.reply_counts.stale_epoch == 1 and len(s._replies) == 0
        s.release(req)
        assert s.generate("abc", 3).tokens == want  # the new epoch's replies are taken
