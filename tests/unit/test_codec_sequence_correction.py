"""AlignedVQ's per-sequence correction (splitnet.codecs.sequence_correction): each sequence's mean
decode miss, sent in a fixed number of bits per sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitnet.codecs import load_codec, make_codec, save_codec
from splitnet.codecs.sequence_correction import SequenceCorrection, sequence_means
from splitnet.errors import CodecError

C = 16


def _sequences(rng, n_seq: int):
    """Tokens whose sequences each carry a shared offset (what per-token VQ at low rate misses)."""
    lens = rng.integers(3, 30, n_seq)
    offset = (rng.standard_normal((n_seq, C)) * np.linspace(1.0, 0.1, C)).astype(np.float32)
    ids = rng.integers(0, 30, int(lens.sum()))
    proto = rng.standard_normal((30, C)).astype(np.float32) * 2
    x = proto[ids] + 0.3 * rng.standard_normal((ids.size, C)).astype(np.float32) + np.repeat(offset, lens, axis=0)
    return x.astype(np.float32), lens, ids


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x, lens, ids = _sequences(rng, 600)
    base = make_codec("alignedvq", stages=1, nbits=5, niter=3, refine=0, entropy="context").fit(x, progress=False, anchor_labels=ids)
    corrected = base.recoded("context", x).fit_sequence_correction(x, lens, bits_per_sequence=40)
    return base, corrected, _sequences(np.random.default_rng(1), 200)


def test_fit_keeps_to_the_bit_budget_and_round_trips_within_half_a_step():
    rng = np.random.default_rng(2)
    means = rng.standard_normal((500, C)).astype(np.float32) * np.linspace(2, 0.05, C).astype(np.float32)
    for budget in (1, 7, 40, 200):
        q = SequenceCorrection.fit(means, budget)
        assert 1 <= q.bits_per_sequence <= budget and q.bits.min() >= 1 and q.bits.max() <= 16
        buf = q.encode(means)
        assert buf.nbytes == q.nbytes(500) == (500 * q.bits_per_sequence + 7) // 8
        back = q.decode(buf, 500)
        coef, coef_back = means @ q.basis, back @ q.basis
        inside = (coef >= q.lo) & (coef <= q.lo + q.step * ((1 << q.bits) - 1))
        assert np.all(np.abs(coef - coef_back)[inside] <= q.step.repeat(500).reshape(-1, 500).T[inside] / 2 + 1e-4)
    wide, narrow = SequenceCorrection.fit(means, 200), SequenceCorrection.fit(means, 20)
    err = lambda q: float(((q.decode(q.encode(means), 500) - means) ** 2).mean())  # noqa: E731
    assert err(wide) < err(narrow) < float((means**2).mean())  # more bits, less error
    assert wide.bits[0] >= wide.bits[-1]  # bits go where the coefficients vary most


def test_arrays_round_trip_and_bad_arrays_are_refused():
    q = SequenceCorrection.fit(np.random.default_rng(3).standard_normal((50, 4)), 12)
    again = SequenceCorrection.from_arrays(q.arrays())
    np.testing.assert_array_equal(again.decode(q.encode(np.ones((2, 4))), 2), q.decode(q.encode(np.ones((2, 4))), 2))
    with pytest.raises(ValueError, match="missing"):
        SequenceCorrection.from_arrays({k: v for k, v in q.arrays().items() if not k.endswith("step")})
    with pytest.raises(ValueError):
        SequenceCorrection(q.basis, q.lo, -q.step, q.bits)
    with pytest.raises(ValueError):
        SequenceCorrection(q.basis, q.lo, q.step, q.bits + 16)
    with pytest.raises(CodecError, match="at least 2"):
        SequenceCorrection.fit(np.zeros((1, 4)), 8)


def test_sequence_means_handles_empty_sequences():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_allclose(sequence_means(x, np.array([2, 0, 4])), [[1, 2], [0, 0], [7, 8]])


def test_correction_lowers_held_out_error_and_costs_its_bits(fitted):
    base, corrected, (x, lens, _) = fitted
    p0, p1 = base.encode(x), corrected.encode(x, lengths=lens)
    assert np.array_equal(p1.parts["b"], p0.parts["b"])  # the indices are the same
    assert p1.parts["s"].nbytes == (lens.size * 40 + 7) // 8  # exactly the bits per sequence, packed
    assert p1.nbytes - p0.nbytes <= p1.parts["s"].nbytes + 16  # + the inline part's few bytes of framing
    m0 = sequence_means(base.decode(p0) - x, lens)
    m1 = sequence_means(corrected.decode(p1, lengths=lens) - x, lens)
    assert float((m1**2).mean()) < 0.5 * float((m0**2).mean())  # the shared part of the miss is mostly gone
    e0 = float(((base.decode(p0) - x) ** 2).mean())
    e1 = float(((corrected.decode(p1, lengths=lens) - x) ** 2).mean())
    assert e1 < e0
    assert corrected.codebook_hash != base.codebook_hash and corrected.needs_lengths


def test_save_load_recode_keep_the_correction(fitted, tmp_path):
    _, corrected, (x, lens, _) = fitted
    p = corrected.encode(x, lengths=lens)
    want = corrected.decode(p, lengths=lens)
    save_codec(corrected, tmp_path / "c.codec")
    loaded = load_codec(tmp_path / "c.codec", expected_hash=corrected.codebook_hash)
    np.testing.assert_array_equal(loaded.decode(p, lengths=lens), want)
    huff = corrected.recoded("order1", x)
    np.testing.assert_array_equal(huff.decode(huff.encode(x, lengths=lens), lengths=lens), want)


def test_lengths_must_match_the_encoder(fitted):
    _, corrected, (x, lens, _) = fitted
    p = corrected.encode(x, lengths=lens)
    with pytest.raises(CodecError):  # one sequence instead of 200: the correction part has the wrong size
        corrected.decode(p)
    with pytest.raises(CodecError, match="add up"):
        corrected.encode(x, lengths=lens[:-1])


def test_misuse_is_refused(fitted):
    base, corrected, (x, lens, ids) = fitted
    with pytest.raises(CodecError, match="already"):
        corrected.recoded("context", x).fit_sequence_correction(x, lens)
    with pytest.raises(CodecError, match="before"):
        corrected.recoded("context", x).tune(x, lens, steps=1, progress=False)
    with pytest.raises(CodecError, match="before"):
        corrected.recoded("context", x).refine_decoder(x, 1, progress=False)
    with pytest.raises(CodecError):
        corrected.truncated(0)
    tok = make_codec("alignedvq", stages=1, nbits=4, niter=2, norm="token").fit(x, progress=False)
    with pytest.raises(CodecError, match="norm='none'"):
        tok.fit_sequence_correction(x, lens)


def test_cut_runtime_sends_the_correction_per_padded_sequence(fitted, tmp_path):
    from splitnet.runtime.cut_codec import CutCodecs

    _, corrected, (x, lens, _) = fitted
    save_codec(corrected, tmp_path / "c.codec")
    b, t = 4, int(lens[:4].max())
    h = np.zeros((b, t, C), np.float32)
    mask = np.zeros((b, t), np.int64)
    offs = np.concatenate([[0], np.cumsum(lens)])
    for i in range(b):
        h[i, : lens[i]], mask[i, : lens[i]] = x[offs[i] : offs[i + 1]], 1
    out = CutCodecs(str(tmp_path / "c.codec"))
    tensors, meta = out.encode({"hidden": torch.from_numpy(h), "attention_mask": torch.from_numpy(mask)})
    back = CutCodecs(codec_files=(str(tmp_path / "c.codec"),)).decode({k: np.asarray(v) for k, v in tensors.items()}, meta)
    real = mask.astype(bool)
    want = corrected.decode(corrected.encode(x[: offs[b]], lengths=lens[:b]), lengths=lens[:b])
    np.testing.assert_allclose(back["hidden"][real], want, atol=1e-6)
