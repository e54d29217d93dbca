"""Real model shapes with random weights, for timing at real sizes (no hub: built from a config).

``shape:llama-3-8b`` names Llama-3-8B's architecture; its checkpoint is written once (by
transformers' ``from_config`` on the bench's device, normal(0, 0.02) weights as transformers
initialises them, then ``save_pretrained``) under the cache directory and reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SHAPES: dict[str, dict] = {
    "llama-3-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2-1.5b": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
        "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    },
}
PREFIX = "shape:"


def is_shape(name: str) -> bool:
    return name.startswith(PREFIX)


def shape_dir(name: str, *, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """The checkpoint directory of ``shape:NAME`` in ``dtype``, written on first use."""
    import torch
    import transformers

    from splitnet.errors import ConfigError
    from splitnet.model.builtin import cache_dir, write_once

    key = name[len(PREFIX):] if is_shape(name) else name
    if key not in SHAPES:
        raise ConfigError(f"unknown model shape {key!r}; known: {', '.join(sorted(SHAPES))}")
    config = SHAPES[key]
    digest = hashlib.sha256(json.dumps([config, dtype], sort_keys=True).encode()).hexdigest()[:10]

    def write(out: Path) -> None:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        model.save_pretrained(out)

    return write_once(cache_dir() / "shapes" / f"{key}-{dtype}-{digest}", "config.json", write)
