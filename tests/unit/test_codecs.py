"""Every codec: shape/dtype round trips, fidelity sanity, fit/save/load/hash errors, registry."""

import json

import numpy as np
import pytest

from splitnet.codecs import gather_tokens, known_codecs, load_codec, make_codec, save_codec, scatter_tokens
from splitnet.codecs.framing import check_hash
from splitnet.errors import CodecError

C = 64


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((8, C)).astype(np.float32)
    return (rng.standard_normal((6000, 8)).astype(np.float32) @ basis + 0.05 * rng.standard_normal((6000, C))).astype(np.float32)


CONFIGS = [
    ("fp32", {}), ("fp16", {}), ("int8", {}), ("int8", {"axis": "channel"}), ("int4", {}), ("int4", {"axis": "channel"}),
    ("topk", {"k": 8}), ("pq", {"m": 4, "nbits": 6, "niter": 4}), ("rvq", {"stages": 2, "nbits": 6, "niter": 4, "beam": 2}),
    ("alignedvq", {"stages": 2, "nbits": 6, "niter": 4}), ("alignedvq", {"stages": 2, "nbits": 7, "niter": 4, "dim": 16, "refine": 1}),
    ("alignedvq", {"stages": 1, "nbits": 5, "niter": 4, "norm": "token", "side_bits": 5, "entropy": "zlib"}),
]


@pytest.fixture(scope="module")
def fitted(calib):
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS):
        c = make_codec(name, **cfg)
        out[i] = c.fit(calib, progress=False) if c.needs_fit else c
    return out


def cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[f"{n}-{c}" for n, c in CONFIGS])
def test_round_trip_shape_dtype_and_fidelity(i, fitted, calib):
    codec = fitted[i]
    x = calib[:60].reshape(3, 20, C)
    p = codec.encode(x)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == np.float32
    assert p.nbytes > 0 and p.codec == codec.name and p.codebook_hash == codec.codebook_hash
    assert cos(x, y) > (0.99 if codec.name in ("fp32", "fp16", "int8") else 0.6)
    if codec.name == "fp32":
        np.testing.assert_array_equal(x, y)
    # every part is wire-sendable
    from splitnet.wire.dtypes import wire_name_of_numpy

    for arr in p.parts.values():
        wire_name_of_numpy(arr.dtype)


def test_torch_input_accepted(fitted):
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 5, C)
    y = fitted[0].decode(fitted[0].encode(x))
    np.testing.assert_allclose(y, x.numpy())


def test_bytes_follow_bits(calib):
    c = make_codec("alignedvq", stages=2, nbits=9, niter=3).fit(calib, progress=False)
    p = c.encode(calib[:1000])
    assert p.parts["b"].nbytes == 1000 * 2 * 9 // 8  # 18 bits per token, not 32
    i4 = make_codec("int4").encode(calib[:1000])
    assert i4.parts["q"].nbytes == 1000 * C // 2


def test_unfitted_codec_raises(calib):
    for name in ("pq", "rvq", "alignedvq"):
        with pytest.raises(CodecError, match="not fitted"):
            make_codec(name).encode(calib[:4])


def test_wrong_width_raises(fitted):
    with pytest.raises(CodecError, match="channels"):
        fitted[9].encode(np.zeros((3, C + 1), np.float32))


def test_unknown_codec_lists_known():
    with pytest.raises(ValueError, match="alignedvq"):
        make_codec("nope")
    assert {"fp32", "fp16", "int8", "int4", "topk", "pq", "rvq", "alignedvq"} <= set(known_codecs())


def test_bad_config_raises():
    with pytest.raises(ValueError):
        make_codec("alignedvq", norm="batch")
    with pytest.raises(ValueError):
        make_codec("int4", axis="row")
    with pytest.raises(ValueError):
        make_codec("pq", m=0)


@pytest.mark.parametrize("i", [7, 8, 9, 10, 11])
def test_save_load_same_decode_and_hash(i, fitted, calib, tmp_path):
    c = fitted[i]
    path = tmp_path / "c.codec"
    save_codec(c, path)
    manifest = json.loads((tmp_path / "c.codec.json").read_text())
    assert manifest["codec"] == c.name and manifest["sha256"].startswith(c.codebook_hash)
    c2 = load_codec(path)
    assert c2.codebook_hash == c.codebook_hash
    p = c.encode(calib[:50])
    np.testing.assert_array_equal(c2.decode(p), c.decode(p))
    load_codec(path, expected_hash=c.codebook_hash)
    with pytest.raises(CodecError, match="expected"):
        load_codec(path, expected_hash="0" * 16)


