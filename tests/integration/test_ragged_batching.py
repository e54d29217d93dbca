"""Prompt chunks of several requests with different lengths share one padded forward at a stage
(``max_padding``): the tokens are those of the unsplit model, the padded batches really run,
and ``--max-padding 0`` keeps only equal lengths together."""

from __future__ import annotations

import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.runtime.launcher import launch_pipeline
from tests.integration.test_chunk_merge import _stats, _unsplit_greedy

# lengths within the default padding budget of each other (the longest is 40: at most 0.5 padded)
PROMPTS = [[(5 * i + 11 * k) % 250 + 1 for i in range(n)] for k, n in enumerate((40, 33, 36, 29, 38, 31, 40, 34))]


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_prompts_of_different_lengths_batch_and_give_the_unsplit_tokens(kill_leftovers, model):
    want = [_unsplit_greedy(model, p, 4) for p in PROMPTS]
    with launch_pipeline(model, num_stages=2) as pipe:
        with splitnet.connect(pipe.endpoints, config=ClientConfig(), timeout_s=60) as s:
            for _ in range(3):  # every prompt's only chunk sent at once: they queue while the first runs
                assert [r.tokens for r in s.generate_many(PROMPTS, 4)] == want
        ragged = [_stats(e)["ragged_batches"] for e in pipe.endpoints]
    assert ragged[0] > 0


def test_padding_can_be_turned_off(kill_leftovers):
    want = [_unsplit_greedy("tiny-gpt2", p, 3) for p in PROMPTS]
    with launch_pipeline("tiny-gpt2", num_stages=2, extra_args=["--max-padding", "0"]) as pipe:
        with splitnet.connect(pipe.endpoints, config=ClientConfig(), timeout_s=60) as s:
            assert [r.tokens for r in s.generate_many(PROMPTS, 3)] == want
        assert [_stats(e)["ragged_batches"] for e in pipe.endpoints] == [0, 0]
