"""Huffman coding of anchor indices and the anchored AlignedVQ codec."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet.codecs import load_codec, make_codec, save_codec
from splitnet.codecs.entropy import MAX_CODE_LEN, Huffman, huffman_lengths
from splitnet.errors import CodecError


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 300), n=st.integers(0, 400), seed=st.integers(0, 10_000), skew=st.floats(0.0, 2.0))
def test_huffman_round_trip(k, n, seed, skew):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, k + 1) ** skew
    p /= p.sum()
    counts = np.bincount(rng.choice(k, 5000, p=p), minlength=k)
    h = Huffman(huffman_lengths(counts))
    assert np.sum(2.0 ** -h.lengths.astype(float)) <= 1.0 + 1e-9
    s = rng.choice(k, n, p=p)
    bits = h.encode_bits(s)
    out, used = h.decode_bits(bits, n)
    np.testing.assert_array_equal(out, s)
    assert used == bits.size


def test_huffman_saves_bits_on_skewed_data_and_caps_length():
    counts = np.array([10**9] + [1] * 4000)
    lengths = huffman_lengths(counts)
    assert lengths.max() <= MAX_CODE_LEN
    assert lengths[0] == 1


def test_huffman_truncated_stream_raises():
    h = Huffman(huffman_lengths(np.arange(1, 50)))
    bits = h.encode_bits(np.arange(49))
    with pytest.raises(CodecError):
        h.decode_bits(bits[: bits.size // 2], 49)


@pytest.fixture(scope="module")
def labelled():
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 201) ** 1.1
    p /= p.sum()
    lab = rng.choice(200, 8000, p=p)
    means = rng.standard_normal((200, 48)).astype(np.float32) * 3
    return (means[lab] + 0.3 * rng.standard_normal((8000, 48))).astype(np.float32), lab


def test_anchored_alignedvq_round_trip_save_load(labelled, tmp_path):
    x, lab = labelled
    plain = make_codec("alignedvq", stages=1, nbits=5, niter=3, refine=0).fit(x, progress=False, anchor_labels=lab)
    huff = make_codec("alignedvq", stages=1, nbits=5, niter=3, refine=0, entropy="huffman").fit(x, progress=False, anchor_labels=lab)
    assert plain.anchor_bits == 8
    xt = x[:500]
    pp, ph = plain.encode(xt), huff.encode(xt)
    assert ph.nbytes < pp.nbytes  # Zipf-like anchors: Huffman beats 8 fixed bits
    np.testing.assert_array_equal(plain.decode(pp), huff.decode(ph))
    for s in (0, 1):
        c = huff.truncated(s).refine_decoder(x, 1, progress=False)
        save_codec(c, tmp_path / f"a{s}.codec")
        c2 = load_codec(tmp_path / f"a{s}.codec")
        p = c.encode(xt.reshape(10, 50, 48))
        y = c2.decode(p)
        assert y.shape == (10, 50, 48) and y.dtype == np.float32
        np.testing.assert_array_equal(y, c.decode(p))
    bad = replace(ph, parts={"b": ph.parts["b"][:-3]})
    with pytest.raises(CodecError):
        huff.decode(bad)


def test_anchor_labels_must_match(labelled):
    x, lab = labelled
    with pytest.raises(ValueError):
        make_codec("alignedvq", stages=1, nbits=4, niter=2).fit(x, progress=False, anchor_labels=lab[:-1])
    with pytest.raises(CodecError):
        make_codec("alignedvq", stages=0, nbits=4, niter=2).fit(x, progress=False)


def test_anchor_contexts_split_a_label_seen_in_two_contexts(tmp_path):
    """A token seen in two contexts (two feature clusters) gets two anchors; rarer ones keep one."""
    rng = np.random.default_rng(1)
    n = 4000
    lab = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    ctx = rng.integers(0, 2, n)  # label 0 comes in two contexts far apart
    base = rng.standard_normal((3, 16)).astype(np.float32) * 4
    shift = np.where((lab == 0) & (ctx == 1), 6.0, 0.0)[:, None] * np.eye(16, dtype=np.float32)[0]
    x = (base[lab] + shift + 0.1 * rng.standard_normal((n, 16))).astype(np.float32)
    one = make_codec("alignedvq", stages=0, niter=5, refine=0, entropy="huffman").fit(x, progress=False, anchor_labels=lab)
    two = make_codec("alignedvq", stages=0, niter=5, refine=0, entropy="huffman", anchor_contexts=2,
                     anchor_context_points=500).fit(x, progress=False, anchor_labels=lab)
    assert one.anchor_cb.shape[0] == 3
    assert two.anchor_cb.shape[0] == 5  # labels 0 (~2400 tokens) and 1 (~1200) split; label 2 (~400 < 2 x 500) does not
    err = lambda c: float(((c.decode(c.encode(x)) - x) ** 2).mean())  # noqa: E731
    assert err(two) < 0.1 * err(one)
    assert "anchor_contexts" not in one._config() and two._config()["anchor_contexts"] == 2  # old manifests hash alike
    save_codec(two, tmp_path / "ctx.codec")
    back = load_codec(tmp_path / "ctx.codec", expected_hash=two.codebook_hash)
    p = two.encode(x[:100])
    np.testing.assert_array_equal(back.decode(p), two.decode(p))
    with pytest.raises(ValueError):
        make_codec("alignedvq", stages=0, anchor_contexts=0)
    with pytest.raises(CodecError, match="needs anchor_labels"):
        make_codec("alignedvq", stages=1, nbits=4, niter=2, anchor_contexts=2).fit(x, progress=False)
