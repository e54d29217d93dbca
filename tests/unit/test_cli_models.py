"""`splitnet models` lists the built-in models and every family the loader accepts."""

from __future__ import annotations

import json

import pytest

from splitnet.cli import main

pytestmark = pytest.mark.timeout(60)


def test_models_json_lists_builtins_and_families(capsys):
    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"minilm", "tiny-llama", "stdlib-gpt"} <= set(doc["builtin_models"])
    for family in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"):
        assert "transformers" in doc["families"][family], family
    for family in ("bert", "roberta", "xlm-roberta", "distilbert"):
        assert doc["families"][family].startswith("encoder, transformers'"), family
