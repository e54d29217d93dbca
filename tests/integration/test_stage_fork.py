"""Stages forked from the preloaded server (splitnet.runtime.stage_fork) behave as exec'd ones."""

from __future__ import annotations

import os
import signal

import pytest

import splitnet
from splitnet.errors import ConfigError
from splitnet.runtime.launcher import _start_method, launch_pipeline
from splitnet.runtime.stage_fork import ForkedStage, fork_available, fork_stage

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs fork (POSIX)")


def _unsplit_greedy(prompt: list[int], n: int) -> list[int]:
    import torch

    from splitnet.model.loading import load_model

    full = load_model("tiny-gpt2").full()
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(full({"input_ids": torch.tensor([ids])})["logits"].argmax(-1)))
    return ids[len(prompt):]


def test_forked_stages_give_the_unsplit_tokens_and_die_like_processes():
    want = _unsplit_greedy([5, 6, 7, 8], 6)
    with launch_pipeline("tiny-gpt2", num_stages=3, start="fork") as pipe:
        assert all(isinstance(st.popen, ForkedStage) for st in pipe.stages)
        with splitnet.connect(pipe.endpoints, timeout_s=60) as s:
            assert s.generate([5, 6, 7, 8], max_new_tokens=6).tokens == want
        old_pid = pipe.stages[1].pid
        endpoint = pipe.respawn_stage(1)  # the recovery hook: a new forked process, the old one killed
        assert pipe.stages[1].pid != old_pid and endpoint == pipe.stages[1].endpoint
        with splitnet.connect(pipe.endpoints, timeout_s=60) as s:
            assert s.generate([5, 6, 7, 8], max_new_tokens=6).tokens == want
        p = pipe.stages[2].popen
        assert p.poll() is None
        p.send_signal(signal.SIGSTOP)
        assert p.poll() is None  # stopped is not exited
        p.send_signal(signal.SIGCONT)
        pipe.kill_stage(2)
        assert p.poll() == -signal.SIGKILL and p.returncode == -signal.SIGKILL


def test_a_forked_stage_reads_the_environment_it_was_given_and_reports_its_exit_code():
    argv = ["--model", "tiny-gpt2", "--blocks", "0:2", "--insecure", "--parent-pid", str(os.getpid())]
    bad = fork_stage(argv, {**os.environ, "SPLITNET_TRANSPORT": "no-such-transport"})  # read by cli_serve after the fork
    assert bad.wait(timeout=60) == 2
    wrong_blocks = fork_stage(["--model", "tiny-gpt2", "--blocks", "0:99", "--insecure"], dict(os.environ))
    assert wrong_blocks.wait(timeout=60) == 2
    good = fork_stage(argv, dict(os.environ))
    try:
        with pytest.raises(Exception, match="stage pid"):
            good.wait(timeout=1.0)  # it serves: no exit
        good.terminate()
        assert good.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        good.kill()


def test_start_method_is_checked_before_any_work_and_auto_execs_what_a_fork_cannot_promise():
    with pytest.raises(ConfigError, match="start must be one of"):
        launch_pipeline("tiny-gpt2", num_stages=2, start="spawn")
    assert _start_method("auto", {}, []) == "fork"
    assert _start_method("auto", {"OMP_NUM_THREADS": "1"}, []) == "exec"  # read at import: the server's value would win
    assert _start_method("auto", {}, ["--device", "cuda:0"]) == "exec"
    assert _start_method("exec", {}, []) == "exec"


def test_a_fork_server_killed_a_moment_ago_is_replaced_not_reported_as_a_dead_stage():
    # a test harness or a user's cleanup that kills every child of the caller kills the server
    # too; the next stage must start from a new server, even before the old one is reaped
    from splitnet.runtime import stage_fork

    argv = ["--model", "tiny-gpt2", "--blocks", "0:99", "--insecure"]  # exits 2 at once: no stage left behind
    assert fork_stage(argv, dict(os.environ)).wait(timeout=60) == 2
    old = stage_fork._current_server()
    os.kill(old.popen.pid, signal.SIGKILL)
    stage = fork_stage(argv, dict(os.environ))
    assert stage_fork._current_server() is not old
    assert stage.wait(timeout=60) == 2
