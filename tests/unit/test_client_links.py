"""StageLinks, the client's one poll loop: real sockets on 127.0.0.1 against fake stages (a
ROUTER in a thread that answers pings the way a stage's I/O thread does)."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from splitnet.edge.config import ClientConfig
from splitnet.edge.links import StageLinks
from splitnet.errors import StageUnavailable
from splitnet.wire import Message, SocketConfig, decode_message, encode_message

pytestmark = pytest.mark.timeout(60)


class FakeStage:
    """A ROUTER that answers ``ping`` with ``pong`` and pings each new client once (unless ``silent``:
    a frozen process), as a stage does before it sends a result, and can send a result to the last client."""

    def __init__(self, silent: bool = False, rtt_s: float = 0.0):
        self.silent = silent
        self.rtt_s = rtt_s  # pongs leave this long after their ping, echoing its "t" (a slow link)
        self.pid: int | None = None  # sent in pongs as a stage does (a new value: a restart in place)
        self._due: list[tuple[float, bytes, Message]] = []
        self.paused_until = 0.0  # pings before this are dropped (a stall shorter than a death)
        self.pings = 0
        self.pongs_from_client = 0
        self.identities: list[bytes] = []
        self._stop = threading.Event()
        self._to_send: list[Message] = []
        self._close_now = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._ready.set()
        try:
            while not self._stop.is_set() and not self._close_now.is_set():
                while self._to_send and self.identities:
                    sock.send_multipart([self.identities[-1], *encode_message(self._to_send.pop(0))])
                while self._due and self._due[0][0] <= time.monotonic():
                    _, ident, pong = self._due.pop(0)
                    sock.send_multipart([ident, *encode_message(pong)])
                if not sock.poll(20):
                    continue
                ident, *body = sock.recv_multipart()
                if ident not in self.identities:
                    self.identities.append(ident)
                    if not self.silent:
                        sock.send_multipart([ident, *encode_message(Message(kind="ping", req="confirm"))])
                msg = decode_message(body)
                if msg.kind == "ping":
                    self.pings += 1
                    if self.rtt_s and time.monotonic() >= self.paused_until:
                        self._due.append((time.monotonic() + self.rtt_s, ident, Message(kind="pong", req=msg.req, meta={"t": msg.meta.get("t")})))
                    elif not self.silent and not self.rtt_s:
                        meta = {} if self.pid is None else {"pid": self.pid}
                        sock.send_multipart([ident, *encode_message(Message(kind="pong", req=msg.req, meta=meta))])
                elif msg.kind == "pong":
                    self.pongs_from_client += 1
        finally:
            sock.close(linger=0)

    def send(self, msg: Message) -> None:
        self._to_send.append(msg)

    def close_socket(self) -> None:
        self._close_now.set()
        self.thread.join(5)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


@pytest.fixture
def stages():
    made: list[FakeStage] = []

    def make(**kw) -> FakeStage:
        made.append(FakeStage(**kw))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def _links(endpoints, got, **cfg) -> StageLinks:
    config = ClientConfig(**{"heartbeat_interval_s": 0.1, "heartbeat_liveness": 3, **cfg})
    links = StageLinks(endpoints, config, SocketConfig(), None, b"ab" * 16, lambda i, m, n: got.append((i, m, n)))
    links.end_handshake()
    return links


def test_one_loop_delivers_results_answers_stage_pings_and_sends_heartbeats(stages):
    a, b = stages(), stages()
    got: list = []
    links = _links([a.endpoint, b.endpoint], got)
    try:
        assert links.reply_to == "peer:" + "ab" * 16
        # a message sent to a stage, then a result from it arrives through the loop
        links.wait_until(lambda: links.send(1, Message(kind="ping", req="first")), 5, lambda: AssertionError("no send"))
        b.send(Message(kind="result", req="r1", seq=4, meta={"trace": []}))
        links.wait_until(lambda: any(m.kind == "result" for _, m, _ in got), 5, lambda: AssertionError("no result"))
        [(stage, msg, nbytes)] = [x for x in got if x[1].kind == "result"]
        assert stage == 1 and msg.req == "r1" and msg.seq == 4 and nbytes > 0
        # the stage's own ping is answered by the loop, not handed on
        links.wait_until(lambda: b.pongs_from_client >= 1, 5, lambda: AssertionError("the stage's ping got no pong"))
        assert all(m.kind not in ("ping", "pong") for _, m, _ in got)
        pings_before = a.pings
        links.wait_until(lambda: a.pings >= pings_before + 3, 5, lambda: AssertionError("no heartbeats"))
    finally:
        links.close()


def test_a_silent_stage_misses_its_heartbeats(stages):
    live, silent = stages(), stages(silent=True)
    links = _links([live.endpoint, silent.endpoint], [])
    try:
        with pytest.raises(StageUnavailable, match=r"stage 1 at .* missed 3 heartbeats"):
            links.wait_until(lambda: False, 20, lambda: AssertionError("the window did not end the wait"))
        assert links.silent_stages() == [1]  # known down already: counted without a second window
    finally:
        links.close()


def test_a_closed_connection_is_a_liveness_signal_before_the_window_ends(stages):
    a = stages()
    links = _links([a.endpoint], [], heartbeat_interval_s=5.0, heartbeat_liveness=3, disconnect_grace_s=0.2)
    try:
        first = Message(kind="ping", req="first")
        links.wait_until(lambda: (links.send(0, first) or True) and a.pings >= 1, 5, lambda: AssertionError("no first ping"))
        a.close_socket()  # the process's socket closes (a killed stage)
        with pytest.raises(StageUnavailable, match="closed its connection"):
            links.wait_until(lambda: False, 14, lambda: AssertionError("the disconnect was not seen"))
    finally:
        links.close()


def test_probe_names_only_the_stages_that_do_not_answer(stages):
    a, b, c = stages(), stages(silent=True), stages()
    links = _links([a.endpoint, b.endpoint, c.endpoint], [])
    try:
        assert links.silent_stages() == [1]
        assert links.ping(0, 5) > 0
        with pytest.raises(StageUnavailable, match="did not answer a ping"):
            links.ping(1, 0.3)
    finally:
        links.close()


def test_send_or_wait_gives_up_on_a_stage_that_accepts_nothing():
    # A listener that takes the TCP connection but never speaks ZMTP: with ZMQ_IMMEDIATE no pipe
    # is attached, so nothing can be queued. (A closed port is not a safe stand-in: zmq's reconnects
    # from ephemeral ports can TCP-self-connect to it, and a DEALER then handshakes with itself.)
    import socket as _socket

    listener = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    links = _links([f"tcp://127.0.0.1:{listener.getsockname()[1]}"], [])
    try:
        with pytest.raises(StageUnavailable, match="accepted no message"):
            links.send_or_wait(0, encode_message(Message(kind="ping")), 0.1)  # shorter than the liveness window
    finally:
        links.close()
        listener.close()


def test_a_reply_lost_across_a_reopen_is_suspected_once_the_stage_speaks_again():
    got: list = []
    links = _links(["tcp://127.0.0.1:9", "tcp://127.0.0.1:10"], got)
    try:
        import time as _time

        since = _time.monotonic()
        assert links.lost_reply_suspect(since) is None
        link = links._links[1]
        link.reopened_at = since + 0.001
        link.last_seen = since  # silent since the reopen: liveness decides, not this check
        assert links.lost_reply_suspect(since) is None
        link.last_seen = link.reopened_at + 0.001  # it spoke on the new connection...
        assert links.lost_reply_suspect(since) is None  # ...but a window has not passed since the reopen
        link.reopened_at = _time.monotonic() - 2 * links.window_s
        link.last_seen = _time.monotonic()
        assert links.lost_reply_suspect(since) is None  # reopened before this wait began
        link.reopened_at = since + 0.001
        link.last_seen = since + 0.002
        link.longest_step_s = 0.0
        import unittest.mock as _m
        with _m.patch("splitnet.edge.links.time.monotonic", return_value=since + links.window_s + 0.01):
            assert links.lost_reply_suspect(since) == 1
        link.longest_step_s = links.window_s  # a stage with long steps gets 4 of them
        with _m.patch("splitnet.edge.links.time.monotonic", return_value=since + links.window_s + 0.01):
            assert links.lost_reply_suspect(since) is None
    finally:
        links.close()


def test_a_slow_link_widens_its_own_silence_window(stages):
    """Heartbeat round trips of 0.25 s make a stage's window 0.3 s + 4 x 0.25 s: a 0.6 s stall
    there is not a failure (it would be with the bare 0.3 s window); the window is per stage."""
    slow, fast = stages(rtt_s=0.25), stages()
    links = _links([slow.endpoint, fast.endpoint], [])
    try:
        # a first round trip before liveness counts (a session's info handshake gives one too)
        links.wait_until(lambda: links.send(0, Message(kind="ping", req="first", meta={"t": time.monotonic()})), 5,
                         lambda: AssertionError("not connected"), heartbeats=False, liveness=False)
        links.wait_until(lambda: len(links._links[0].rtts_s) >= 1, 5, lambda: AssertionError("no round trip"), heartbeats=False, liveness=False)
        links.wait_until(lambda: len(links._links[0].rtts_s) >= 3, 5, lambda: AssertionError("no round trips measured"))
        assert min(links._links[0].rtts_s) >= 0.2
        assert 1.1 < links.stage_window_s(0) < 2.0 and links.stage_window_s(1) < 0.35
        slow.paused_until = time.monotonic() + 0.6
        deadline = time.monotonic() + 1.0
        links.wait_until(lambda: time.monotonic() >= deadline, 5, lambda: AssertionError("wait ended early"))
        assert not links.is_down(0) and not links.is_down(1)
        slow.paused_until = time.monotonic() + 60  # now it stops for good: found within its own window
        t0 = time.monotonic()
        with pytest.raises(StageUnavailable, match=r"stage 0 .* window 1\.\d s"):
            links.wait_until(lambda: False, 10, lambda: AssertionError("never declared down"))
        assert time.monotonic() - t0 < 3.0
    finally:
        links.close()


def test_a_reply_on_the_connection_a_reopen_replaced_is_still_received(stages):
    """A reopen (half a silent window) opens a new connection but reads the old one for a window:
    a stage that wrote its reply on the old one (here: a ROUTER that keeps the first connection
    of a routing id) does not lose it, so the request needs no replay."""
    stage = stages()
    got: list = []
    links = _links([stage.endpoint], got)
    try:
        links.wait_until(lambda: links.send(0, Message(kind="ping", req="hello")) and stage.pings >= 1, 5,
                         lambda: AssertionError("not connected"), heartbeats=False, liveness=False)
        links.reopen(0)
        stage.send(Message(kind="result", req="r1", seq=1, meta={"trace": []}))
        links.wait_until(lambda: any(m.kind == "result" for _, m, _ in got), 3, lambda: AssertionError("the reply was lost with the old connection"),
                         heartbeats=False, liveness=False)
        assert len(links._links[0].draining) == 1
    finally:
        links.close()


def test_a_probe_counts_a_closed_silent_stage_dead_without_waiting_out_the_grace(stages):
    """In a recovery's probe, a stage whose connection closed and which answers no probe ping is
    dead after ~0.3 s (several round trips), not after the disconnect grace (5 s here) or the
    probe's whole window (3 s): a kill first seen through another stage's error is replaced sooner."""
    a, b = stages(), stages()
    links = _links([a.endpoint, b.endpoint], [], heartbeat_interval_s=1.0, heartbeat_liveness=3, disconnect_grace_s=5.0)
    try:
        for i, s in enumerate((a, b)):
            links.wait_until(lambda: (links.send(i, Message(kind="ping", req="first")) or True) and s.pings >= 1, 5,
                             lambda: AssertionError("no first ping"), heartbeats=False, liveness=False)
        b.close_socket()
        links.wait_until(lambda: links._links[1].disconnected_at is not None, 5, lambda: AssertionError("no disconnect seen"),
                         heartbeats=False, liveness=False)
        t0 = time.monotonic()
        assert links.silent_stages() == [1]
        assert time.monotonic() - t0 < 1.5
    finally:
        links.close()


def test_round_trips_widen_a_window_only_up_to_the_configured_slack():
    from splitnet.edge.links import _Link

    link = _Link(0, "tcp://127.0.0.1:9", None, last_seen=0.0, max_slack_s=ClientConfig().max_rtt_slack_s)
    link.rtts_s.extend([0.05, 0.1])
    assert link.window_s(1.5) == pytest.approx(1.5 + 0.4)  # 4 x the longest round trip
    link.rtts_s.append(1.0)  # a loaded host: pongs a second late
    assert link.window_s(1.5) == pytest.approx(2.9)  # silent 2.9 s at the defaults is down, however slow the pongs were
    with pytest.raises(Exception, match="max_rtt_slack_s"):
        ClientConfig(max_rtt_slack_s=-1)


def test_a_pong_from_a_new_pid_on_the_same_endpoint_is_a_restart_in_place(stages):
    a = stages()
    a.pid = 100
    links = _links([a.endpoint], [], heartbeat_interval_s=0.05)
    try:
        links.wait_until(lambda: links._links[0].pid == 100, 5, lambda: AssertionError("no pong with a pid"))
        since = time.monotonic()
        assert links.restarted_since(since) is None
        a.pid = 101  # the process was restarted between two heartbeats, faster than the disconnect grace
        links.wait_until(lambda: links.restarted_since(since) is not None, 5, lambda: AssertionError("restart not seen"))
        assert links.restarted_since(since) == (0, 100, 101)
        assert links.restarted_since(since, opened_s=since) == (0, 100, 101)  # its request was opened before the restart
        # an idle client learns of a restart from its next request's first pong: that request,
        # opened after the new process started, lost nothing there
        assert links.restarted_since(since, opened_s=time.monotonic()) is None
        assert links.restarted_since(time.monotonic()) is None  # a wait that began after it has nothing to fear
        links.replace(0, a.endpoint)  # a replacement is a new process by design: no restart to report
        assert links._links[0].pid is None and links.restarted_since(since) is None
    finally:
        links.close()
