"""The sealed transport (splitnet.wire.sealed): round trips over real sockets, and every way a
message can be forged, altered, replayed, reflected or sent by the wrong key is refused."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet.errors import AuthError
from splitnet.wire import Message, SocketConfig, decode_message, encode_message, make_socket
from splitnet.wire.sealed import ENVELOPE_BYTES, SealedSocket, SealRejected, SealState, is_sealed
from splitnet.wire.security import CurveConfig, generate_keypair, load_keypair, set_peer_key

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("sealkeys")
    for n in ("server", "client", "other"):
        generate_keypair(d, n)
    return {n: load_keypair(d / f"{n}.key_secret") for n in ("server", "client", "other")}


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _pair(ctx, keys, client="client", server_key=None, allow=("client",)):
    srv = keys["server"]
    r = make_socket(ctx, zmq.ROUTER, SocketConfig(security=CurveConfig(srv, allow_keys=tuple(keys[a].public for a in allow), allow_self=False)), server=True)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    q = make_socket(ctx, zmq.DEALER, SocketConfig(security=CurveConfig(keys[client], server_key=server_key or srv.public, allow_self=False)))
    q.connect(f"tcp://127.0.0.1:{port}")
    return r, q, port


def _recv(sock, timeout_ms=2000):
    assert sock.poll(timeout_ms), "nothing arrived"
    return sock.recv_multipart(copy=False)


def test_round_trip_both_directions_and_bytes_are_encrypted(ctx, keys):
    r, q, _ = _pair(ctx, keys)
    assert isinstance(r, SealedSocket) and isinstance(q, SealedSocket)
    a = np.arange(4096, dtype=np.float32).reshape(64, 64)
    q.send_multipart(encode_message(Message("forward", req="r1", tensors={"h": a}, meta={"x": 1})), copy=False)
    frames = _recv(r)
    msg = decode_message(frames[1:])
    assert msg.req == "r1" and msg.meta["x"] == 1
    np.testing.assert_array_equal(msg.tensors["h"], a)
    r.send_multipart([frames[0], *encode_message(Message("result", req="r1", tensors={"h": a * 2}))], copy=False)
    back = decode_message(_recv(q))
    np.testing.assert_array_equal(back.tensors["h"], a * 2)
    # copy=True gives bytes, as pyzmq does
    q.send_multipart(encode_message(Message("ping", req="p")))
    assert decode_message(r.recv_multipart()[1:] if r.poll(2000) else []).kind == "ping"


def test_wire_bytes_are_not_the_plaintext(keys):
    """Seal by hand: the tensor bytes do not appear in the sealed frames, and opening restores them."""
    srv, cli = keys["server"], keys["client"]
    client = SealState(cli.secret, cli.public, server=False, router=False, peer_key_z85=srv.public)
    server = SealState(srv.secret, srv.public, server=True, router=True, allow={cli.public})
    secret = b"attack at dawn " * 100
    sealed = client.seal([b"header", secret], None)
    assert is_sealed(sealed[0]) and len(sealed[0]) == ENVELOPE_BYTES and len(sealed) == 3
    assert all(secret[:32] not in bytes(f) for f in sealed)
    opened = server.open(sealed, b"id", copy=True)
    assert opened == [b"header", secret]


def _states(keys, client="client", allow=("client",), server_key=None):
    srv = keys["server"]
    c = SealState(keys[client].secret, keys[client].public, server=False, router=False, peer_key_z85=server_key or srv.public)
    s = SealState(srv.secret, srv.public, server=True, router=True, allow={keys[a].public for a in allow})
    return c, s


def test_unlisted_client_is_refused(keys):
    c, s = _states(keys, client="other")
    with pytest.raises(SealRejected, match="allow-list"):
        s.open(c.seal([b"h"], None), b"id", copy=True)


def test_wrong_server_key_is_refused(keys):
    c, s = _states(keys, server_key=keys["other"].public)
    with pytest.raises(SealRejected, match="server key"):
        s.open(c.seal([b"h"], None), b"id", copy=True)


@pytest.mark.parametrize("where", ["envelope", "frame"])
def test_any_flipped_bit_is_refused(keys, where):
    c, s = _states(keys)
    sealed = [bytearray(bytes(f)) for f in c.seal([b"header", b"x" * 100], None)]
    if where == "envelope":
        sealed[0][-5] ^= 1  # inside the nonce prefix (part of the associated data)
    else:
        sealed[2][10] ^= 0x80
    with pytest.raises(SealRejected):
        s.open([bytes(f) for f in sealed], b"id", copy=True)


def test_replay_reorder_drop_and_reflection_are_refused(keys):
    c, s = _states(keys)
    m1, m2 = c.seal([b"one"], None), c.seal([b"two"], None)
    assert s.open(m2, b"id", copy=True) == [b"two"]
    with pytest.raises(SealRejected, match="replayed"):
        s.open(m1, b"id", copy=True)  # older counter after a newer one
    with pytest.raises(SealRejected, match="replayed"):
        s.open(m2, b"id", copy=True)  # the same message again
    m3 = c.seal([b"a", b"b"], None)
    with pytest.raises(SealRejected, match="frames"):
        s.open(m3[:2], b"id", copy=True)  # a frame dropped
    with pytest.raises(SealRejected):
        s.open([m3[0], m3[2], m3[1]], b"id", copy=True)  # frames swapped
    reply = s.seal([encode_message(Message("pong"))[0]], b"id")
    with pytest.raises(SealRejected, match="wrong direction"):
        s.open(reply, b"id", copy=True)  # a server's reply reflected back at it
    assert decode_message(c.open(reply, b"", copy=True)).kind == "pong"


def test_unsealed_traffic(keys):
    c, s = _states(keys)
    plain = encode_message(Message("forward", req="x"))
    with pytest.raises(SealRejected, match="unsealed message"):
        s.open(plain, b"id", copy=True)
    # the server answers an unauthenticated peer only with an error, in the clear
    err = encode_message(Message("error", meta={"status": "error", "code": "auth", "msg": "no"}))
    assert s.seal(err, b"stranger") is None
    with pytest.raises(AuthError, match="not authenticated"):
        s.seal(plain, b"stranger")
    # and a client accepts plaintext errors only
    assert c.open(err, b"", copy=True) == err
    with pytest.raises(SealRejected):
        c.open(encode_message(Message("result", req="x")), b"", copy=True)


def test_insecure_side_names_the_mismatch(keys):
    c, _ = _states(keys)
    with pytest.raises(AuthError, match="--insecure"):
        decode_message(c.seal(encode_message(Message("ping")), None))


def test_set_peer_key_rekeys_a_connecting_socket(ctx, keys):
    sock = make_socket(ctx, zmq.DEALER, SocketConfig(security=CurveConfig(keys["client"], server_key=keys["other"].public)))
    old = sock.seal.client_session.key
    set_peer_key(sock, keys["server"].public)
    assert sock.seal.client_session.key != old and sock.seal.client_session.next_out == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4), st.integers(0, 3))
def test_fuzzed_frames_only_raise_typed_errors(keys, frames, mode):
    c, s = _states(keys)
    if mode:  # start from a valid sealed message and splice random bytes in
        sealed = [bytes(f) for f in c.seal([b"h", b"body"], None)]
        i = mode % len(sealed)
        sealed[i] = sealed[i][: len(frames[0])] + frames[0]
        frames = sealed + frames[1:]
    try:
        s.open(frames, b"id", copy=True)
    except SealRejected:
        pass


def test_stage_answers_a_refused_client_and_keeps_serving(ctx, keys):
    """A live ROUTER loop as the stage worker runs it: the unlisted client gets an auth error
    in the clear, the listed client is served after it."""
    srv = keys["server"]
    r = make_socket(ctx, zmq.ROUTER, SocketConfig(security=CurveConfig(srv, allow_keys=(keys["client"].public,), allow_self=False)), server=True)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    bad = make_socket(ctx, zmq.DEALER, SocketConfig(security=CurveConfig(keys["other"], server_key=srv.public, allow_self=False)))
    good = make_socket(ctx, zmq.DEALER, SocketConfig(security=CurveConfig(keys["client"], server_key=srv.public, allow_self=False)))
    for s in (bad, good):
        s.connect(f"tcp://127.0.0.1:{port}")
    time.sleep(0.1)
    bad.send_multipart(encode_message(Message("info", req="i")))
    with pytest.raises(SealRejected) as e:
        _recv(r)
    r.send_multipart([e.value.identity, *encode_message(Message("error", meta={"status": "error", "code": "auth", "msg": str(e.value)}))])
    answer = decode_message(_recv(bad))
    assert answer.kind == "error" and "allow-list" in answer.meta["msg"]
    good.send_multipart(encode_message(Message("info", req="j")))
    frames = _recv(r)
    assert decode_message(frames[1:]).req == "j"


def test_pooled_buffers_are_never_reused_while_referenced(keys):
    """Opened frames come from a reuse pool: a message the reader still holds must keep its bytes
    while later messages are opened, and a released buffer is taken again."""
    c, s = _states(keys)
    big = [np.full(1 << 17, i, np.uint8) for i in range(12)]
    held = [decode_message(s.open(c.seal(encode_message(Message("forward", tensors={"h": b})), None), b"id", copy=False)) for b in big]
    for i, m in enumerate(held):
        assert (m.tensors["h"] == i).all(), f"message {i} was overwritten by a later one"
    pooled = {b.ctypes.data for b in s.open_pool.bufs}  # addresses only: a reference would pin them
    assert len(pooled) == 8
    del held, m
    again = s.open(c.seal([b"x" * (1 << 17)], None), b"id", copy=False)
    assert np.frombuffer(again[0].buffer, np.uint8).ctypes.data in pooled, "a released buffer was not reused"


def test_send_pool_bounds_in_flight_buffers():
    from splitnet.wire.sealed import _BufferPool

    pool = _BufferPool(max_buffers=2, min_bytes=16)
    a, b = pool.get(64), pool.get(64)
    t0 = time.monotonic()
    assert pool.get(64, wait_s=0.05) is None  # both in flight: waits, then gives up (unpooled)
    assert time.monotonic() - t0 >= 0.05
    del a
    c = pool.get(64, wait_s=1.0)
    assert c is not None and len(pool.bufs) == 2 and np.shares_memory(c, pool.bufs[0])
    assert pool.get(8) is None  # small frames are not pooled (pyzmq copies them anyway)
    del b, c
