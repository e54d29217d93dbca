"""Hostile input that once crashed or misled a stage, caught before any allocation or delivery."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from splitnet.errors import LimitExceeded
from splitnet.runtime.peer_replies import DELIVER, HOLD, REFUSE, PeerReplies
from splitnet.wire import DEFAULT_LIMITS, decode_message
from splitnet.wire.limits import frame_cap_bytes, limits_for_input
from splitnet.wire.message import tensor_spec
from splitnet.wire.sockets import SocketConfig, make_socket, recv_bounded

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("shape", [[0, 2**62], [2**62, 0], [0, 2**40, 2**30], [1, 0, 2**63 - 1]])
def test_empty_tensor_with_a_huge_shape_is_refused(shape):
    with pytest.raises(LimitExceeded, match="dimensions"):
        tensor_spec("x", "i64", shape)
    header = msgpack.packb({"v": 1, "kind": "forward", "req": "r", "seq": 0, "epoch": 0,
                            "tensors": [{"name": "x", "dtype": "i64", "shape": shape, "nbytes": 0}], "meta": {}})
    with pytest.raises(LimitExceeded):
        decode_message([header, b""])


def test_empty_tensors_of_sane_shape_still_decode():
    header = msgpack.packb({"v": 1, "kind": "forward", "req": "r", "seq": 0, "epoch": 0,
                            "tensors": [{"name": "x", "dtype": "f32", "shape": [0, 384], "nbytes": 0}], "meta": {}})
    assert decode_message([header, b""]).tensors["x"].shape == (0, 384)


def test_limits_for_input_cap_tensors_and_frames():
    lim = limits_for_input(8 * 2**20)
    assert lim.max_tensor_bytes == lim.max_message_bytes == 8 * 2**20
    assert frame_cap_bytes(lim) == 8 * 2**20
    assert frame_cap_bytes(DEFAULT_LIMITS) == DEFAULT_LIMITS.max_tensor_bytes
    assert SocketConfig().max_message_bytes == frame_cap_bytes(DEFAULT_LIMITS)  # no longer 1 GiB
    with pytest.raises(ValueError):
        limits_for_input(0)


def test_recv_bounded_keeps_at_most_n_frames():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://bounded")
    b.connect("inproc://bounded")
    try:
        a.send_multipart([b"h", *([b""] * 10_000)])
        frames, dropped = recv_bounded(b, 66)
        assert len(frames) == 66 and dropped == 10_001 - 66
        a.send_multipart([b"one", b"two"])
        frames, dropped = recv_bounded(b, 66)
        assert [f.bytes for f in frames] == [b"one", b"two"] and dropped == 0
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_handshake_timeout_is_set_on_every_socket():
    ctx = zmq.Context()
    s = make_socket(ctx, zmq.ROUTER, SocketConfig(handshake_timeout_ms=1234))
    try:
        assert s.getsockopt(zmq.HANDSHAKE_IVL) == 1234
    finally:
        s.close(0)
        ctx.term()
    with pytest.raises(ValueError, match="handshake"):
        SocketConfig(handshake_timeout_ms=0)


def test_peer_replies_follow_the_key_not_the_routing_id():
    pr = PeerReplies(hold_s=1.0)
    assert pr.decide(b"r", "") == DELIVER  # no keys: nothing to bind to
    assert pr.decide(b"r", "K" * 40) == HOLD  # never seen: prove it first
    pr.seen(b"r", "K" * 40)
    assert pr.decide(b"r", "K" * 40) == DELIVER
    assert pr.decide(b"r", "A" * 40) == REFUSE  # another client's result never goes to K's connection
    pr.connections_changed()  # a connection dropped somewhere: whoever holds r now must say so again
    assert pr.decide(b"r", "K" * 40) == HOLD
    assert pr.hold(b"r", "K" * 40, [b"result"])
    assert pr.hold(b"r", "A" * 40, [b"other"])
    pr.seen(b"r", "A" * 40)  # a squatter with A's key speaks on r: it gets A's result only
    assert pr.ready(b"r") == [[b"other"]]
    assert pr.refused == 1 and not pr.waiting_routes()


def test_peer_replies_expire_and_are_bounded():
    pr = PeerReplies(hold_s=0.0, max_held_per_route=2, max_held_routes=1)
    assert pr.hold(b"r", "K" * 40, [b"1"]) and pr.hold(b"r", "K" * 40, [b"2"])
    assert not pr.hold(b"r", "K" * 40, [b"3"]) and not pr.hold(b"s", "K" * 40, [b"x"])
    assert pr.expire() == 2 and not pr.waiting_routes()
