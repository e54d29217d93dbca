"""Order-1 context coding of anchor indices (splitnet.codecs.order1) and AlignedVQ's entropy="order1"."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet.codecs import load_codec, make_codec, save_codec
from splitnet.codecs.entropy import Huffman, huffman_lengths
from splitnet.codecs.order1 import MAX_TOTAL, Order1Model, RangeDecoder, RangeEncoder
from splitnet.errors import CodecError


def _markov(rng, size: int, n: int, concentration: float = 0.05, seed: int = 1) -> np.ndarray:
    trans = np.random.default_rng(seed).dirichlet(np.full(size, concentration), size=size)  # (A, A) rows sum to 1
    s = np.empty(n, dtype=np.int64)
    prev = 0
    for i in range(n):
        prev = s[i] = rng.choice(size, p=trans[prev])
    return s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, MAX_TOTAL - 1), st.floats(0, 1), st.floats(0, 1)), max_size=80))
def test_range_coder_round_trips_any_intervals(steps):
    ivs = []
    for total, a, b in steps:  # an interval [cum, cum + freq) of total, from tiny to nearly all of it
        cum = min(int(a * total), total - 1)
        freq = max(1, min(total - cum, int(b * (total - cum))))
        ivs.append((cum, freq, total))
    enc = RangeEncoder()
    for cum, freq, total in ivs:
        enc.encode(cum, freq, total)
    dec = RangeDecoder(enc.finish())
    for cum, freq, total in ivs:
        v = dec.target(total)
        assert cum <= v < cum + freq
        dec.consume(cum, freq)


def test_range_coder_carries_through_runs_of_ff_bytes():
    # a symbol that takes all but 1/2**39 of the interval pushes low toward the top again and again
    big = MAX_TOTAL - 1
    ivs = [(1, big - 1, big)] * 3000 + [(0, 1, big), (big - 1, 1, big)] * 50
    enc = RangeEncoder()
    for iv in ivs:
        enc.encode(*iv)
    dec = RangeDecoder(enc.finish())
    for cum, freq, total in ivs:
        assert cum <= dec.target(total) < cum + freq
        dec.consume(cum, freq)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(2, 60), n=st.integers(0, 300), seed=st.integers(0, 10_000))
def test_order1_round_trip_including_unseen_symbols_and_contexts(size, n, seed):
    rng = np.random.default_rng(seed)
    cal = _markov(rng, size, 2000)[: rng.integers(0, 2000)]
    model = Order1Model.fit(cal, size)
    for s in (_markov(rng, size, n), rng.integers(0, size, n)):  # typical, and uniform (mostly escapes)
        np.testing.assert_array_equal(model.decode(model.encode(s), n), s)


def test_order1_codes_near_its_model_cross_entropy_and_beats_huffman():
    rng = np.random.default_rng(0)
    size = 200
    cal, held = _markov(rng, size, 60_000), _markov(rng, size, 5_000)
    model = Order1Model.fit(cal, size)
    data = model.encode(held)
    # the ideal code length under the model's own integer frequencies (escape, then order 0)
    ptr, nxt, cnt, uni = model.indptr, model.next, model.counts, model.unigram
    ideal, prev = 0.0, -1
    for s in held:
        if prev >= 0 and ptr[prev] < ptr[prev + 1]:
            row = slice(ptr[prev], ptr[prev + 1])
            total = cnt[row].sum() + (ptr[prev + 1] - ptr[prev])
            hit = np.flatnonzero(nxt[row] == s)
            if hit.size:
                ideal -= np.log2(cnt[row][hit[0]] / total)
                prev = s
                continue
            ideal -= np.log2((ptr[prev + 1] - ptr[prev]) / total)
        ideal -= np.log2(uni[s] / uni.sum())
        prev = s
    assert ideal - 16 <= 8 * len(data) <= ideal + 64  # within a few bytes of the ideal length (trimming can save a byte)
    assert model.code_lengths(held).sum() == pytest.approx(ideal, rel=1e-9)  # the vectorised figure agrees
    huff_bits = Huffman(huffman_lengths(np.bincount(cal, minlength=size))).encode_bits(held).size
    assert 8 * len(data) < 0.9 * huff_bits  # the previous symbol carries information Huffman ignores


def test_order1_model_refuses_inconsistent_arrays():
    m = Order1Model.fit(np.array([0, 1, 0, 1, 2]), 3)
    a = m.arrays()
    with pytest.raises(ValueError, match="counts"):
        Order1Model(np.zeros(3), *(a[f"anchor_order1_{k}"] for k in ("indptr", "next", "counts")))  # a zero frequency would stall the coder
    with pytest.raises(ValueError, match="indptr"):
        Order1Model(a["anchor_order1_unigram"], np.array([0, 1, 1, 9]), a["anchor_order1_next"], a["anchor_order1_counts"])
    with pytest.raises(ValueError, match="successors"):
        Order1Model(a["anchor_order1_unigram"], a["anchor_order1_indptr"], np.full_like(a["anchor_order1_next"], 7), a["anchor_order1_counts"])


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 50))
def test_order1_decoder_on_garbage_ends_or_refuses(data, n):
    m = Order1Model.fit(_markov(np.random.default_rng(0), 30, 3000), 30)
    try:
        out = m.decode(data, n)
    except CodecError:
        return
    assert out.shape == (n,) and (n == 0 or 0 <= out.min() <= out.max() < 30)


@pytest.fixture(scope="module")
def markov_features():
    rng = np.random.default_rng(0)
    lab = _markov(rng, 150, 12_000)
    means = rng.standard_normal((150, 24)).astype(np.float32) * 3
    return (means[lab] + 0.3 * rng.standard_normal((lab.size, 24))).astype(np.float32), lab


def test_alignedvq_order1_decodes_as_huffman_with_fewer_bytes(markov_features, tmp_path):
    x, lab = markov_features
    huff = make_codec("alignedvq", stages=1, nbits=5, niter=3, refine=0, entropy="huffman").fit(x, progress=False, anchor_labels=lab)
    o1 = make_codec("alignedvq", stages=1, nbits=5, niter=3, refine=0, entropy="order1").fit(x, progress=False, anchor_labels=lab)
    held = x[-2000:]
    ph, po = huff.encode(held), o1.encode(held)
    np.testing.assert_array_equal(o1.decode(po), huff.decode(ph))
    assert po.nbytes < 0.85 * ph.nbytes
    re = huff.recoded("order1", x)  # same codebooks: only the anchor coding changes
    assert re.codebook_hash != huff.codebook_hash
    pr = re.encode(held)
    np.testing.assert_array_equal(re.decode(pr), huff.decode(ph))
    assert pr.nbytes < ph.nbytes
    for s in (0, 1):
        c = o1.truncated(s)
        save_codec(c, tmp_path / f"o{s}.codec")
        c2 = load_codec(tmp_path / f"o{s}.codec")
        p = c.encode(held[:600].reshape(12, 50, 24))
        y = c2.decode(p)
        assert y.shape == (12, 50, 24) and y.dtype == np.float32
        np.testing.assert_array_equal(y, c.decode(p))
    bad = replace(po, parts={"b": po.parts["b"][:2]})  # cut into the fixed residual fields
    with pytest.raises(CodecError):
        o1.decode(bad)
    huge = replace(o1.truncated(0).encode(held[:10]), shape=(1 << 24, 24))  # claims 2**24 tokens, sends a few bytes
    with pytest.raises(CodecError, match="decodes to more than"):
        o1.truncated(0).decode(huge)
    with pytest.raises(CodecError, match="no anchor"):
        make_codec("alignedvq", stages=1, nbits=5, niter=3).fit(x, progress=False).recoded("order1", x)
