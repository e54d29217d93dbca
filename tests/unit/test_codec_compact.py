"""The compact form of a cut payload (meta.cc): bound per request by a full entry, refused when
unbound, validated like a full entry, and never decoded with another codebook."""

from __future__ import annotations

import numpy as np
import pytest

from splitnet.codecs import make_codec
from splitnet.codecs.framing import (
    COMPACT_KEY,
    INLINE_PART_MAX_BYTES,
    CompactLayout,
    compact_layout,
    compact_payload,
    compact_value,
    compact_wire_nbytes,
    payload_wire_nbytes,
)
from splitnet.errors import CodecError, ProtocolError, UnknownRequest
from splitnet.runtime.cut_codec import CutCodecs, cut_wire_nbytes
from splitnet.wire.headers import BatchHeader, BatchMember, ForwardHeader

C = 32
REQ = ("r1", 0)  # a request context: (request key, epoch)


@pytest.fixture(scope="module")
def cal():
    return np.random.default_rng(0).standard_normal((3000, C)).astype(np.float32)


@pytest.fixture(scope="module")
def rvq(cal):
    return make_codec("rvq", stages=3, nbits=8, niter=3, beam=1).fit(cal, progress=False)


@pytest.fixture(scope="module")
def rvq_other(cal):
    return make_codec("rvq", stages=3, nbits=8, niter=3, beam=1, seed=1).fit(cal[::-1].copy(), progress=False)


def _pair(codec, *decodable):
    """(sender, receiver) CutCodecs: the sender encodes with ``codec``, the receiver holds ``decodable`` (default: ``codec``)."""
    tx, rx = CutCodecs(), CutCodecs()
    tx.out = codec
    for c in decodable or (codec,):
        if c.codebook_hash:
            rx.by_hash[c.codebook_hash] = c
    return tx, rx


def _x(tokens: int, seed: int = 1, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, tokens, C)).astype(np.float32)


def _step(tx, rx, x, pos, context=REQ, rx_context=REQ):
    tensors, meta = tx.encode({"hidden": x}, context=context, pos=pos)
    ForwardHeader.from_meta({"reply_to": "peer:" + "0" * 32, **meta})  # what the receiving stage checks first
    return tensors, meta, rx.decode(tensors, meta, context=rx_context)["hidden"]


@pytest.mark.parametrize("name", ["fp16", "rvq", "rvq-12-bit"])
def test_later_steps_go_compact_and_decode_exactly(name, rvq, cal):
    """Rows of float16, whole bytes per vector (rvq 3x8), and 12 bits per vector (rvq 2x6: the
    count of vectors is not the byte length over anything, so it travels)."""
    if name == "fp16":
        codec = make_codec("fp16")
    elif name == "rvq":
        codec = rvq
    else:
        codec = make_codec("rvq", stages=2, nbits=6, niter=3, beam=1).fit(cal, progress=False)
    tx, rx = _pair(codec)
    prefill = _x(7)
    tensors, meta, y = _step(tx, rx, prefill, 0)
    assert "codecs" in meta and COMPACT_KEY not in meta  # the first step binds the request with a full entry
    np.testing.assert_array_equal(y, codec.decode(codec.encode(prefill)))
    for pos, n in ((7, 1), (8, 3), (11, 1)):  # decode steps and a later prefill chunk
        x = _x(n, seed=pos)
        tensors, meta, y = _step(tx, rx, x, pos)
        assert set(meta) == {COMPACT_KEY} and tensors == {}
        np.testing.assert_array_equal(y, codec.decode(codec.encode(x)))
        full = codec.encode(x)
        assert meta[COMPACT_KEY] == [n, next(iter(full.parts.values())).tobytes()]
        assert cut_wire_nbytes(tensors, meta) == (compact_wire_nbytes(meta[COMPACT_KEY]), len(meta[COMPACT_KEY][1]))
        assert cut_wire_nbytes(tensors, meta)[0] < payload_wire_nbytes(full, "hidden")


def test_compact_bytes_for_one_token(rvq):
    """An rvq 3x8 decoded token: 3 bytes of codes, 'cc' (3) + [1, bin] (1 + 1 + 2): 10 bytes (full entry: 40+)."""
    tx, rx = _pair(rvq)
    _step(tx, rx, _x(4), 0)
    tensors, meta, _ = _step(tx, rx, _x(1), 4)
    assert cut_wire_nbytes(tensors, meta) == (10, 3)
    assert payload_wire_nbytes(rvq.encode(_x(1)), "hidden") > 40


