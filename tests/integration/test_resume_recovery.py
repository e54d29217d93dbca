"""A recovery resumes a request where the stages kept their caches (#18): the stage before a
lost one refills its replacement from what it sent before (splitnet.runtime.sent_log), a lost
first stage is refilled by the client, the survivors take the old request over under the new
id, and only the step in flight is fed again. Tokens equal the fault-free run's; without a log
the resume fails over to a full replay, with the same tokens and no cache left behind."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.sampling import SamplingConfig
from splitnet.runtime.launcher import launch_pipeline
from tests.integration.test_chunk_merge import _stats

pytestmark = pytest.mark.timeout(300)

CONFIG = ClientConfig(timeout_s=30, connect_timeout_s=20, heartbeat_interval_s=0.3, heartbeat_liveness=3, prefill_chunk_tokens=8)
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(40)]


def _hook(pipe, standbys: dict):
    def hook(i: int) -> str:
        sp = standbys[i].pop(0)
        pipe.stages[i] = sp
        return sp.endpoint
    return hook


def _stream_killing(s, pipe, lost: list[int], after: int, n: int) -> tuple[list[int], list[dict]]:
    """Stream ``n`` tokens of PROMPT, SIGKILLing the stages ``lost`` once ``after`` tokens came:
    the tokens, and the result's record of its replays."""
    victims = [pipe.stages[k].pid for k in lost]

    def kill() -> None:
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    return _stream_faulting(s, after, n, kill)


def _stream_faulting(s, after: int, n: int, fault) -> tuple[list[int], list[dict]]:
    """Stream ``n`` tokens of PROMPT, calling ``fault()`` once ``after`` tokens came: the
    tokens, and the result's record of its replays."""
    tokens: list[int] = []
    replays: list[dict] = []
    for ev in s.stream(PROMPT, n):
        if hasattr(ev, "token"):
            tokens.append(ev.token)
            if len(tokens) == after:
                fault()
        else:
            replays = ev.stats["replays"]
    return tokens, replays


