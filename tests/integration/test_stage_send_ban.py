"""A stage that could not send to the next one fails further sends there at once for a while (so a
dead peer does not stall its compute thread again and again), but a peer that can take messages
again (restarted on the same endpoint, a healed link) is sent to at once, not after the ban."""

from __future__ import annotations

import time

import zmq

from splitnet.runtime.config import StageWorkerConfig
from splitnet.runtime.worker import StageWorker
from splitnet.wire.message import Message, decode_message


def _router(ctx: zmq.Context, endpoint: str, timeout_s: float = 5.0) -> zmq.Socket:
    """Bind a ROUTER on `endpoint`, retrying while a socket closed just before still holds the port:
    zmq closes a listener on its I/O thread, after `close()` has returned."""
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r.bind(endpoint)
            return r
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                r.close(linger=0)
                raise
            time.sleep(0.02)


def _received(r: zmq.Socket, timeout_ms: int) -> Message | None:
    if not r.poll(timeout_ms):
        return None
    return decode_message(r.recv_multipart()[1:])


def test_a_peer_back_on_the_same_endpoint_ends_the_ban():
    w = StageWorker(StageWorkerConfig(model="tiny-gpt2", start_block=0, end_block=1, warm_up=False, send_timeout_ms=2000))
    ctx, peers = w.ctx, {}
    probe = ctx.socket(zmq.ROUTER)
    probe.bind("tcp://127.0.0.1:*")
    endpoint = probe.getsockopt_string(zmq.LAST_ENDPOINT)
    probe.close(linger=0)
    try:
        r = _router(ctx, endpoint)
        w._send(peers, endpoint, Message(kind="forward", req="a", seq=0))
        assert _received(r, 5000).req == "a"  # the peer took a message: it is known to be up
        r.close(linger=0)  # the next stage dies
        time.sleep(0.3)
        w._send(peers, endpoint, Message(kind="forward", req="b", seq=0))  # no connection: gone, banned
        assert w._banned, "a send to a vanished peer starts a ban"
        r = _router(ctx, endpoint)  # restarted on the same endpoint
        sock = peers[(endpoint, None)]
        deadline = time.monotonic() + 5
        while not sock.poll(0, zmq.POLLOUT) and time.monotonic() < deadline:
            time.sleep(0.02)  # zmq reconnects on its own
        w._send(peers, endpoint, Message(kind="forward", req="c", seq=0))
        got = _received(r, 5000)
        assert got is not None and got.req == "c"  # sent at once, seconds before the ban would end
        assert not w._banned
        r.close(linger=0)
    finally:
        for s in peers.values():
            s.close(linger=0)
        w.metrics.close()
