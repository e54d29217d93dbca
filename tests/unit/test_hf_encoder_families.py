"""Text encoders built from transformers' own modules (splitnet.model.hf_encoder), at tiny sizes:
checkpoints written by save_pretrained (norms and biases randomised), cut into 2 and 3 stages; the
last hidden state (mean-pooled by the head) equals transformers' on a padded batch."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from splitnet.errors import ModelLoadError  # noqa: E402
from splitnet.model import load_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)

_BERTISH = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=64)
CASES = {
    "bert": ("bert", _BERTISH),
    "bert-gelu-new": ("bert", {**_BERTISH, "hidden_act": "gelu_new", "type_vocab_size": 3}),
    "roberta": ("roberta", {**_BERTISH, "pad_token_id": 1}),
    "xlm-roberta": ("xlm-roberta", {**_BERTISH, "pad_token_id": 1}),
    "distilbert": ("distilbert", dict(vocab_size=97, dim=64, hidden_dim=96, n_layers=4, n_heads=4, max_position_embeddings=64)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, cfg = CASES[request.param]
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return request.param, d, transformers.AutoModel.from_pretrained(d).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0  # right padding, as tokenizers pad encoders
    ids[mask == 0] = 1
    return ids, mask


@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_stages_equal_transformers_on_a_padded_batch(case, cuts):
    name, d, ref = case
    ids, mask = _batch()
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    want = (h * m).sum(1) / m.sum(1)  # the head's default: masked mean
    bounds = [0, *cuts, 4]
    stages = [load_model(str(d), blocks=range(a, b)).stage(a, b) for a, b in zip(bounds, bounds[1:])]
    x = {"input_ids": ids, "attention_mask": mask}
    for s in stages:
        x = s(x)
    assert (x["embedding"] - want).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize("name", ["bert", "roberta", "xlm-roberta", "distilbert"])
def test_sequence_classification_heads_equal_transformers(tmp_path, name):
    model_type, cfg = CASES[name]
    config = transformers.AutoConfig.for_model(model_type, **cfg, num_labels=3)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    x = {"input_ids": ids, "attention_mask": mask}
    for a, b in ((0, 2), (2, 4)):
        x = load_model(str(tmp_path), blocks=range(a, b)).stage(a, b)(x)
    assert (x["logits"] - want).abs().max().item() <= 1e-5


def test_a_task_head_splitnet_does_not_run_is_refused(tmp_path):
    config = transformers.AutoConfig.for_model("bert", **_BERTISH)
    transformers.AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="cls"):
        load_model(str(tmp_path))
