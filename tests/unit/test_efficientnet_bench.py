"""The vision bench's pure parts: codec settings and the JPEG baseline."""

from __future__ import annotations

import numpy as np
import pytest

from splitnet.bench.codec_specs import parse_codec_spec, split_codec_specs
from splitnet.bench.vision import jpeg


def test_codec_settings_parse():
    assert split_codec_specs("fp16,int8,pq:m=16,nbits=8,topk:k=16") == ["fp16", "int8", "pq:m=16,nbits=8", "topk:k=16"]
    assert parse_codec_spec("pq:m=16/nbits=8") == ("pq", {"m": 16, "nbits": 8})
    assert parse_codec_spec("int8") == ("int8", {})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_codec_spec("pq:m16")


def test_jpeg_baseline_is_a_real_jpeg():
    rng = np.random.default_rng(0)
    img = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
    smooth = np.full((224, 224, 3), 120, np.uint8)
    n_noise, dec = jpeg(img, 90)
    n_smooth, _ = jpeg(smooth, 90)
    assert dec.shape == img.shape and dec.dtype == np.uint8
    assert n_smooth < n_noise  # bytes follow the content: it is measured, not assumed
    assert jpeg(img, 50)[0] < n_noise


def test_classifier_agreement_measures():
    import torch

    from splitnet.codecs.fidelity import classifier_agreement

    ref = torch.tensor([[6.0, 0, 0, 0, 0, 0, 0], [0.2, 0.1, 0, 0, 0, 0, 0]])
    same = classifier_agreement(ref, ref.clone(), k=2)
    assert same["top1_agreement"] == 1.0 and same["top2_overlap"] == 1.0 and abs(same["kl_mean"]) < 1e-6
    test = torch.tensor([[6.0, 0, 0, 0, 0, 0, 0], [0.1, 0.2, 0, 0, 0, 0, 0]])  # the unsure one flips
    got = classifier_agreement(ref, test, k=2)
    assert got["top1_agreement"] == 0.5 and got["top2_overlap"] == 1.0 and got["kl_mean"] > 0
    assert got["confident_fraction"] == 0.5 and got["top1_agreement_confident"] == 1.0
    unsure = classifier_agreement(ref[1:], test[1:], k=2)
    assert unsure["confident_fraction"] == 0.0 and unsure["top1_agreement_confident"] is None


def test_image_codecs_and_the_frontier_helpers():
    from splitnet.bench.vision import _best_image_within, _pareto, image_codec

    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    n_lo, dec = image_codec(img, "WEBP", 10)
    assert dec.shape == img.shape and n_lo < image_codec(img, "WEBP", 90)[0]
    assert _pareto([("a", 100, 0.5), ("b", 50, 0.6), ("c", 200, 0.1), ("d", 300, 0.2)]) == ["b", "a", "c"]
    pts = [{"format": "jpeg", "quality": q, "bytes_per_image_mean": b, "fidelity": {"top1_agreement": t, "kl_mean": 1 - t, "top1_agreement_confident": 1.0}}
           for q, b, t in ((10, 1000, 0.4), (50, 3000, 0.7), (90, 9000, 0.8))]
    assert _best_image_within(pts, 500) is None
    assert _best_image_within(pts, 5000)["what"] == "jpeg q50"


def test_edge_macs_share_grows_with_the_cut():
    from splitnet.model.efficientnet import EfficientNetLiteArchitecture, lite0_config

    arch = EfficientNetLiteArchitecture(lite0_config())
    stem, blocks, head = arch.macs()
    assert len(blocks) == 16 and 0.35e9 < stem + sum(blocks) + head < 0.45e9  # EfficientNet-Lite0: ~0.4 G multiply-adds
    shares = [arch.edge_macs_fraction(c) for c in range(0, 17)]
    assert all(a < b for a, b in zip(shares, shares[1:])) and 0 < shares[0] < 0.05 and 0.9 < shares[16] < 1.0


@pytest.mark.parametrize("argv, match", [
    (["--codecs", "nosuch"], "unknown codec"), (["--codecs", "transform:step=0"], "step"),
    (["--webp-qualities", "5,x"], "integers"), (["--jpeg-qualities", "101"], "0..100"), (["--per-source", "1"], "per-source"),
])
def test_bad_arguments_are_refused_before_any_work(argv, match):
    import argparse

    from splitnet.bench.vision import add_arguments, run
    from splitnet.errors import ConfigError

    p = argparse.ArgumentParser()
    add_arguments(p)
    with pytest.raises(ConfigError, match=match):
        run(p.parse_args(argv))


def test_wilson_interval():
    from splitnet.bench.vision import wilson95

    lo, hi = wilson95(1.0, 93)
    assert hi == 1.0 and abs(lo - 0.9603) < 1e-3  # 93 of 93 does not prove >= 99 %
    lo, hi = wilson95(0.5, 100)
    assert lo < 0.5 < hi and abs((hi - lo) - 0.19) < 0.01
    assert wilson95(None, 10) is None and wilson95(0.5, 0) is None
