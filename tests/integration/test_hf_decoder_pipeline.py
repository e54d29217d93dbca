"""A transformers-built decoder (a checkpoint written by save_pretrained) split over real stage
processes: greedy tokens equal transformers' generate for a short and a multi-chunk prompt, and a
prompt past the model's context fails with that error, from the chunk that hit it, without replays."""

from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import splitnet.edge.sdk as sdk  # noqa: E402
from splitnet.edge.config import ClientConfig  # noqa: E402
from splitnet.errors import ConfigError, StageError  # noqa: E402
from splitnet.runtime.launcher import launch_pipeline  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.AutoConfig.for_model("qwen2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    d = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(d)
    return d, model.eval()


def test_three_stage_processes_generate_transformers_tokens(checkpoint):
    d, ref = checkpoint
    with launch_pipeline(str(d), [2, 4]) as pipe:
        with sdk.connect(pipe.endpoints, config=ClientConfig(prefill_chunk_tokens=16, timeout_s=60)) as s:
            for n_prompt in (8, 70):  # one chunk; five chunks pipelined through the stages
                prompt = torch.randint(0, 97, (1, n_prompt), generator=torch.Generator().manual_seed(n_prompt))
                want = ref.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, n_prompt:].tolist()
                got = s.generate(prompt[0].tolist(), 32)
                assert list(got.tokens) == want, n_prompt


def test_context_overflow_is_the_error_the_caller_gets(checkpoint):
    d, _ = checkpoint
    with launch_pipeline(str(d), [3]) as pipe:
        with sdk.connect(pipe.endpoints, config=ClientConfig(prefill_chunk_tokens=32, timeout_s=60)) as s:
            with pytest.raises(ConfigError, match="exceeds the model's 128 positions"):  # before anything is sent
                s.generate(list(range(1, 97)) * 2, 4)
            s._infos[0]["max_positions"] = None  # a client that does not check: the stage's error, from the chunk that hit it
            t0 = time.monotonic()
            with pytest.raises(StageError, match="exceeds max_position_embeddings=128"):
                list(s.stream(list(range(1, 97)) * 2, 4))  # 192 tokens: the 5th chunk overflows
            assert s.last_stats.get("replays") == []
            assert time.monotonic() - t0 < 20
