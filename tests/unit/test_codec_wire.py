"""Payload.nbytes is exactly what a payload adds to a message sent on a real ZeroMQ socket."""

import numpy as np
import pytest
import zmq

from splitnet.codecs import make_codec
from splitnet.codecs.framing import attach_payloads, extract_payloads, payload_wire_nbytes
from splitnet.wire.message import Message, decode_message, encode_message, message_nbytes
from splitnet.wire.sockets import make_socket


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a = make_socket(ctx, zmq.PAIR, server=True)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b = make_socket(ctx, zmq.PAIR)
    b.connect(f"tcp://127.0.0.1:{port}")
    yield a, b
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()


def _send_recv(a, b, msg: Message) -> tuple[int, Message]:
    a.send_multipart(encode_message(msg), copy=False)
    assert b.poll(5000), "no message within 5 s"
    frames = b.recv_multipart(copy=False)
    return sum(len(f.bytes) for f in frames), decode_message(frames)


@pytest.fixture(scope="module")
def codecs():
    rng = np.random.default_rng(0)
    cal = rng.standard_normal((3000, 32)).astype(np.float32)
    return [
        make_codec("fp32"), make_codec("fp16"), make_codec("int4"), make_codec("topk", k=4),
        make_codec("pq", m=4, nbits=5, niter=3).fit(cal, progress=False),
        make_codec("rvq", stages=2, nbits=7, niter=3, beam=1).fit(cal, progress=False),
        make_codec("alignedvq", stages=3, nbits=9, niter=3).fit(cal, progress=False),
        make_codec("alignedvq", stages=1, nbits=6, niter=3, norm="token").fit(cal, progress=False),
        make_codec("alignedvq", stages=1, nbits=6, niter=3, entropy="order1").fit(
            cal, progress=False, anchor_labels=rng.integers(0, 40, cal.shape[0])),  # range-coded anchors
        make_codec("alignedvq", stages=2, nbits=6, niter=3, entropy="context").fit(
            cal, progress=False, anchor_labels=rng.integers(0, 40, cal.shape[0])),  # residual indices too
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["x", "hidden"])
def test_nbytes_equals_bytes_on_socket(pair, codecs, name):
    a, b = pair
    x = np.random.default_rng(1).standard_normal((1, 37, 32)).astype(np.float32)
    mask = np.ones((1, 37), np.int64)
    base = Message(kind="forward", req="r1", seq=3, tensors={"attention_mask": mask}, meta={})
    n_base, _ = _send_recv(a, b, base)
    assert n_base == message_nbytes(encode_message(base))
    for codec in codecs:
        p = codec.encode(x)
        tensors, meta = {"attention_mask": mask}, {}
        attach_payloads(tensors, meta, {name: p})
        n_with, got = _send_recv(a, b, Message(kind="forward", req="r1", seq=3, tensors=tensors, meta=meta))
        assert n_with - n_base == payload_wire_nbytes(p, name), codec.name
        if name == "x":
            assert n_with - n_base == p.nbytes
        raw, payloads = extract_payloads(got.tensors, got.meta)
        assert set(raw) == {"attention_mask"}
        y = codec.decode(payloads[name])
        np.testing.assert_array_equal(y, codec.decode(p))
        assert y.shape == x.shape
