"""Speculative decoding with an edge draft model: the pipeline verifies the draft's proposals in
one pass and the stages rewind their caches past rejected tokens; the tokens equal plain greedy."""

from __future__ import annotations

import pytest
import torch

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.draft import DraftModel
from splitnet.edge.sampling import SamplingConfig
from splitnet.errors import ConfigError
from splitnet.model import load_model
from splitnet.runtime.launcher import launch_pipeline

pytestmark = pytest.mark.timeout(240)

PROMPT = "def speculate(draft, target):\n    return"


@pytest.fixture(scope="module")
def gpt_pipe():
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        yield pipe


def _noisy_draft(scale: float) -> DraftModel:
    """The target's weights plus noise: a draft that agrees often, but not always."""
    bm = load_model("tiny-gpt2")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bm.full().parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return DraftModel(bm)


def test_perfect_draft_is_fully_accepted(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, config=ClientConfig(timeout_s=30)) as s:
        plain = s.generate(PROMPT, 21)
        spec = s.generate(PROMPT, 21, draft=DraftModel("tiny-gpt2"), speculate_tokens=4)
    assert spec.tokens == plain.tokens
    st = spec.stats["speculative"]
    assert st["acceptance"] == 1.0 and st["steps"] == 4 and st["tokens_per_step"] == 5.0  # 1 + 4 x (4 drafts + 1)
    # every stage computed each kept token once, plus nothing rejected
    assert spec.stats["tokens_computed"] == plain.stats["tokens_computed"]


def test_imperfect_draft_still_gives_greedy_tokens_and_caches_rewind(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, config=ClientConfig(timeout_s=30)) as s:
        plain = s.generate(PROMPT, 30)
        spec = s.generate(PROMPT, 30, draft=_noisy_draft(0.1), speculate_tokens=3)
    assert spec.tokens == plain.tokens
    st = spec.stats["speculative"]
    assert 0 < st["accepted"] < st["proposed"], st  # some proposals rejected, some kept
    assert st["steps"] < 29  # fewer round trips than one per token


def test_speculation_is_greedy_only(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, config=ClientConfig(timeout_s=30)) as s:
        with pytest.raises(ConfigError, match="greedy"):
            s.generate(PROMPT, 4, draft=DraftModel("tiny-gpt2"), sampling=SamplingConfig(temperature=1.0))


def test_reduced_heads_match_full_logits(gpt_pipe):
    """argmax / top-k replies pick the same tokens as whole logits, for the same seed."""
    with splitnet.connect(gpt_pipe.endpoints, config=ClientConfig(timeout_s=30)) as s:
        topk = SamplingConfig(temperature=0.8, top_k=20, seed=11)
        sampled = s.generate(PROMPT, 12, sampling=topk)
        greedy = s.generate(PROMPT, 12)
        full = s.generate(PROMPT, 12, sampling=SamplingConfig(temperature=1.0, seed=1))  # needs whole logits
    bm = load_model("tiny-gpt2")
    stage = bm.full()
    from splitnet.edge.sampling import Sampler
    for cfg, got in ((SamplingConfig(), greedy.tokens), (topk, sampled.tokens)):
        sampler, cache = Sampler(cfg), stage.new_cache()
        ids = torch.tensor([greedy.prompt_ids])
        toks = []
        for _ in range(12):
            logits = stage({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache)["logits"][0].numpy()
            toks.append(sampler(logits))
            ids = torch.tensor([[toks[-1]]])
        assert toks == got, cfg
    vocab = logits.shape[-1]
    # the greedy reply carries an int64 argmax where whole logits are 4 x vocab bytes
    assert full.stats["prefill"]["result_bytes"] - greedy.stats["prefill"]["result_bytes"] >= 4 * vocab - 64
