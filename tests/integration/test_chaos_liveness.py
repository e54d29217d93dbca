"""Liveness that sees the work (#18): a stage whose I/O thread answers heartbeats while its
compute thread is stuck counts as failed on the client, and the supervisor kills (then restarts)
a stage that is hung: no answer, or work queued that does not move."""

from __future__ import annotations

import sys
import time

import pytest

from splitnet.cloud.supervisor import HangPolicy, RestartPolicy, Supervisor
from splitnet.edge.config import ClientConfig
from splitnet.edge.links import StageLinks
from splitnet.errors import ConfigError, StageUnavailable
from splitnet.wire import Message, SocketConfig
from fake_stage import FakeStage

pytestmark = pytest.mark.timeout(60)


class _ProgressStage(FakeStage):
    """A stage that answers pings with the progress ``progress()`` gives; ``pongs`` counts them."""

    def __init__(self, progress):
        self.progress = progress
        super().__init__(self._pong)

    @property
    def pongs(self) -> int:
        return self.handled["ping"]

    def _pong(self, msg: Message) -> Message | None:
        if msg.kind != "ping":
            return None
        return Message(kind="pong", req=msg.req, seq=msg.seq, meta={"pid": 1, "t": msg.meta.get("t"), "progress": self.progress()})


def _links(endpoint: str, **cfg) -> StageLinks:
    config = ClientConfig(heartbeat_interval_s=0.1, heartbeat_liveness=30, **cfg)
    links = StageLinks([endpoint], config, SocketConfig(), None, b"chaos-liveness-client", lambda *_: None)
    links.end_handshake()
    return links


def test_a_stuck_compute_thread_counts_as_failed_though_pings_are_answered():
    t0 = time.monotonic()
    stage = _ProgressStage(lambda: {"forwards": 7, "batches": 7, "queued": 2, "compute_tick_age_s": round(time.monotonic() - t0 + 0.5, 3)})
    links = _links(stage.endpoint, compute_stall_s=0.6)
    try:
        with pytest.raises(StageUnavailable, match="compute thread has finished no step"):
            links.wait_until(lambda: False, 20.0, lambda: TimeoutError("the stuck stage was never declared failed"))
        assert stage.pongs >= 2, "the stage answered heartbeats all along"
        assert links.is_down(0)
        assert links.silent_stages() == [0], "recovery must replace a stage that answers but does not work"
    finally:
        links.close()
        stage.close()


def test_a_stage_whose_forwards_move_is_not_failed_even_with_an_old_tick():
    forwards = [0]

    def progress():
        forwards[0] += 1  # a long forward per heartbeat, but work moves
        return {"forwards": forwards[0], "batches": forwards[0], "queued": 3, "compute_tick_age_s": 5.0}

    stage = _ProgressStage(progress)
    links = _links(stage.endpoint, compute_stall_s=0.5)
    try:
        with pytest.raises(TimeoutError, match="no failure"):
            links.wait_until(lambda: False, 1.5, lambda: TimeoutError("no failure"))
        assert stage.pongs >= 5 and not links.is_down(0)
    finally:
        links.close()
        stage.close()


def test_a_compute_thread_inside_a_bounded_send_is_not_stuck_until_the_send_timeout_passes():
    """A stage whose compute thread waits on a next stage that does not take its message (up to its
    send timeout, then the step fails with a typed error) is not frozen: not failed while the wait
    is within the bound it reports, failed once the wait outlasts it (a thread frozen mid-send)."""
    t0 = time.monotonic()
    stage = _ProgressStage(lambda: {"forwards": 3, "batches": 3, "queued": 1, "compute_tick_age_s": round(time.monotonic() - t0 + 0.5, 3),
                                    "send_wait_s": round(time.monotonic() - t0 + 0.5, 3), "send_timeout_s": 1.0})
    links = _links(stage.endpoint, compute_stall_s=0.3)
    try:
        with pytest.raises(TimeoutError, match="no failure"):
            links.wait_until(lambda: False, 1.0, lambda: TimeoutError("no failure"))  # waits 0.5-1.5 s: within 1 s + 1 s
        with pytest.raises(StageUnavailable, match="compute thread has finished no step"):
            links.wait_until(lambda: False, 10.0, lambda: TimeoutError("a wait past its bound was never declared failed"))
        assert time.monotonic() - t0 >= 1.45  # the wait (0.5 s at t0) passed 1 s + 1 s of grace
    finally:
        links.close()
        stage.close()


