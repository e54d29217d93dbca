"""Property tests: any allowed tensor set round-trips exactly; the socket factory sets its limits."""

from __future__ import annotations

import numpy as np
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from splitnet.wire import Message, SocketConfig, decode_message, encode_message, make_socket

DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8, np.bool_]


@st.composite
def tensor_sets(draw):
    n = draw(st.integers(0, 4))
    out = {}
    for i in range(n):
        dt = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
        out[f"t{i}"] = draw(arrays(dt, tuple(shape)))
    return out


@settings(max_examples=150, deadline=None)
@given(tensor_sets(), st.text(max_size=20), st.integers(0, 2**31), st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1), max_size=4))
def test_any_tensor_set_roundtrips(tensors, req, seq, meta):
    frames = encode_message(Message(kind="forward", req=req, seq=seq, tensors=tensors, meta=meta))
    m = decode_message([bytes(f) for f in frames])
    assert (m.req, m.seq, dict(m.meta)) == (req, seq, meta)
    assert set(m.tensors) == set(tensors)
    for k, v in tensors.items():
        got = m.tensors[k]
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)


def test_socket_factory_applies_config():
    ctx = zmq.Context.instance()
    cfg = SocketConfig(linger_ms=7, send_hwm=11, recv_hwm=13, max_message_bytes=1 << 20, send_timeout_ms=99)
    s = make_socket(ctx, zmq.DEALER, cfg)
    try:
        assert s.getsockopt(zmq.LINGER) == 7
        assert s.getsockopt(zmq.SNDHWM) == 11 and s.getsockopt(zmq.RCVHWM) == 13
        assert s.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
        assert s.getsockopt(zmq.SNDTIMEO) == 99
        assert s.getsockopt(zmq.IMMEDIATE) == 1
    finally:
        s.close()


def test_unencodable_meta_is_a_type_error():
    import pytest

    with pytest.raises(TypeError, match="cannot be encoded"):
        encode_message(Message(kind="forward", meta={"big": 2**70}))
    with pytest.raises(TypeError, match="cannot be encoded"):
        encode_message(Message(kind="forward", meta={"obj": object()}))
    # the packer is reusable after a failure
    assert decode_message(encode_message(Message(kind="ping", meta={"ok": 1}))).meta == {"ok": 1}


def test_socket_config_rejects_unbounded_sends():
    import pytest

    with pytest.raises(ValueError, match="send_timeout_ms"):
        SocketConfig(send_timeout_ms=0)
