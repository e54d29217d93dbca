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
        make_codec("alignedvq", stages=1, nbits=6, niter=3).fit(cal, progress=False).fit_sequence_correction(
            cal, [30] * 100, bits_per_sequence=50),  # + a second part: the per-sequence correction
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


def _fp16_payload(n_values: int):
    return make_codec("fp16").encode(np.arange(n_values, dtype=np.float32).reshape(1, -1))


@pytest.mark.timeout(60)
def test_small_parts_ride_inline_large_parts_as_frames(pair):
    from splitnet.codecs.framing import INLINE_PART_MAX_BYTES

    a, b = pair
    small = _fp16_payload(INLINE_PART_MAX_BYTES // 2)  # exactly the limit: inline
    large = _fp16_payload(INLINE_PART_MAX_BYTES // 2 + 1)  # one value more: a frame
    for p, framed in ((small, False), (large, True)):
        tensors, meta = {}, {}
        attach_payloads(tensors, meta, {"h": p})
        assert bool(tensors) is framed
        assert ("p" in meta["codecs"]["h"]) is not framed
        n, got = _send_recv(a, b, Message(kind="forward", tensors=tensors, meta=meta))
        assert n - message_nbytes(encode_message(Message(kind="forward"))) == payload_wire_nbytes(p, "h")
        _, payloads = extract_payloads(got.tensors, got.meta)
        np.testing.assert_array_equal(make_codec("fp16").decode(payloads["h"]), make_codec("fp16").decode(p))
    # the inline form saves the tensor descriptor: per byte of data, it is cheaper
    assert small.nbytes - INLINE_PART_MAX_BYTES < large.nbytes - (INLINE_PART_MAX_BYTES + 2) - 20


def test_entry_round_trips_hash_dtype_and_meta():
    from splitnet.codecs.base import Payload

    for h in ("0123456789abcdef", "", "not-hex"):
        p = Payload("c", h, (2, 3), "float16", {"b": np.arange(5, dtype=np.uint8)}, {"z": 1})
        _, got = extract_payloads({}, {"codecs": {"x": p.header_entry()}})
        q = got["x"]
        assert (q.codec, q.codebook_hash, q.shape, q.dtype, dict(q.meta)) == ("c", h, (2, 3), "float16", {"z": 1})
        np.testing.assert_array_equal(q.parts["b"], p.parts["b"])
    e = Payload("c", "00ff", (1,), "float32").header_entry()
    assert set(e) == {"c", "h", "s"}  # float32, no meta, no parts: nothing else is sent


@pytest.mark.parametrize(
    "bad",
    [
        {"c": "fp16", "s": [1, 4], "p": {"b": ["f16", [1, 4], b"\0" * 7]}},  # bytes do not match shape
        {"c": "fp16", "s": [1, 4], "p": {"b": ["obj", [8], b"\0" * 8]}},  # dtype off the allow-list
        {"c": "fp16", "s": [1, 4], "p": {"b": ["u8", [-8], b""]}},  # negative dimension
        {"c": "fp16", "s": [1, 4], "p": {"b": ["u8", [8]]}},  # not [dtype, shape, bytes]
        {"c": "fp16", "s": [1, 4], "p": {"b": ["u8", [8], "x" * 8]}},  # a string, not bytes
        {"c": "fp16", "s": [1, 4], "p": ["u8", [8], b"\0" * 8]},  # parts not a map
        {"c": "fp16", "s": [1, 4], "h": 7},  # hash neither bytes nor str
        {"c": "fp16", "s": [1, -4]},
        {"c": "fp16"},  # no shape
        {"s": [1, 4]},  # no codec
    ],
)
def test_malformed_entries_raise_protocol_error(bad):
    from splitnet.errors import ProtocolError

    with pytest.raises(ProtocolError):
        extract_payloads({}, {"codecs": {"x": bad}})


def test_part_inline_and_framed_at_once_is_refused():
    from splitnet.errors import ProtocolError

    entry = _fp16_payload(4).header_entry()
    with pytest.raises(ProtocolError, match="both inline and as a frame"):
        extract_payloads({"x.d": np.zeros(8, np.uint8)}, {"codecs": {"x": entry}})


@pytest.mark.timeout(60)
def test_compact_form_bytes_equal_bytes_on_socket(pair, codecs):
    """A cached request's decode step: what the cut codec adds to the forward message (the compact
    codes, or the full entry for a codec without a compact form) is exactly cut_wire_nbytes."""
    from splitnet.runtime.cut_codec import COMPACT_KEY, CutCodecs, cut_wire_nbytes
    from splitnet.wire.headers import ForwardHeader

    a, b = pair
    rng = np.random.default_rng(2)
    header = dict(reply_to="peer:" + "0" * 32, route=("tcp://127.0.0.1:5555",), cache=True, pos=37, head="argmax")
    base = Message(kind="forward", req="0" * 16, seq=4, tensors={}, meta=ForwardHeader(**header).to_meta())
    n_base, _ = _send_recv(a, b, base)
    compact_seen = 0
    for codec in codecs:
        tx, rx = CutCodecs(), CutCodecs()
        tx.out = codec
        if codec.codebook_hash:
            rx.by_hash[codec.codebook_hash] = codec
        first_t, first_m = tx.encode({"hidden": rng.standard_normal((1, 37, 32)).astype(np.float32)}, context=("r", 0), pos=0)
        rx.decode(first_t, first_m, context=("r", 0))  # the prefill binds the request
        x = rng.standard_normal((1, 1, 32)).astype(np.float32)
        tensors, meta = tx.encode({"hidden": x}, context=("r", 0), pos=37)
        msg = Message(kind="forward", req="0" * 16, seq=4, tensors=tensors, meta=ForwardHeader(**header, **meta).to_meta())
        n_with, got = _send_recv(a, b, msg)
        assert n_with - n_base == cut_wire_nbytes(tensors, meta)[0], codec.name
        y = rx.decode(got.tensors, got.meta, context=("r", 0))["hidden"]
        np.testing.assert_array_equal(y, codec.decode(codec.encode(x)))
        compact_seen += COMPACT_KEY in meta
    assert compact_seen >= 5  # fp32, fp16, pq, rvq, alignedvq 3x9 at least go compact; multi-part ones keep the full entry
