"""Exact bit packing: sizes, round trips at odd widths, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet.codecs.bitpack import BitReader, BitWriter, pack_bits, packed_nbytes, unpack_bits
from splitnet.errors import CodecError

WIDTHS = [1, 3, 5, 7, 8, 9, 11, 12, 13, 16, 17, 32]


@pytest.mark.parametrize("width", WIDTHS)
def test_round_trip_and_exact_size(width):
    rng = np.random.default_rng(width)
    v = rng.integers(0, 2**width, size=1001, dtype=np.uint64)
    buf = pack_bits(v, width)
    assert buf.dtype == np.uint8
    assert buf.size == (1001 * width + 7) // 8 == packed_nbytes(1001, width)
    np.testing.assert_array_equal(unpack_bits(buf, width, 1001), v)


@settings(max_examples=60, deadline=None)
@given(width=st.sampled_from([1, 3, 5, 7, 9, 11, 12, 13, 17]), data=st.data())
def test_property_round_trip(width, data):
    n = data.draw(st.integers(0, 300))
    vals = data.draw(st.lists(st.integers(0, 2**width - 1), min_size=n, max_size=n))
    v = np.array(vals, dtype=np.int64)
    buf = pack_bits(v, width)
    assert buf.size == packed_nbytes(n, width)
    np.testing.assert_array_equal(unpack_bits(buf, width, n), v)


def test_twelve_bit_indices_take_twelve_bits():
    assert pack_bits(np.arange(4096) % 4096, 12).size == 4096 * 12 // 8


def test_lsb_first_layout():
    # value 1 (3 bits) then 6 (3 bits): bits 1,0,0,0,1,1 -> 0b110001
    assert pack_bits(np.array([1, 6]), 3).tolist() == [0b110001]


@settings(max_examples=30, deadline=None)
@given(w1=st.integers(1, 17), w2=st.integers(1, 17), n1=st.integers(0, 50), n2=st.integers(0, 50), seed=st.integers(0, 1000))
def test_writer_reader_fields(w1, w2, n1, n2, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 2**w1, n1), rng.integers(0, 2**w2, n2)
    w = BitWriter()
    w.add(a, w1)
    w.add(b, w2)
    buf = w.getvalue()
    assert buf.size == (n1 * w1 + n2 * w2 + 7) // 8
    r = BitReader(buf, [(n1, w1), (n2, w2)])
    np.testing.assert_array_equal(r.read(), a)
    np.testing.assert_array_equal(r.read(), b)


def test_rejects_out_of_range_and_bad_width():
    with pytest.raises(ValueError):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 3)
    with pytest.raises(ValueError):
        pack_bits(np.array([1]), 0)
    with pytest.raises(TypeError):
        pack_bits(np.array([1.5]), 3)


def test_short_or_wrong_buffer_raises_codec_error():
    buf = pack_bits(np.arange(10), 5)
    with pytest.raises(CodecError):
        unpack_bits(buf[:-1], 5, 10)
    with pytest.raises(CodecError):
        unpack_bits(buf.astype(np.int16), 5, 10)
    with pytest.raises(CodecError):
        BitReader(buf, [(20, 5)])