@pytest.mark.parametrize("to_own_next_stage", [True, False])
def test_a_send_to_a_next_stage_that_answers_is_no_excuse(to_own_next_stage):
    """Inside a send to this client's own next stage, which answers this client's heartbeats (so
    its I/O thread reads what comes), a compute thread whose work does not move is frozen: failed
    after compute_stall_s, not after the send's bound. A send elsewhere (another client's route,
    a key that does not authenticate) keeps the bound."""
    from splitnet.wire.hop_digest import hop_digest

    t0 = time.monotonic()
    nxt = _ProgressStage(lambda: {"forwards": 1, "batches": 1, "queued": 0, "compute_tick_age_s": 0.0})
    target = hop_digest(nxt.endpoint, None) if to_own_next_stage else hop_digest("tcp://10.0.0.9:5555", None)
    stage = _ProgressStage(lambda: {"forwards": 3, "batches": 3, "queued": 1, "compute_tick_age_s": round(time.monotonic() - t0 + 0.5, 3),
                                    "send_wait_s": round(time.monotonic() - t0 + 0.5, 3), "send_timeout_s": 5.0, "send_to": target})
    config = ClientConfig(heartbeat_interval_s=0.1, heartbeat_liveness=30, compute_stall_s=0.3)
    links = StageLinks([stage.endpoint, nxt.endpoint], config, SocketConfig(), None, b"chaos-liveness-client", lambda *_: None)
    links.end_handshake()
    try:
        if to_own_next_stage:
            with pytest.raises(StageUnavailable, match="stage 0 .*compute thread has finished no step"):
                links.wait_until(lambda: False, 3.0, lambda: TimeoutError("a frozen sender was never declared failed"))
            assert time.monotonic() - t0 < 2.5  # compute_stall_s, not 5 s + 1 s
        else:
            with pytest.raises(TimeoutError, match="no failure"):
                links.wait_until(lambda: False, 2.0, lambda: TimeoutError("no failure"))
    finally:
        links.close()
        stage.close()
        nxt.close()


def test_compute_stall_must_be_positive():
    with pytest.raises(ConfigError, match="compute_stall_s"):
        ClientConfig(compute_stall_s=0)


def _supervise(probe, hang: HangPolicy) -> Supervisor:
    sup = Supervisor({"stage0": [sys.executable, "-c", "import time; time.sleep(120)"]},
                     RestartPolicy(max_restarts=3, backoff_initial_s=0.1, backoff_max_s=0.2), hang=hang, probe=probe)
    sup.start()
    return sup


def _run_until(sup: Supervisor, cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sup.poll()
        if cond():
            return True
        time.sleep(0.05)
    return False


HANG = HangPolicy(check_interval_s=0.1, hang_timeout_s=0.6, startup_timeout_s=5.0, probe_timeout_s=0.1)


def test_supervisor_restarts_a_stage_with_queued_work_that_does_not_move():
    sup = _supervise(lambda cmd, t: {"stats": {"forwards": 4}, "queue_depth": 2}, HANG)
    try:
        first = sup.children[0].proc.pid
        assert _run_until(sup, lambda: sup.children[0].proc.pid != first, 10), "a hung stage was not restarted"
        assert sup.children[0].hung_kills == 1 and sup.children[0].proc.poll() is None
    finally:
        sup.stop()


def test_supervisor_restarts_a_stage_that_stops_answering():
    answers = [0]

    def probe(cmd, t):
        answers[0] += 1
        return {"stats": {"forwards": 0}, "queue_depth": 0} if answers[0] <= 2 else None

    sup = _supervise(probe, HANG)
    try:
        first = sup.children[0].proc.pid
        assert _run_until(sup, lambda: sup.children[0].proc.pid != first, 10)
        assert sup.children[0].hung_kills == 1
    finally:
        sup.stop()


def test_supervisor_leaves_a_busy_stage_whose_work_moves_and_an_idle_one():
    n = [0]

    def probe(cmd, t):
        n[0] += 1
        return {"stats": {"forwards": n[0] if n[0] % 2 else 0}, "queue_depth": 5 if n[0] % 2 else 0}

    sup = _supervise(probe, HANG)
    try:
        first = sup.children[0].proc.pid
        _run_until(sup, lambda: False, 2.0)
        assert n[0] >= 8, "the heartbeat was not asked"
        assert sup.children[0].proc.pid == first and sup.children[0].hung_kills == 0
    finally:
        sup.stop()
