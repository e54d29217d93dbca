"""Real model families split over real stage processes, against transformers in the same run.

For each decoder family built from transformers' modules (``splitnet.model.hf_decoder.FAMILIES``)
a checkpoint is written by transformers' own ``save_pretrained`` from a config (random weights;
norm weights and biases randomised too, so an ignored tensor shows). It is served as 2 and as 3
``serve-stage`` processes on 127.0.0.1, and the bench reports:

- ``logits_max_abs_diff``: last-position logits of a left-padded batch of 4 prompts (the pipeline's
  ``infer``) vs transformers fp32 on each prompt alone (so it also checks padding);
- ``greedy_equal``: 32 greedy tokens through the pipeline (``generate``) equal
  ``generate(do_sample=False)`` for an 8-token and a 300-token prompt, in fp32 and with the stages in
  bf16 against transformers in bf16;
- the encoder: the real all-MiniLM-L6-v2 over 2 stage processes vs sentence-transformers on 50
  sentences (one over 256 tokens), and a max-pooling copy;
- ``encoder_families``: BERT, RoBERTa, XLM-RoBERTa, DistilBERT (masked-mean embedding of a padded
  batch vs transformers' last hidden state, and each one's ForSequenceClassification logits) and
  ViT (ViTForImageClassification logits), each
  config-built by transformers, over 2 and 3 stage processes;
- ``refusals``: each case the loader must refuse, with the message it gives.

The baseline is transformers itself (and sentence-transformers), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

#: family -> config overrides: the settings the review found silently wrong, on purpose
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {"rope_scaling": _LLAMA3, "attention_bias": True, "mlp_bias": True},
    "mistral": {"sliding_window": 64},  # shorter than the 300-token prompt
    "qwen2": {},
    "qwen3": {},
    "phi3": {"pad_token_id": 0},
    "gemma2": {"sliding_window": 64, "head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": 64, "head_dim": 16, "query_pre_attn_scalar": 16},  # 5 sliding layers, then 1 full
    "gpt2": {"activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": True},
}
_GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "max_position_embeddings": "n_positions"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", default=",".join(FAMILY_CONFIGS), help="comma-separated decoder families")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=300, help="tokens of the long prompt")
    p.add_argument("--no-encoder", action="store_true", help="skip MiniLM vs sentence-transformers")


def write_checkpoint(model_type: str, out: Path, over: dict | None = None, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``model_type`` written by transformers' save_pretrained."""
    import torch
    import transformers

    base = dict(_SMALL)
    if model_type == "gpt2":
        base = {_GPT2_NAMES.get(k, k): v for k, v in base.items() if k not in ("intermediate_size", "num_key_value_heads")}
        base.update(bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    cfg = transformers.AutoConfig.for_model(model_type, **{**base, **(over or {})})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(out)
    return out


def _family(model_type: str, over: dict, work: Path, n_new: int, long_prompt: int) -> dict:
    import torch
    import transformers

    import splitnet.edge.sdk as sdk
    from splitnet.edge.config import ClientConfig
    from splitnet.runtime.launcher import launch_pipeline

    d = write_checkpoint(model_type, work / model_type, over)
    refs = {dt: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dt)).eval() for dt in ("float32", "bfloat16")}
    gen = torch.Generator().manual_seed(7)
    prompts = {"8": torch.randint(1, 97, (8,), generator=gen).tolist(), str(long_prompt): torch.randint(1, 97, (long_prompt,), generator=gen).tolist()}
    expected = {}
    for dt, ref in refs.items():
        for name, p in prompts.items():
            out = ref.generate(torch.tensor([p]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            expected[(dt, name)] = out[0, len(p):].tolist()
    batch_prompts = [torch.randint(1, 97, (n,), generator=gen).tolist() for n in (5, 11, 8, 3)]
    width = max(map(len, batch_prompts))
    ids = np.zeros((len(batch_prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(batch_prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1  # left padding
    with torch.no_grad():
        alone = np.stack([refs["float32"](torch.tensor([p])).logits[0, -1].numpy() for p in batch_prompts])
    row: dict[str, Any] = {"config": over, "layers": 6}
    for n_stages, cuts in ((2, [3]), (3, [2, 4])):
        for dt in ("float32", "bfloat16"):
            key = f"{n_stages}_stages_{dt}"
            t0 = time.perf_counter()
            with launch_pipeline(str(d), cuts, extra_args=("--dtype", dt)) as pipe:
                with sdk.connect(pipe.endpoints, config=ClientConfig(timeout_s=120, prefill_chunk_tokens=64)) as s:
                    res: dict[str, Any] = {}
                    if dt == "float32":
                        got = s.infer({"input_ids": ids, "attention_mask": mask})["logits"]
                        res["logits_max_abs_diff"] = float(np.abs(np.asarray(got) - alone).max())
                    for name, p in prompts.items():
                        toks = list(s.generate(p, n_new).tokens)
                        want = expected[(dt, name)]
                        res[f"greedy_equal_{name}"] = toks == want
                        if toks != want:
                            res[f"first_difference_{name}"] = next(i for i, (a, b) in enumerate(zip(toks, want)) if a != b) if any(a != b for a, b in zip(toks, want)) else min(len(toks), len(want))
            res["seconds"] = round(time.perf_counter() - t0, 1)
            row[key] = res
            print(f"models {model_type:8s} {key:18s} {res}", file=sys.stderr, flush=True)
    return row


def _encoder(work: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    import splitnet.edge.sdk as sdk
    from splitnet.edge.config import ClientConfig
    from splitnet.model.loading import resolve_model_dir
    from splitnet.runtime.launcher import launch_pipeline

    sentences = [f"sentence {i}: " + "the quick brown fox jumps over the lazy dog " * (1 + i % 7) for i in range(49)]
    sentences.append(" ".join(f"word{i}" for i in range(400)))  # over 256 tokens
    src = resolve_model_dir("minilm")
    maxpool = work / "minilm-max"
    shutil.copytree(src, maxpool)
    cfg_file = maxpool / "1_Pooling" / "config.json"
    cfg = {k: (k == "pooling_mode_max_tokens") if k.startswith("pooling_mode") else v for k, v in json.loads(cfg_file.read_text()).items()}
    cfg_file.write_text(json.dumps(cfg))
    out = {}
    for name, d in (("all-MiniLM-L6-v2", src), ("max-pooling copy", maxpool)):
        ref = SentenceTransformer(str(d), device="cpu")
        want = ref.encode(sentences, convert_to_numpy=True, batch_size=64)
        with launch_pipeline(str(d), [3]) as pipe:
            with sdk.connect(pipe.endpoints, config=ClientConfig(timeout_s=120)) as s:
                got = s.infer({"text": sentences, "max_length": 256})["embedding"]
        tokens = int(ref.tokenize(sentences)["input_ids"].shape[1])
        out[name] = {"sentences": len(sentences), "max_tokens": tokens, "max_abs_diff": float(np.abs(np.asarray(got) - want).max()),
                     "stages": 2, "reference": f"sentence-transformers {__import__('sentence_transformers').__version__}"}
        print(f"models encoder {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


ENCODER_CONFIGS: dict[str, dict] = {
    "bert": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=64),
    "roberta": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1),
    "xlm-roberta": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4, max_position_embeddings=64, pad_token_id=1),
    "distilbert": dict(vocab_size=97, dim=64, hidden_dim=96, n_layers=6, n_heads=4, max_position_embeddings=64),
}


def _tiny_encoders(work: Path) -> dict:
    """Each text-encoder family and ViT, config-built by transformers, over 2 and 3 stage processes."""
    import torch
    import transformers

    import splitnet.edge.sdk as sdk
    from splitnet.edge.config import ClientConfig
    from splitnet.runtime.launcher import launch_pipeline

    out: dict[str, dict] = {}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 1
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    cases = [(n, c) for n, c in ENCODER_CONFIGS.items()] + [(f"{n}-classifier", c) for n, c in ENCODER_CONFIGS.items()] + [("vit", None)]
    for name, cfg in cases:
        torch.manual_seed(0)
        classifier = name.endswith("-classifier")
        if classifier:
            model = transformers.AutoModelForSequenceClassification.from_config(
                transformers.AutoConfig.for_model(name[: -len("-classifier")], **cfg, num_labels=3))
        elif name == "vit":
            config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                            intermediate_size=96, num_labels=5, architectures=["ViTForImageClassification"])
            model = transformers.ViTForImageClassification(config)
        else:
            model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(name, **cfg))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname.lower() or pname.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.2)
        d = work / f"enc-{name}"
        model.save_pretrained(d)
        model.eval()
        with torch.no_grad():
            if name == "vit":
                want, inputs, key = model(pixel_values=pixels).logits.numpy(), {"pixel_values": pixels.numpy()}, "logits"
            elif classifier:
                want = model(input_ids=ids, attention_mask=mask).logits.numpy()
                inputs, key = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, "logits"
            else:
                h = model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).float()
                want, inputs, key = ((h * m).sum(1) / m.sum(1)).numpy(), {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, "embedding"
        row = {}
        for n_stages, cuts in ((2, [3]), (3, [2, 4])):
            with launch_pipeline(str(d), cuts) as pipe:
                with sdk.connect(pipe.endpoints, config=ClientConfig(timeout_s=120)) as s:
                    got = s.infer(inputs)[key]
            row[f"{n_stages}_stages_max_abs_diff"] = float(np.abs(np.asarray(got) - want).max())
        out[name] = row
        print(f"models encoder {name}: {row}", file=sys.stderr, flush=True)
    return out


def _refusals(work: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from splitnet.errors import ModelLoadError, StageError
    from splitnet.model import load_model

    cases: dict[str, dict] = {}

    def refused(name: str, fn) -> None:
        try:
            fn()
            cases[name] = {"refused": False}
        except (ModelLoadError, StageError) as e:
            cases[name] = {"refused": True, "error": type(e).__name__, "message": str(e)[:300]}

    d = write_checkpoint("llama", work / "refuse-extra")
    f = next(d.glob("*.safetensors"))
    t = load_file(f)
    t["model.layers.1.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(t, f, metadata={"format": "pt"})
    refused("a checkpoint tensor no module loads", lambda: load_model(str(d), blocks=range(3, 6)))
    d = write_checkpoint("llama", work / "refuse-head")
    f = next(d.glob("*.safetensors"))
    save_file({k: v for k, v in load_file(f).items() if k != "lm_head.weight"}, f, metadata={"format": "pt"})
    refused("untied config without lm_head.weight", lambda: load_model(str(d)))
    d = work / "refuse-type"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba", "num_hidden_layers": 2}))
    refused("an unsupported model_type", lambda: load_model(str(d)))
    d = write_checkpoint("qwen2", work / "refuse-ids")
    st = load_model(str(d)).full()
    refused("a token id outside the vocabulary", lambda: st({"input_ids": torch.tensor([[5, 97]])}, st.new_cache()))
    refused("a sequence past max_position_embeddings", lambda: st({"input_ids": torch.zeros(1, 513, dtype=torch.long)}, st.new_cache()))
    return cases


def run(args: argparse.Namespace) -> dict:
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILY_CONFIGS]
    if unknown:
        raise SystemExit(f"splitnet bench models: unknown families {unknown}; known: {', '.join(FAMILY_CONFIGS)}")
    work = Path(tempfile.mkdtemp(prefix="splitnet-bench-models-"))
    t0 = time.perf_counter()
    try:
        decoders = {f: _family(f, FAMILY_CONFIGS[f], work, args.new_tokens, args.long_prompt) for f in families}
        encoder = None if args.no_encoder else _encoder(work)
        tiny_encoders = None if args.no_encoder else _tiny_encoders(work)
        refusals = _refusals(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def runs(row: dict) -> list[dict]:
        return [v for k, v in row.items() if k.endswith(("_float32", "_bfloat16"))]

    goals = {
        "logits_within_1e-4": all(r["logits_max_abs_diff"] <= 1e-4 for row in decoders.values() for r in runs(row) if "logits_max_abs_diff" in r),
        "greedy_equal_fp32_and_bf16": all(v for row in decoders.values() for r in runs(row) for k, v in r.items() if k.startswith("greedy_equal")),
        "encoders_within_1e-5": encoder is None or all(e["max_abs_diff"] <= 1e-5 for e in encoder.values()),
        "tiny_encoders_and_vit_within_1e-5": tiny_encoders is None or all(v <= 1e-5 for row in tiny_encoders.values() for v in row.values()),
        "every_refusal_refused": all(c["refused"] for c in refusals.values()),
    }
    doc = {
        "config": {"families": families, "new_tokens": args.new_tokens, "prompts": [8, args.long_prompt], "stage_splits": {"2": [3], "3": [2, 4]},
                   "checkpoints": "transformers save_pretrained from a config, random weights, norms and biases randomised", "layers": 6,
                   "transport": "serve-stage processes on 127.0.0.1 (--insecure)"},
        "baseline": "transformers (generate, forward) and sentence-transformers in the same run",
        "decoders": decoders,
        "encoder": encoder,
        "encoder_families": tiny_encoders,
        "refusals": refusals,
        "goals": goals,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    doc["exit_code"] = 0 if all(goals.values()) else 1
    return doc


def summarize(doc: dict) -> str:
    lines = [f"models: goals={doc['goals']} ({doc['elapsed_s']} s)"]
    for fam, row in doc["decoders"].items():
        cells = [f"{k}: " + " ".join(f"{n}={v}" for n, v in r.items() if n != "seconds") for k, r in row.items() if isinstance(r, dict) and k != "config"]
        lines.append(f"  {fam}: " + "; ".join(cells))
    for name, e in (doc["encoder"] or {}).items():
        lines.append(f"  {name}: max|diff| {e['max_abs_diff']:.2e} over {e['sentences']} sentences")
    for name, c in doc["refusals"].items():
        lines.append(f"  refused {c['refused']}: {name}: {c.get('message', '')[:120]}")
    return "\n".join(lines)
