"""Residual indices range-coded under the anchor (AlignedVQ entropy="context") and the order-1
model with explicit contexts behind it (splitnet.codecs.order1)."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitnet.codecs import load_codec, make_codec, save_codec
from splitnet.codecs.order1 import Order1Model, RangeDecoder, RangeEncoder
from splitnet.errors import CodecError


@settings(max_examples=30, deadline=None)
@given(n_ctx=st.integers(1, 20), size=st.integers(2, 40), n=st.integers(0, 300), seed=st.integers(0, 10_000))
def test_explicit_context_model_round_trips_with_unseen_pairs(n_ctx, size, n, seed):
    rng = np.random.default_rng(seed)
    pref = rng.integers(0, size, n_ctx)  # each context prefers one symbol
    ctx_cal = rng.integers(0, n_ctx, 1500)
    sym_cal = np.where(rng.random(1500) < 0.8, pref[ctx_cal], rng.integers(0, size, 1500))
    k = int(rng.integers(0, 1500))  # calibration may be short or empty: unseen contexts code at order 0
    m = Order1Model.fit(sym_cal[:k], size, ctx_cal[:k], n_ctx)
    assert (m.size, m.contexts) == (size, n_ctx)
    ctx, sym = rng.integers(0, n_ctx, n), rng.integers(0, size, n)  # any pair, seen or not
    data = m.encode(sym, ctx)
    np.testing.assert_array_equal(m.decode(data, n, ctx), sym)
    bits = m.code_lengths(sym, ctx)  # ideal lengths: the coder spends them, plus at most a few bytes
    assert bits.shape == (n,) and np.all(bits > 0)
    assert bits.sum() - 16 <= 8 * len(data) <= bits.sum() + 24


def test_models_share_one_range_coder_in_sequence():
    rng = np.random.default_rng(0)
    a = Order1Model.fit(rng.integers(0, 9, 500), 9)  # order 1
    b = Order1Model.fit(rng.integers(0, 30, 500), 30, rng.integers(0, 9, 500), 9)  # under a's symbols
    s_a, s_b = rng.integers(0, 9, 200), rng.integers(0, 30, 200)
    enc = RangeEncoder()
    a.encode_into(enc, s_a)
    b.encode_into(enc, s_b, s_a)
    dec = RangeDecoder(enc.finish())
    got_a = a.decode_from(dec, 200)
    np.testing.assert_array_equal(got_a, s_a)
    np.testing.assert_array_equal(b.decode_from(dec, 200, got_a), s_b)


def test_explicit_context_model_refuses_missing_or_bad_contexts():
    m = Order1Model.fit(np.array([0, 1, 2, 1]), 3, np.array([0, 0, 1, 1]), 2)
    with pytest.raises(CodecError, match="give them"):
        m.encode(np.array([0, 1]))
    with pytest.raises(CodecError, match="contexts in 0..1"):
        m.encode(np.array([0, 1]), np.array([0, 2]))
    with pytest.raises(CodecError, match="contexts"):
        m.decode(b"\x12", 3, np.array([0, 1]))
    with pytest.raises(ValueError, match="one symbol in 0..1"):
        Order1Model.fit(np.array([0, 1]), 3, np.array([0, 5]), 2)


@pytest.fixture(scope="module")
def token_features():
    """Tokens whose residual after the label mean depends on the label: each label has its own
    four offsets, so given the anchor a residual index has ~4 likely values out of 64."""
    rng = np.random.default_rng(0)
    labels, dim = 120, 16
    lab = rng.integers(0, labels, 24_000)
    means = rng.standard_normal((labels, dim)).astype(np.float32) * 4
    offsets = rng.standard_normal((labels, 4, dim)).astype(np.float32)
    x = means[lab] + offsets[lab, rng.integers(0, 4, lab.size)] + 0.05 * rng.standard_normal((lab.size, dim))
    return x.astype(np.float32), lab


def _fit(x, lab, entropy, stages=2):
    return make_codec("alignedvq", stages=stages, nbits=6, niter=4, refine=0, entropy=entropy).fit(
        x, progress=False, anchor_labels=lab)


def test_context_coding_decodes_as_order1_with_fewer_bytes(token_features, tmp_path):
    x, lab = token_features
    cal, held = x[:20_000], x[20_000:]
    o1, ctx = _fit(cal, lab[:20_000], "order1"), _fit(cal, lab[:20_000], "context")
    p1, pc = o1.encode(held), ctx.encode(held)
    np.testing.assert_array_equal(ctx.decode(pc), o1.decode(p1))
    assert pc.nbytes < 0.8 * p1.nbytes  # 2 x 6 fixed bits per token -> a few
    re = o1.recoded("context", cal)  # same codebooks: only the coding changes, fitted as fit() does
    assert re.codebook_hash == ctx.codebook_hash
    pr = re.encode(held)
    assert pr.nbytes == pc.nbytes
    np.testing.assert_array_equal(re.decode(pr), o1.decode(p1))
    np.testing.assert_array_equal(o1.recoded("context", codes=o1.encoder_codes(cal)).decode(pr), re.decode(pr))
    with pytest.raises(ValueError, match="needs"):
        o1.recoded("context", codes=o1.anchor_codes(cal))  # the residual stages' codes are needed too
    for s in (0, 1, 2):
        c = ctx.truncated(s)
        assert sum(k.endswith("_context_counts") for k in c.state()[0]) == s
        save_codec(c, tmp_path / f"c{s}.codec")
        c2 = load_codec(tmp_path / f"c{s}.codec")
        assert c2.codebook_hash == c.codebook_hash
        p = c.encode(held[:600].reshape(12, 50, 16))
        y = c2.decode(p)
        assert y.shape == (12, 50, 16) and y.dtype == np.float32
        np.testing.assert_array_equal(y, o1.truncated(s).decode(o1.truncated(s).encode(held[:600].reshape(12, 50, 16))))
    assert ctx.decode(ctx.encode(held[:0])).shape == (0, 16)


def test_context_coding_refuses_what_it_cannot_code(token_features):
    x, lab = token_features
    with pytest.raises(CodecError, match="anchor_labels"):
        make_codec("alignedvq", stages=1, nbits=6, niter=2, entropy="context").fit(x, progress=False)
    ctx = _fit(x[:8000], lab[:8000], "context", stages=1)
    p = ctx.encode(x[:300])
    arrays, config = ctx.state()
    del arrays["stage0_context_counts"]
    with pytest.raises(ValueError, match="stage0_context_counts"):
        type(ctx).from_state(arrays, config)
    rng = np.random.default_rng(1)
    for _ in range(30):  # garbage after the header either decodes to valid codes or raises CodecError
        junk = replace(p, parts={"b": rng.integers(0, 256, rng.integers(0, 80), dtype=np.uint8)})
        try:
            y = ctx.decode(junk)
        except CodecError:
            continue
        assert y.shape == (300, 16) and np.isfinite(y).all()
