"""Decoder families built from transformers' own modules (splitnet.model.hf_decoder), at tiny
sizes: checkpoints written by transformers' save_pretrained with random weights (norm weights and
biases randomised too, so an ignored tensor shows), cut into 2 and 3 stages, prompt fed in chunks
through per-stage caches; logits and greedy tokens must equal transformers'."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from splitnet.errors import ModelLoadError, StageError  # noqa: E402
from splitnet.model import load_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)

_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama": ("llama", {}),
    "llama-llama3-rope-biases": ("llama", {"rope_scaling": _LLAMA3_ROPE, "attention_bias": True, "mlp_bias": True}),
    "llama-linear-rope-gelu-headdim": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "hidden_act": "gelu", "head_dim": 32}),
    "llama-dynamic-rope-tied": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "tie_word_embeddings": True}),
    "llama-yarn-rope": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral-sliding": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "gemma2-sliding-softcap": ("gemma2", {"sliding_window": 6, "head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3-text-sliding": ("gemma3_text", {"sliding_window": 6, "head_dim": 16, "query_pre_attn_scalar": 16,
                                            "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]}),
    "gpt2-tied": ("gpt2", {}),
    "gpt2-relu-inverse-layer-scaling-untied": ("gpt2", {"activation_function": "relu", "scale_attn_by_inverse_layer_idx": True, "tie_word_embeddings": False}),
}

_GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}


def _checkpoint(tmp_path_factory, model_type: str, over: dict):
    base = dict(_BASE)
    if model_type == "gpt2":
        base = {_GPT2_NAMES.get(k, k): v for k, v in base.items() if k not in ("intermediate_size", "num_key_value_heads")}
        base.update(bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    cfg = transformers.AutoConfig.for_model(model_type, **{**base, **over})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model_type, over = CASES[request.param]
    d = _checkpoint(tmp_path_factory, model_type, over)
    return request.param, d, transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def _run(stages, caches, ids, all_logits=False):
    x = {"input_ids": ids}
    for s, c in zip(stages, caches):
        x = s(x, c, all_logits=all_logits)
    return x["logits"]


@pytest.mark.parametrize("cuts", [[2], [1, 3]])
def test_chunked_prefill_across_stages_matches_transformers(case, cuts):
    _, d, ref = case
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    bounds = [0, *cuts, 4]
    stages = [load_model(str(d), blocks=range(a, b)).stage(a, b) for a, b in zip(bounds, bounds[1:])]  # each loads its own tensors only
    caches = [s.new_cache() for s in stages]
    got = torch.cat([_run(stages, caches, chunk, all_logits=True) for chunk in (ids[:, :8], ids[:, 8:15], ids[:, 15:])], 1)
    assert (got - expected).abs().max().item() <= 1e-4
    assert [c.length for c in caches] == [21] * len(stages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_generate_in_the_same_dtype(case, dtype, tmp_path_factory):
    name, d, ref = case
    if dtype != torch.float32:
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 9:].tolist()
    bm = load_model(str(d))
    stages = [bm.stage(0, 2).to(dtype=dtype), bm.stage(2, 4).to(dtype=dtype)]
    if stages[0]._rotary is not None:
        bufs = [b for b in stages[0]._rotary.module.buffers() if b.is_floating_point()]
        assert bufs and all(b.dtype == torch.float32 for b in bufs)  # rotary frequencies stay fp32, as in transformers
    caches = [s.new_cache() for s in stages]
    tokens, ids = [], prompt
    for _ in range(32):
        t = int(_run(stages, caches, ids)[0].argmax())
        tokens.append(t)
        ids = torch.tensor([[t]])
    assert tokens == expected, name


def test_padded_batch_equals_one_by_one(case):
    _, d, _ = case
    st = load_model(str(d)).full()
    a = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    b = torch.randint(1, 97, (1, 4), generator=torch.Generator().manual_seed(4))
    batch = torch.zeros(2, 7, dtype=torch.long)
    batch[0], batch[1, 3:] = a[0], b[0]
    mask = torch.zeros(2, 7, dtype=torch.long)
    mask[0], mask[1, 3:] = 1, 1  # left padding
    out = st({"input_ids": batch, "attention_mask": mask}, all_logits=True)["logits"]
    assert (out[0] - st({"input_ids": a}, all_logits=True)["logits"][0]).abs().max() <= 1e-4
    assert (out[1, 3:] - st({"input_ids": b}, all_logits=True)["logits"][0]).abs().max() <= 1e-4


def test_rewind_for_speculation_matches_a_fresh_cache(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "qwen2", {})
    st = load_model(str(d)).full()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    cache = st.new_cache()
    st({"input_ids": ids}, cache)
    cache.truncate(8)  # four speculative tokens rejected
    got = st({"input_ids": ids[:, 8:10]}, cache)["logits"]
    fresh = st({"input_ids": ids[:, :10]}, st.new_cache())["logits"]
    assert cache.length == 10 and (got - fresh).abs().max() <= 1e-5
    assert cache.nbytes > 0


def test_errors_a_caller_can_act_on(tmp_path_factory):
    d = _checkpoint(tmp_path_factory, "llama", {})
    st = load_model(str(d)).full()
    with pytest.raises(StageError, match="outside the vocabulary"):
        st({"input_ids": torch.tensor([[1, 97]])}, st.new_cache())
    with pytest.raises(StageError, match="exceeds max_position_embeddings=128"):
        st({"input_ids": torch.zeros(1, 129, dtype=torch.long)}, st.new_cache())


def test_untied_head_without_lm_head_is_refused(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    d = _checkpoint(tmp_path_factory, "llama", {})
    f = next(d.glob("*.safetensors"))
    tensors = {k: v for k, v in load_file(f).items() if k != "lm_head.weight"}
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="tie_word_embeddings"):
        load_model(str(d))


def test_a_tensor_nobody_loads_is_refused(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    d = _checkpoint(tmp_path_factory, "llama", {})
    f = next(d.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)  # a module this config does not have
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="would not use.*q_norm"):
        load_model(str(d), blocks=range(2, 4))  # even a stage that does not hold layer 1