@pytest.mark.parametrize(("model", "lost"), [("tiny-gpt2", [1]), ("tiny-llama", [0]), ("tiny-gpt2", [1, 2]), ("tiny-llama", [0, 2])])
def test_a_resume_refills_only_the_lost_stages_and_gives_the_same_tokens(kill_leftovers, model, lost):
    with launch_pipeline(model, num_stages=3) as pipe:
        standbys = {k: [pipe.start_stage(k, pipe.stages[k].blocks)] for k in lost}
        with splitnet.connect(pipe.endpoints, config=CONFIG, recovery=_hook(pipe, standbys)) as s:
            want = s.generate(PROMPT, 12).tokens
            got, replays = _stream_killing(s, pipe, lost, 4, 12)
            stats = [_stats(e) for e in s.endpoints]
        assert got == want
        survivors = [i for i in range(3) if i not in lost]
        assert all(stats[i]["resumed"] == 1 for i in survivors), stats  # took the old request over, nothing replayed
        for i in lost:
            if i > 0 and i - 1 not in lost:
                assert stats[i - 1]["refills"] == 1 and stats[i - 1]["refill_tokens"] == len(PROMPT) + 3  # prompt + the tokens fed before the fault
        for i in survivors:  # the survivors computed each position once, and the step in flight again at most
            assert stats[i]["forwards"] <= 2 * (len(PROMPT) // 8) + 2 * 12, stats
        assert len(replays) == 1 and replays[0]["resumed"] and replays[0]["refill"] == lost, replays


def test_without_a_log_the_resume_fails_over_to_a_full_replay(kill_leftovers):
    one_recovery = dataclasses.replace(CONFIG, max_recoveries=1)  # one fault: the failed resume's replay continues its recovery, free
    with launch_pipeline("tiny-gpt2", num_stages=3, extra_args=["--sent-log-mib", "0"]) as pipe:
        standbys = {1: [pipe.start_stage(1, pipe.stages[1].blocks)]}
        with splitnet.connect(pipe.endpoints, config=one_recovery, recovery=_hook(pipe, standbys)) as s:
            want = s.generate(PROMPT, 10).tokens
            got, replays = _stream_killing(s, pipe, [1], 3, 10)
            assert got == want
            assert [r["resumed"] for r in replays] == [True, False], replays  # the resume met an empty stage 1: UnknownRequest, then a replay
            assert replays[1]["cause"] == "UnknownRequest", replays  # the stage's error as it is, not a CachesLost naming no stage
            stats = [_stats(e) for e in s.endpoints]
        assert [st["refills"] for st in stats] == [0, 0, 0]
        with splitnet.connect(pipe.endpoints, config=CONFIG) as s2:
            assert [i["cached_requests"] for i in s2.stages] == [0, 0, 0]  # old, resumed and replayed requests all released


def test_generate_many_resumes_every_sequence(kill_leftovers):
    prompts = [PROMPT, PROMPT[:29], PROMPT[5:38]]
    sampling = SamplingConfig(temperature=1.0, top_k=40, seed=7)
    with launch_pipeline("tiny-llama", num_stages=3) as pipe:
        standbys = {1: [pipe.start_stage(1, pipe.stages[1].blocks)]}
        with splitnet.connect(pipe.endpoints, config=CONFIG, recovery=_hook(pipe, standbys)) as s:
            want = [r.tokens for r in s.generate_many(prompts, 10, sampling=sampling)]
            victim = pipe.stages[1].pid
            seen: list[int] = []

            def on_token(i: int, tok: int) -> None:
                seen.append(i)
                if len(seen) == 9:
                    os.kill(victim, signal.SIGKILL)

            got = [r.tokens for r in s.generate_many(prompts, 10, sampling=sampling, on_token=on_token)]
            replays = s.last_stats["replays"]
            stats = [_stats(e) for e in s.endpoints]
        assert got == want
        assert replays and all(r["resumed"] for r in replays), replays
        assert stats[0]["refills"] == len(replays)


def test_refill_is_sent_once_per_resume_not_on_request(kill_leftovers):
    """A step that names ``refill`` without taking a request over (or again after it did) makes
    no stage resend its log: a client cannot turn one small message into its states again and again."""
    with launch_pipeline("tiny-gpt2", num_stages=3) as pipe:
        with splitnet.connect(pipe.endpoints, config=CONFIG) as s:
            req = s.open_request()
            s.send_tokens(req, 0, PROMPT, pos=0, want_result=True, rewind=False, all_logits=False, head={"head": "argmax"})
            s.wait_reply({(req, 0)}, 30)
            for seq in (1, 2):
                s.send_tokens(req, seq, [5], pos=len(PROMPT), want_result=True, rewind=True, all_logits=False,
                              head={"head": "argmax"}, refill=(1,))
                s.wait_reply({(req, seq)}, 30)
            s.release(req)
            assert [_stats(e)["refills"] for e in pipe.endpoints] == [0, 0, 0]


def _restart_in_place(pipe, i: int):
    """Stage ``i``'s process, and a function that kills it and starts it again on its endpoint."""
    old = pipe.stages[i]

    def restart() -> None:
        old.popen.kill()
        old.popen.wait(timeout=10)
        pipe.stages[i] = pipe.start_stage(i, old.blocks, bind=old.endpoint)
    return old, restart


def test_a_stage_restarted_in_place_is_refilled_not_replayed(kill_leftovers):
    """Stage 1 is stopped while a step waits there, then killed and restarted on its endpoint:
    the client learns it from the new process's pong (CachesLost naming stage 1) or from the
    closed connection (a recovery whose hook hands out the same endpoint); either way the
    request resumes with stage 1 refilled, and the tokens equal the fault-free run's."""
    import threading

    with launch_pipeline("tiny-gpt2", num_stages=3) as pipe:
        with splitnet.connect(pipe.endpoints, config=CONFIG, recovery=lambda i: pipe.stages[i].endpoint) as s:
            want = s.generate(PROMPT, 12).tokens
            old, restart = _restart_in_place(pipe, 1)
            restarter = threading.Timer(0.3, restart)

            def stop_then_restart() -> None:
                os.kill(old.pid, signal.SIGSTOP)  # the next step waits at stage 1 when the restart comes
                restarter.start()
            tokens, replays = _stream_faulting(s, 4, 12, stop_then_restart)
            restarter.join()
            stats = [_stats(e) for e in s.endpoints]
        assert tokens == want
        assert replays and replays[-1]["resumed"] and replays[-1]["refill"] == [1], replays
        assert stats[0]["refills"] >= 1


def test_a_last_stage_restarted_in_place_is_refilled_in_one_recovery(kill_leftovers):
    """The last stage is killed while the one before it sends there, and restarted on its own
    endpoint: the client hears first that stage 1 could not reach it, when no stage is silent.
    The recovery's handshake sees stage 2 answer from a new process, so the request resumes
    with stage 2 refilled in that one recovery: no failed resume, no second recovery when the
    new pid shows in a pong (a storm seen in the chaos bench: 2-3 recoveries a tenant)."""
    import threading

    with launch_pipeline("tiny-gpt2", num_stages=3) as pipe:
        with splitnet.connect(pipe.endpoints, config=CONFIG, recovery=lambda i: pipe.stages[i].endpoint) as s:
            want = s.generate(PROMPT, 12).tokens
            _, restart = _restart_in_place(pipe, 2)
            restarter = threading.Thread(target=restart)
            tokens, replays = _stream_faulting(s, 4, 12, restarter.start)
            restarter.join()
            records = s.recovery_records
        assert tokens == want
        assert len(replays) == 1 and replays[0]["resumed"] and replays[0]["refill"] == [2], (replays, records)
        assert [r.caches_lost for r in records] in ([[2]], []), records
