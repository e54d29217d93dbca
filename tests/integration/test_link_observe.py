"""The session's public message hook (``StageLinks.observe`` / ``Session.observe``): every
message sent and received, and every reply used, reaches the observer with its (stage, kind,
req, seq, epoch, bytes); a stopped observer hears nothing more. Real sockets on 127.0.0.1; the
suspects of a failed recovery attempt count as dead at once."""

from __future__ import annotations

import time

import pytest
import zmq

from splitnet.edge.config import ClientConfig
from splitnet.edge.links import LinkEvent, StageLinks
from splitnet.wire import Message, SocketConfig, decode_message
from fake_stage import FakeStage

pytestmark = pytest.mark.timeout(60)


def _answer(msg: Message) -> Message | None:
    """Pongs for pings, a result for each forward."""
    if msg.kind == "ping":
        return Message(kind="pong", req=msg.req, seq=msg.seq, meta={"t": msg.meta.get("t")})
    if msg.kind == "forward":
        return Message(kind="result", req=msg.req, seq=msg.seq, epoch=msg.epoch, meta={"trace": [{"stage": 0, "compute_ms": 1.0}]})
    return None


def Stage(answer: bool = True) -> FakeStage:  # noqa: N802 - reads as the stage it stands for
    """A stage that answers pings and forwards (``answer=False``: one that says nothing)."""
    return FakeStage(_answer if answer else (lambda msg: None))


def _links(endpoints: list[str], on_message=lambda *_: None, **cfg) -> StageLinks:
    config = ClientConfig(**{"heartbeat_interval_s": 0.1, "heartbeat_liveness": 3, **cfg})
    links = StageLinks(endpoints, config, SocketConfig(), None, b"observe-client-0001", on_message)
    links.end_handshake()
    return links


def test_observer_sees_sends_receives_and_uses_then_stops():
    stage = Stage()
    got: list[Message] = []
    links = _links([stage.endpoint], lambda _i, msg, _n: got.append(msg))
    events: list[LinkEvent] = []
    try:
        stop = links.observe(events.append)
        msg = Message(kind="forward", req="r1", seq=3, epoch=2, meta={"reply_to": "peer:00"})
        links.wait_until(lambda: links.send(0, msg), 5, lambda: TimeoutError("not sent"))
        links.wait_until(lambda: any(m.kind == "result" for m in got), 5, lambda: TimeoutError("no result"))
        result = next(m for m in got if m.kind == "result")
        links.note_used(0, result, 77)
        sent = [e for e in events if e.direction == "send" and e.kind == "forward"]
        assert [e.queued for e in sent][-1] and sum(e.queued for e in sent) == 1, "a refused send is reported with queued=False"
        assert (sent[-1].stage, sent[-1].req, sent[-1].seq, sent[-1].epoch) == (0, "r1", 3, 2) and sent[-1].nbytes > 0
        recv = [e for e in events if e.direction == "recv" and e.kind == "result"]
        assert len(recv) == 1 and (recv[0].req, recv[0].seq, recv[0].epoch) == ("r1", 3, 2)
        assert recv[0].trace and recv[0].trace[0]["compute_ms"] == 1.0
        used = [e for e in events if e.direction == "use"]
        assert len(used) == 1 and used[0].req == "r1" and used[0].nbytes == 77
        assert any(e.direction == "send" and e.kind == "ping" for e in events), "heartbeats are messages too"
        stop()
        n = len(events)
        links.ping_all()
        links.poll(0.2)
        assert len(events) == n
    finally:
        links.close()
        stage.close()


def test_a_suspect_that_has_said_nothing_since_it_was_connected_counts_as_dead_at_once():
    live, mute, other = Stage(), Stage(answer=False), Stage()
    links = _links([live.endpoint, other.endpoint], heartbeat_interval_s=1.0)  # a 3 s window: answers have time on a loaded machine
    try:
        links.replace(1, mute.endpoint)
        t0 = time.monotonic()
        assert links.silent_stages([1]) == [1]
        assert time.monotonic() - t0 < links.window_s, "a suspect should not be probed for a whole window"
        links.replace(1, other.endpoint)
        links.wait_until(lambda: links.silent_s(1) < 0.05 and links._links[1].last_seen > links._links[1].replaced_at, 5,
                         lambda: TimeoutError("the live stage said nothing"))
        assert links.silent_stages([1]) == [], "a suspect that answered is alive"
    finally:
        links.close()
        for s in (live, mute, other):
            s.close()


def test_a_release_sent_while_the_stage_is_unreachable_is_sent_once_it_is_back():
    import socket

    with socket.socket() as probe:  # a port nothing listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    links = _links([f"tcp://127.0.0.1:{port}"])
    try:
        assert not links.send(0, Message(kind="release", req="gone-1")), "no connection yet: the release cannot be queued"
        stage = zmq.Context.instance().socket(zmq.ROUTER)
        stage.bind(f"tcp://127.0.0.1:{port}")
        releases: list[str] = []

        def got_release() -> bool:
            while stage.poll(0):
                _, *body = stage.recv_multipart()
                msg = decode_message(body)
                if msg.kind == "release":
                    releases.append(msg.req)
            return bool(releases)

        links.wait_until(got_release, 10, lambda: TimeoutError("the held release was never sent"), heartbeats=False, liveness=False)
        assert releases == ["gone-1"]
        stage.close(linger=0)
    finally:
        links.close()


def test_a_stage_whose_connection_closes_during_the_probe_is_found_within_the_grace_not_the_window():
    live, dying = Stage(), Stage()
    links = _links([live.endpoint, dying.endpoint], heartbeat_interval_s=1.0, disconnect_grace_s=0.3)  # window 3 s
    try:
        links.wait_until(lambda: all(links.silent_s(i) < 0.5 and links._links[i].last_seen > 0 for i in range(2)), 5,
                         lambda: TimeoutError("no stage answered"))
        links.ping_all()
        links.poll(0.2)
        dying.close()  # its socket closes: the client's monitor sees the disconnect
        t0 = time.monotonic()
        assert links.silent_stages() == [1]
        assert time.monotonic() - t0 < links.window_s, "the probe waited a whole window for a stage whose connection closed"
    finally:
        links.close()
        live.close()
