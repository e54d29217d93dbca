"""AlignedVQ's learned receiver-side adapter: training helps, save/load/hash, decode contract, bytes."""

import json

import numpy as np
import pytest

from splitnet.codecs import load_codec, make_codec, save_codec
from splitnet.codecs.adapter import AdapterConfig
from splitnet.errors import CodecError

C = 32
SMALL = AdapterConfig(width=32, layers=1, heads=2, ffn=64, max_positions=64)


def _sequences(seed: int, n_seq: int):
    """Tokens = a code word + a per-sequence shift along one direction shared by all tokens of the
    sequence: a codec that quantizes tokens one by one loses most of the shift, a context adapter
    can estimate it from the whole sequence."""
    rng = np.random.default_rng(seed)
    words = np.random.default_rng(99).standard_normal((40, C)).astype(np.float32)
    u = np.random.default_rng(98).standard_normal(C).astype(np.float32)
    u /= np.linalg.norm(u)
    lens = rng.integers(8, 24, n_seq)
    toks = [words[rng.integers(0, 40, n)] + 2.0 * rng.standard_normal() * u + 0.05 * rng.standard_normal((n, C)) for n in lens]
    return np.concatenate(toks).astype(np.float32), lens


@pytest.fixture(scope="module")
def data():
    return _sequences(0, 300), _sequences(1, 60)


@pytest.fixture(scope="module")
def base(data):
    (x, _), _ = data
    return make_codec("alignedvq", stages=1, nbits=5, niter=4, refine=0, seed=0).fit(x, progress=False)


@pytest.fixture(scope="module")
def tuned(data, base):
    (x, lens), _ = data
    c = base.truncated(1)
    rep = c.tune(x, lens, adapter=SMALL, steps=150, batch_tokens=1024, lr=3e-3, progress=False)
    return c, rep


def _mse(codec, x, lens):
    return float(np.mean((codec.decode(codec.encode(x), lengths=lens) - x) ** 2))


def test_training_reduces_held_out_error(data, base, tuned):
    _, (xe, le) = data
    c, rep = tuned
    assert rep["steps"] == 150 and rep["last_loss"] < rep["first_loss"]
    before, after = _mse(base, xe, le), _mse(c, xe, le)
    assert after < 0.85 * before, (before, after)


def test_untrained_adapter_is_identity(data, base):
    (x, lens), (xe, le) = data
    c = base.truncated(1)
    c.tune(x, lens, adapter=SMALL, steps=1, lr=0.0, table_lr=0.0, progress=False)  # zero learning rate: no change
    np.testing.assert_allclose(c.decode(c.encode(xe), lengths=le), base.decode(base.encode(xe)), atol=1e-5)


def test_payload_bytes_unchanged_by_adapter(data, base, tuned):
    _, (xe, _) = data
    c, _ = tuned
    p0, p1 = base.encode(xe), c.encode(xe)
    assert p1.nbytes == p0.nbytes
    np.testing.assert_array_equal(p1.parts["b"], p0.parts["b"])  # the encoder is untouched
    assert p1.codebook_hash != p0.codebook_hash  # but the receiver state (and its hash) differs


def test_save_load_round_trip(data, tuned, tmp_path):
    _, (xe, le) = data
    c, _ = tuned
    save_codec(c, tmp_path / "a.codec")
    manifest = json.loads((tmp_path / "a.codec.json").read_text())
    assert manifest["config"]["adapter"]["steps"] == 150
    assert any(k.startswith("adapter.") for k in manifest["arrays"])
    d = load_codec(tmp_path / "a.codec", expected_hash=c.codebook_hash)
    assert d.codebook_hash == c.codebook_hash and d.needs_lengths
    p = c.encode(xe)
    np.testing.assert_allclose(d.decode(p, lengths=le), c.decode(p, lengths=le), atol=1e-5)


def test_hash_mismatch_and_tampered_adapter(tuned, tmp_path):
    c, _ = tuned
    save_codec(c, tmp_path / "a.codec")
    with pytest.raises(CodecError, match="expected"):
        load_codec(tmp_path / "a.codec", expected_hash="0" * 16)
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(tmp_path / "a.codec"))
    key = next(k for k in arrays if k.startswith("adapter.") and "head.weight" in k)
    arrays[key] = arrays[key] + 1e-3
    save_file(arrays, str(tmp_path / "a.codec"))
    with pytest.raises(CodecError, match="does not match its manifest"):
        load_codec(tmp_path / "a.codec")


def test_decode_shape_dtype_and_lengths(data, tuned):
    _, (xe, le) = data
    c, _ = tuned
    p = c.encode(xe)
    y = c.decode(p, lengths=le)
    assert y.shape == xe.shape and y.dtype == np.float32
    x3 = xe[:40].reshape(2, 20, C)
    y3 = c.decode(c.encode(x3))  # (B, T, C): B sequences of T tokens
    assert y3.shape == (2, 20, C) and y3.dtype == np.float32
    np.testing.assert_allclose(y3[1], c.decode(c.encode(x3[1]), lengths=[20]), atol=1e-5)
    with pytest.raises(CodecError, match="do not add up"):
        c.decode(p, lengths=[3, 4])


def test_adapter_codec_refuses_truncate_refine_and_retune(data, tuned):
    (x, lens), _ = data
    c, _ = tuned
    with pytest.raises(CodecError):
        c.truncated(1)
    with pytest.raises(CodecError):
        c.refine_decoder(x, 1, progress=False)
    with pytest.raises(CodecError):
        c.tune(x, lens, adapter=SMALL, steps=1, progress=False)


def test_runtime_decodes_packed_sequences_with_lengths(data, tuned, tmp_path):
    """The stage runtime passes each packed sequence's length to the adapter."""
    from splitnet.runtime.cut_codec import CutCodecs

    _, (xe, le) = data
    c, _ = tuned
    save_codec(c, tmp_path / "a.codec")
    lens = le[:3]
    T = int(lens.max())
    hidden = np.zeros((3, T, C), np.float32)
    mask = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)
    offs = np.concatenate([[0], np.cumsum(lens)])
    for i in range(3):
        hidden[i, : lens[i]] = xe[offs[i] : offs[i + 1]]
    sender = CutCodecs(codec_out=str(tmp_path / "a.codec"))
    receiver = CutCodecs(codec_files=(str(tmp_path / "a.codec"),))
    tensors, meta = sender.encode({"hidden": hidden, "attention_mask": mask})
    out = receiver.decode({k: np.asarray(v) for k, v in tensors.items()}, meta)
    want = c.decode(c.encode(xe[: offs[3]]), lengths=lens)
    np.testing.assert_allclose(out["hidden"][mask.astype(bool)], want, atol=1e-5)


def test_bad_adapter_config():
    with pytest.raises(ValueError):
        AdapterConfig(width=0)
    with pytest.raises(ValueError):
        make_codec("alignedvq", adapter="yes")
