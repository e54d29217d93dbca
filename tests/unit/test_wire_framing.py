"""Framing round-trips and the typed errors for malformed messages."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from splitnet.errors import LimitExceeded, ProtocolError
from splitnet.wire import Message, WireLimits, decode_message, encode_message, message_nbytes


def roundtrip(tensors, **kw):
    frames = encode_message(Message(kind="forward", req="r1", seq=3, epoch=1, tensors=tensors, **kw))
    return decode_message([bytes(f) for f in frames])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_roundtrip_torch_dtypes(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    m = roundtrip({"x": t})
    assert m.req == "r1" and m.seq == 3 and m.epoch == 1
    out = m.torch("x")
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_])
def test_roundtrip_numpy_dtypes(dtype):
    a = (np.random.default_rng(0).standard_normal((4, 6)) * 10).astype(dtype)
    m = roundtrip({"a": a})
    np.testing.assert_array_equal(m.tensors["a"], a)
    assert m.tensors["a"].dtype == a.dtype


def test_empty_tensor_and_no_tensors():
    m = roundtrip({"e": np.zeros((0, 384), np.float32)})
    assert m.tensors["e"].shape == (0, 384)
    m = roundtrip({})
    assert m.tensors == {}


def test_non_contiguous_tensors():
    t = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # transposed view
    assert not t.is_contiguous()
    assert torch.equal(roundtrip({"t": t}).torch("t"), t)
    a = np.arange(48, dtype=np.float32).reshape(6, 8)[:, ::2]
    np.testing.assert_array_equal(roundtrip({"a": a}).tensors["a"], a)


def test_big_endian_numpy_is_sent_little_endian():
    a = np.arange(5, dtype=">f4")
    np.testing.assert_array_equal(roundtrip({"a": a}).tensors["a"], a.astype("<f4"))


def test_buffers_are_not_copied_on_encode():
    a = np.arange(1 << 16, dtype=np.float32)
    frames = encode_message(Message(kind="forward", tensors={"a": a}))
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.float32), a)


def test_message_nbytes_counts_header_and_frames():
    a = np.zeros((10, 10), np.float32)
    frames = encode_message(Message(kind="forward", tensors={"a": a}))
    assert message_nbytes(frames) == len(frames[0]) + 400


def _frames(**header_overrides):
    a = np.arange(6, dtype=np.float32)
    frames = [bytes(f) for f in encode_message(Message(kind="forward", req="x", tensors={"a": a}))]
    header = msgpack.unpackb(frames[0])
    header.update(header_overrides)
    frames[0] = msgpack.packb(header)
    return frames


def test_truncated_frame():
    frames = _frames()
    frames[1] = frames[1][:-3]
    with pytest.raises(ProtocolError, match="frame has 21 bytes"):
        decode_message(frames)


def test_wrong_byte_count_in_descriptor():
    frames = _frames()
    header = msgpack.unpackb(frames[0])
    header["tensors"][0]["nbytes"] = 999
    frames[0] = msgpack.packb(header)
    with pytest.raises(ProtocolError, match="descriptor says 999 bytes"):
        decode_message(frames)


def test_shape_that_disagrees_with_the_frame():
    frames = _frames()
    header = msgpack.unpackb(frames[0])
    header["tensors"][0]["shape"] = [7]
    header["tensors"][0]["nbytes"] = 28
    frames[0] = msgpack.packb(header)
    with pytest.raises(ProtocolError):
        decode_message(frames)


def test_unknown_version():
    with pytest.raises(ProtocolError, match="protocol version 99"):
        decode_message(_frames(v=99))


def test_object_dtype_is_refused_on_both_sides():
    with pytest.raises(TypeError):
        encode_message(Message(kind="forward", tensors={"o": np.array([object()], dtype=object)}))
    frames = _frames()
    header = msgpack.unpackb(frames[0])
    header["tensors"][0]["dtype"] = "object"
    frames[0] = msgpack.packb(header)
    with pytest.raises(ProtocolError, match="allow-list"):
        decode_message(frames)


def test_oversized_msgpack_header():
    frames = _frames()
    with pytest.raises(LimitExceeded, match="header frame"):
        decode_message(frames, WireLimits(max_header_bytes=16))
    huge = _frames(meta={"junk": "x" * 100_000})
    with pytest.raises(LimitExceeded):
        decode_message(huge)


def test_wrong_frame_count():
    frames = _frames()
    with pytest.raises(ProtocolError, match="1 tensors but the message has 2"):
        decode_message(frames + [b"extra"])
    with pytest.raises(ProtocolError, match="has 0 tensor frames"):
        decode_message(frames[:1])
    with pytest.raises(ProtocolError, match="empty message"):
        decode_message([])


def test_garbage_header_and_wrong_types():
    with pytest.raises(ProtocolError):
        decode_message([b"\xc1\xff\x00"])
    with pytest.raises(ProtocolError, match="map"):
        decode_message([msgpack.packb([1, 2, 3])])
    with pytest.raises(ProtocolError, match="'seq'"):
        decode_message(_frames(seq="zero"))
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode_message(_frames(kind="launch_missiles"))


def test_too_many_tensors_and_too_large_tensor():
    tensors = {f"t{i}": np.zeros(1, np.float32) for i in range(5)}
    frames = [bytes(f) for f in encode_message(Message(kind="forward", tensors=tensors))]
    with pytest.raises(LimitExceeded, match="5 tensors"):
        decode_message(frames, WireLimits(max_tensors=4))
    with pytest.raises(LimitExceeded, match="over the limit"):
        decode_message(_frames(), WireLimits(max_tensor_bytes=8, max_message_bytes=8))


def test_negative_or_bool_dims_are_refused():
    for shape in ([-1], [True], [1.5]):
        frames = _frames()
        header = msgpack.unpackb(frames[0])
        header["tensors"][0]["shape"] = shape
        frames[0] = msgpack.packb(header)
        with pytest.raises(ProtocolError, match="invalid shape"):
            decode_message(frames)
