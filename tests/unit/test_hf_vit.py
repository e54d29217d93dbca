"""ViT from transformers' own modules (splitnet.model.hf_vision): 2 and 3 stages equal
ViTForImageClassification's logits (a checkpoint written by save_pretrained), and the hub's
``encoder.layer.N`` names load as well as transformers 5's ``layers.N``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from splitnet.errors import StageError  # noqa: E402
from splitnet.model import load_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=96, num_labels=5, architectures=["ViTForImageClassification"])
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp("vit")
    model.save_pretrained(d)
    return d, model.eval()


@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_stages_equal_vit_for_image_classification(vit, cuts):
    d, ref = vit
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(pixel_values=x).logits
    bounds = [0, *cuts, 4]
    out = {"pixel_values": x}
    for a, b in zip(bounds, bounds[1:]):
        out = load_model(str(d), blocks=range(a, b)).stage(a, b)(out)
    assert (out["logits"] - want).abs().max().item() <= 1e-5


def test_wrong_image_size_is_a_stage_error(vit):
    d, _ = vit
    with pytest.raises(StageError, match="pixel_values must be"):
        load_model(str(d)).full()({"pixel_values": torch.zeros(1, 3, 31, 32)})


def test_builtin_tiny_vit_uses_the_hub_names():
    bm = load_model("tiny-vit")
    assert type(bm.full()).__name__ == "HFViTStage"
    assert bm.full()({"pixel_values": torch.zeros(2, 3, 32, 32)})["logits"].shape == (2, 10)