def test_full_entry_whenever_compact_cannot_stand_for_it(rvq):
    tx, rx = _pair(make_codec("fp16"))
    # no context (uncached), pos 0 or no pos: always the full entry
    _step(tx, rx, _x(2), 0)
    for context, pos in ((None, 5), (REQ, 0), (REQ, None)):
        tensors, meta = tx.encode({"hidden": _x(1)}, context=context, pos=pos)
        assert "codecs" in meta and COMPACT_KEY not in meta
    # another shape than (1, n, C): two rows
    _, meta, _ = _step(tx, rx, _x(1, batch=2), 6)
    assert "codecs" in meta
    # a part over the inline limit
    _, meta, _ = _step(tx, rx, _x(INLINE_PART_MAX_BYTES // (2 * C) + 1), 7)
    assert "codecs" in meta
    # multi-part (int8: values + scales) never goes compact, and unbinds the request
    tx8, rx8 = _pair(make_codec("int8"))
    for pos in (0, 3):
        _, meta, _ = _step(tx8, rx8, _x(3 if pos == 0 else 1), pos)
        assert "codecs" in meta
    assert compact_layout(make_codec("int8").encode(_x(2))) is None


def test_a_request_without_binding_is_refused_with_unknown_request(rvq):
    tx, rx = _pair(rvq)
    _step(tx, rx, _x(4), 0)
    tensors, meta = tx.encode({"hidden": _x(1)}, context=REQ, pos=4)
    assert COMPACT_KEY in meta
    fresh = _pair(rvq)[1]  # a restarted or replaced stage: it never saw the first step
    with pytest.raises(UnknownRequest, match="replay the request"):
        fresh.decode(tensors, meta, context=REQ)
    with pytest.raises(UnknownRequest):  # another request (or epoch) of the same sender
        rx.decode(tensors, meta, context=("r1", 1))
    with pytest.raises(ProtocolError, match="cached request"):  # no context: an uncached or batch message
        rx.decode(tensors, meta)


def test_bindings_are_bounded_and_an_evicted_one_is_a_replay(rvq):
    tx, rx = CutCodecs(max_contexts=2), CutCodecs(max_contexts=2)
    tx.out = rvq
    rx.by_hash[rvq.codebook_hash] = rvq
    for r in ("a", "b", "c"):
        _step(tx, rx, _x(2), 0, context=(r, 0), rx_context=(r, 0))
    tensors, meta = tx.encode({"hidden": _x(1)}, context=("c", 0), pos=2)
    assert COMPACT_KEY in meta
    rx.decode(tensors, meta, context=("c", 0))
    tensors, meta = tx.encode({"hidden": _x(1)}, context=("a", 0), pos=2)  # the sender forgot "a" too: a full entry
    assert "codecs" in meta
    assert len(tx._sent) == len(rx._bound) == 2
    with pytest.raises(ValueError):
        CutCodecs(max_contexts=0)


def test_each_request_decodes_with_the_codebook_its_first_step_named(rvq, rvq_other):
    """A receiver holding two codebooks: each request's compact steps use the one its full entry bound."""
    assert rvq.codebook_hash != rvq_other.codebook_hash
    rx = _pair(rvq, rvq, rvq_other)[1]
    txa, txb = _pair(rvq)[0], _pair(rvq_other)[0]
    _step(txa, rx, _x(3), 0, context=("a", 0), rx_context=("a", 0))
    _step(txb, rx, _x(3), 0, context=("b", 0), rx_context=("b", 0))
    x = _x(1, seed=9)
    _, _, ya = _step(txa, rx, x, 3, context=("a", 0), rx_context=("a", 0))
    _, _, yb = _step(txb, rx, x, 3, context=("b", 0), rx_context=("b", 0))
    np.testing.assert_array_equal(ya, rvq.decode(rvq.encode(x)))
    np.testing.assert_array_equal(yb, rvq_other.decode(rvq_other.encode(x)))
    assert not np.array_equal(ya, yb)


def test_a_sender_that_changes_codebook_sends_a_full_entry_which_rebinds(rvq, rvq_other):
    tx, rx = _pair(rvq, rvq, rvq_other)
    _step(tx, rx, _x(3), 0)
    tx.out = rvq_other  # same layout, another codebook: its payloads no longer match what was agreed
    x = _x(1, seed=4)
    _, meta, y = _step(tx, rx, x, 3)
    assert "codecs" in meta and COMPACT_KEY not in meta
    np.testing.assert_array_equal(y, rvq_other.decode(rvq_other.encode(x)))
    _, meta, y = _step(tx, rx, x, 4)  # now bound to the new codebook
    assert COMPACT_KEY in meta
    np.testing.assert_array_equal(y, rvq_other.decode(rvq_other.encode(x)))


def test_compact_beside_a_full_entry_or_packed_tokens_is_refused(rvq):
    tx, rx = _pair(rvq)
    tensors, meta = tx.encode({"hidden": _x(2)}, context=REQ, pos=0)
    rx.decode(tensors, meta, context=REQ)
    value = [1, bytes(3)]
    with pytest.raises(ProtocolError, match="both"):
        rx.decode(tensors, {**meta, COMPACT_KEY: value}, context=REQ)
    with pytest.raises(ProtocolError, match="both"):
        rx.decode({"hidden": np.zeros((1, 1, C), np.float32)}, {COMPACT_KEY: value}, context=REQ)
    with pytest.raises(ProtocolError, match="packed"):
        rx.decode({}, {COMPACT_KEY: value, "packed_tokens": True}, context=REQ)


_FLAT = CompactLayout("rvq", "00ff", "float32", C, "b", "u8", None)
_ROWS = CompactLayout("fp16", "", "float32", C, "d", "f16", (C,))


@pytest.mark.parametrize(
    "layout,bad",
    [
        (_FLAT, [1]),  # not [n, bytes]
        (_FLAT, [1, b"\0", 2]),
        (_FLAT, (1, b"\0")),  # a tuple never comes from msgpack; only a list is valid
        (_FLAT, [0, b""]),  # no vectors
        (_FLAT, [-1, b"\0"]),
        (_FLAT, [True, b"\0"]),  # a bool is not a count
        (_FLAT, [1.0, b"\0"]),
        (_FLAT, [1, "abc"]),  # a string, not bytes
        (_FLAT, [1, b""]),  # no bytes at all
        (_FLAT, [10**6, b"\0" * 3]),  # more vectors than bits
        (_ROWS, [1, b"\0" * (2 * C - 1)]),  # not a whole row of float16
        (_ROWS, [2, b"\0" * (2 * C)]),  # bytes for one row, count says two
        (_ROWS, [1, b"\0" * (4 * C)]),
    ],
)
def test_malformed_compact_values_raise_protocol_error(layout, bad):
    with pytest.raises(ProtocolError):
        compact_payload(bad, layout)


def test_header_checks_the_compact_field():
    base = {"reply_to": "peer:" + "0" * 32, "cache": True, "pos": 3}
    assert ForwardHeader.from_meta({**base, "cc": [1, b"\0"]}).cc == [1, b"\0"]
    for bad in ({"x": 1}, [1], "abc", 7):
        with pytest.raises(ProtocolError, match="meta.cc"):
            ForwardHeader.from_meta({**base, "cc": bad})


def test_a_batch_member_may_not_carry_compact_codes():
    member = ForwardHeader(reply_to="peer:" + "0" * 32, cache=True, pos=3, cc=[1, b"\0"])
    with pytest.raises(ProtocolError, match="cc"):
        BatchHeader("forward_batch", (BatchMember("r", 0, 0, 1, header=member),))


def test_seeded_mutations_of_compact_steps_raise_only_typed_errors(rvq):
    """Every mutation of a compact step's [n, bytes] either decodes to (1, n, C) or raises a
    ProtocolError / CodecError (the codec checks a bitstream's length): never anything else."""
    tx, rx = _pair(rvq)
    _step(tx, rx, _x(4), 0)
    _, meta = tx.encode({"hidden": _x(2)}, context=REQ, pos=4)
    n, data = meta[COMPACT_KEY]
    rng = np.random.default_rng(5)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(500):
        m_n, m_data = n, bytearray(data)
        kind = rng.integers(5)
        if kind == 0:
            m_n = int(rng.integers(-3, 40))
        elif kind == 1:
            del m_data[int(rng.integers(0, len(m_data) + 1)):]
        elif kind == 2:
            m_data += bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        elif kind == 3:
            m_data[int(rng.integers(len(m_data)))] ^= 1 << int(rng.integers(8))
        else:
            m_n = [m_n, None, "1", 2.0, [1]][int(rng.integers(5))]
        try:
            y = rx.decode({}, {COMPACT_KEY: [m_n, bytes(m_data)]}, context=REQ)["hidden"]
        except (ProtocolError, CodecError):
            outcomes["refused"] += 1
            continue
        assert y.shape == (1, m_n, C)
        outcomes["decoded"] += 1
    assert outcomes["decoded"] and outcomes["refused"]


def test_layout_and_value_of_payloads():
    fp16 = make_codec("fp16")
    p = fp16.encode(_x(3))
    layout = compact_layout(p)
    assert layout == CompactLayout("fp16", "", "float32", C, "d", "f16", (C,))
    assert compact_value(p, layout) == [3, p.parts["d"].tobytes()]
    q = compact_payload(compact_value(p, layout), layout)
    np.testing.assert_array_equal(fp16.decode(q), fp16.decode(p))
    assert compact_value(fp16.encode(_x(3, batch=2)), layout) is None
    assert compact_value(make_codec("fp32").encode(_x(3)), layout) is None  # another codec: another layout
