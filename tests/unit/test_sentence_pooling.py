"""The real all-MiniLM-L6-v2 against sentence-transformers, and every pooling mode of
1_Pooling/config.json (a max-pooling and a mean-sqrt-len copy, and all modes concatenated)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

st_pkg = pytest.importorskip("sentence_transformers")

from splitnet.errors import ModelLoadError  # noqa: E402
from splitnet.model import load_model  # noqa: E402
from splitnet.model.loading import resolve_model_dir  # noqa: E402

pytestmark = pytest.mark.timeout(300)

SENTENCES = [f"sentence {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 7) for i in range(48)]
SENTENCES += ["a short one", " ".join(f"word{i}" for i in range(400))]  # the last one is over 256 tokens


def _embed(d, sentences):
    bm = load_model(str(d))
    full = bm.full()
    ref = st_pkg.SentenceTransformer(str(d), device="cpu")
    feats = ref.tokenize(sentences)  # sentence-transformers' own tokenization (max_seq_length 256)
    with torch.no_grad():
        want = ref.encode(sentences, convert_to_tensor=True, batch_size=64)
        got = full({"input_ids": feats["input_ids"], "attention_mask": feats["attention_mask"], "token_type_ids": feats.get("token_type_ids", torch.zeros_like(feats["input_ids"]))})["embedding"]
    return got, want, feats


def test_minilm_equals_sentence_transformers():
    d = resolve_model_dir("minilm")
    got, want, feats = _embed(d, SENTENCES)
    assert feats["input_ids"].shape[1] == 256  # the long input is truncated by the reference too
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("modes", [pytest.param({"pooling_mode_max_tokens": True}, marks=pytest.mark.slow),
                                   pytest.param({"pooling_mode_mean_sqrt_len_tokens": True}, marks=pytest.mark.slow),
                                   {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": True}])  # the combined one covers all three in CI
def test_pooling_copies_equal_sentence_transformers(tmp_path, modes):
    d = tmp_path / "minilm"
    shutil.copytree(resolve_model_dir("minilm"), d)
    cfg_file = d / "1_Pooling" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for k in list(cfg):
        if k.startswith("pooling_mode"):
            cfg[k] = False
    cfg.update(modes)
    cfg_file.write_text(json.dumps(cfg))
    got, want, _ = _embed(d, SENTENCES[:20] + SENTENCES[-2:])
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_unsupported_sentence_modules_are_refused(tmp_path):
    d = tmp_path / "minilm"
    shutil.copytree(resolve_model_dir("minilm"), d)
    modules = json.loads((d / "modules.json").read_text())
    modules.append({"idx": len(modules), "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        load_model(str(d))
    modules.pop()
    (d / "modules.json").write_text(json.dumps(modules))
    cfg_file = d / "1_Pooling" / "config.json"
    cfg = {k: False for k in json.loads(cfg_file.read_text()) if k.startswith("pooling_mode")}
    cfg["pooling_mode_lasttoken"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="lasttoken"):
        load_model(str(d))


def test_splitnet_tokenizer_truncates_like_sentence_transformers():
    d = resolve_model_dir("minilm")
    ref = st_pkg.SentenceTransformer(str(d), device="cpu")
    feats = ref.tokenize(SENTENCES)
    ours = load_model("minilm").tokenize(SENTENCES, max_length=256)
    assert torch.equal(ours["input_ids"], feats["input_ids"])  # the long input keeps its final [SEP]
    assert torch.equal(ours["attention_mask"], feats["attention_mask"])