def test_tampered_file_raises(fitted, tmp_path):
    path = tmp_path / "c.codec"
    save_codec(fitted[9], path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the last array
    path.write_bytes(bytes(raw))
    with pytest.raises(CodecError, match="modified"):
        load_codec(path)


def test_tampered_manifest_and_missing_files(fitted, tmp_path):
    path = tmp_path / "c.codec"
    save_codec(fitted[9], path)
    mp = tmp_path / "c.codec.json"
    m = json.loads(mp.read_text())
    m["config"]["nbits"] = 5
    mp.write_text(json.dumps(m))
    with pytest.raises(CodecError, match="modified"):
        load_codec(path)
    mp.write_text("{not json")
    with pytest.raises(CodecError, match="JSON"):
        load_codec(path)
    with pytest.raises(CodecError, match="missing"):
        load_codec(tmp_path / "absent.codec")


def test_payload_from_other_codebook_refused(calib):
    a = make_codec("alignedvq", stages=1, nbits=5, niter=3, seed=0).fit(calib, progress=False)
    b = make_codec("alignedvq", stages=1, nbits=5, niter=3, seed=1).fit(calib, progress=False)
    assert a.codebook_hash != b.codebook_hash
    p = a.encode(calib[:10])
    with pytest.raises(CodecError, match="codebook"):
        b.decode(p)
    with pytest.raises(CodecError):
        check_hash(b.codebook_hash, p)
    check_hash(a.codebook_hash, p)


def test_truncated_payload_raises(fitted, calib):
    from dataclasses import replace

    for i in (4, 6, 9, 10):
        p = fitted[i].encode(calib[:10])
        key = next(iter(p.parts))
        bad = replace(p, parts={**p.parts, key: p.parts[key][:-1]})
        with pytest.raises(CodecError):
            fitted[i].decode(bad)


def test_zlib_bomb_guard(fitted, calib):
    import zlib
    from dataclasses import replace

    c = fitted[11]
    p = c.encode(calib[:20])
    bomb = np.frombuffer(zlib.compress(b"\0" * 10_000_000), np.uint8)
    with pytest.raises(CodecError):
        c.decode(replace(p, parts={"b": bomb}, meta={"z": 1}))


def test_truncated_and_refined_rates(calib):
    c = make_codec("alignedvq", stages=3, nbits=6, niter=3, refine=0).fit(calib, progress=False)
    x = calib[:500]
    errs = [float(np.mean((c.truncated(s).decode(c.truncated(s).encode(x)) - x) ** 2)) for s in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]
    t = c.truncated(2)
    e_free = float(np.mean((t.decode(t.encode(x)) - x) ** 2))
    t.refine_decoder(calib, 2, progress=False)
    assert float(np.mean((t.decode(t.encode(x)) - x) ** 2)) <= e_free * 1.01
    r = make_codec("rvq", stages=2, nbits=5, niter=3, beam=1).fit(calib, progress=False)
    assert r.truncated(1).encode(x).parts["b"].nbytes == 500 * 5 // 8 + (1 if 500 * 5 % 8 else 0)


def test_padding_is_not_sent():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((2, 5, C)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tok = gather_tokens(h, mask)
    assert tok.shape == (8, C)
    back = scatter_tokens(make_codec("fp32").decode(make_codec("fp32").encode(tok)), mask)
    np.testing.assert_array_equal(back[mask.astype(bool)], h[mask.astype(bool)])
    assert not back[0, 3:].any()
    with pytest.raises(CodecError):
        scatter_tokens(tok[:7], mask)


def test_calibrate_rate_parsing():
    from splitnet.codecs.cli import parse_rate

    assert parse_rate("alignedvq", "3x12") == {"stages": 3, "nbits": 12}
    assert parse_rate("pq", "4x8bit") == {"m": 4, "nbits": 8}
    assert parse_rate("topk", "k=16") == {"k": 16}
    assert parse_rate("int4", None) == {}
    for bad in ("3x", "x12", "fast"):
        with pytest.raises(ValueError, match="--rate"):
            parse_rate("rvq", bad)


@pytest.mark.parametrize("extra", [["--set", "entropy=order1"], ["--set", "entropy=context"], ["--set", "entropy=huffman"], ["--set", "anchor_contexts=4"]])
def test_calibrate_refuses_anchor_options_without_anchors(extra, tmp_path, capsys):
    from splitnet.cli import main

    rc = main(["calibrate", "--model", "minilm", "--split-after", "2", "--codec", "alignedvq", "--rate", "2x12",
               *extra, "--out", str(tmp_path / "c.codec"), "--quiet"])
    assert rc == 2
    assert "--anchors" in capsys.readouterr().err
    assert not (tmp_path / "c.codec").exists()


@pytest.mark.parametrize("extra", [["--codec", "rvq", "--sequence-bits", "64"], ["--codec", "rvq", "--adapter-steps", "5"],
                                   ["--codec", "alignedvq", "--sequence-bits", "-3"]])
def test_calibrate_refuses_alignedvq_only_options_before_any_work(extra, tmp_path, capsys):
    from splitnet.cli import main

    rc = main(["calibrate", "--model", "minilm", "--split-after", "2", "--rate", "2x12", *extra,
               "--out", str(tmp_path / "c.codec"), "--quiet"])
    assert rc == 2
    assert "applies to --codec alignedvq only" in capsys.readouterr().err
    assert not (tmp_path / "c.codec").exists()
