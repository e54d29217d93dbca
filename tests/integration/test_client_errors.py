"""Errors before work (#19): a bounded connect, the context length and infer's inputs are checked
before anything is sent, each with a typed error that says what to do."""

from __future__ import annotations

import time

import numpy as np
import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.errors import ConfigError, StageUnavailable
from splitnet.runtime.launcher import launch_pipeline

pytestmark = pytest.mark.timeout(180)


def test_timeout_s_bounds_the_whole_connect():
    """A dead endpoint with timeout_s=1: the handshake waits 1 s, not connect_timeout_s (30 s)."""
    t0 = time.monotonic()
    with pytest.raises(StageUnavailable, match=r"no answer within 1 s from stage 0 at tcp://127.0.0.1:1"):
        splitnet.connect(["tcp://127.0.0.1:1"], timeout_s=1)
    assert time.monotonic() - t0 < ClientConfig().connect_timeout_s


@pytest.fixture(scope="module")
def gpt_pipe():
    with launch_pipeline("tiny-gpt2", []) as pipe:  # one stage: these checks are the client's
        yield pipe


def _forwards(s) -> list[int]:
    return [info["stats"]["forwards"] for info in s.refresh(10)]


def test_past_the_context_length_fails_before_any_work(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, timeout_s=30) as s:
        assert s.max_positions == 1024
        before = _forwards(s)
        prompt = [1] * 1000
        with pytest.raises(ConfigError, match=r"1000 tokens plus 30 new tokens exceeds the model's 1024 positions.*at most 995 tokens"):
            s.generate(prompt, 30)
        with pytest.raises(ConfigError, match="1024 positions"):
            s.stream(prompt, 30)  # checked at the call, before the first event is asked for
        with pytest.raises(ConfigError, match=r"prompt 1 of 1000 tokens"):
            s.generate_many([[1, 2], prompt], 30)
        assert _forwards(s) == before  # no stage ran anything
        assert len(s.generate(prompt, 25).tokens) == 25  # exactly at the limit: 1000 + 25 - 1 positions


def test_wrong_prompts_and_options_fail_before_any_work(gpt_pipe):
    with splitnet.connect(gpt_pipe.endpoints, timeout_s=30) as s:
        before = _forwards(s)
        with pytest.raises(ConfigError, match="empty"):
            s.generate([], 4)
        with pytest.raises(ConfigError, match="max_new_tokens"):
            s.generate_many(["a"], 0)
        with pytest.raises(ConfigError, match="token ids"):
            s.generate([0.5, 1.5], 4)
        assert _forwards(s) == before


@pytest.fixture(scope="module")
def minilm_pipe():
    with launch_pipeline("minilm", []) as pipe:
        yield pipe


@pytest.mark.parametrize("bad,match", [
    ("hello", r"infer\(\) takes a mapping of model inputs, got str; this pipeline serves a encoder model: pass 'input_ids'"),
    ({"input_idz": np.ones((1, 3), np.int64)}, r"unknown input key\(s\) \['input_idz'\].*'input_ids' \(optional: 'attention_mask', 'token_type_ids'\)"),
    ({"attention_mask": np.ones((1, 3), np.int64)}, r"missing input 'input_ids'"),
    ({"input_ids": [["a", "b"]]}, r"input 'input_ids' must be a numeric array"),
    ({"text": ["ok"], "max_len": 8}, r"only 'max_length'"),
    ({"text": [1, 2]}, r"string or a non-empty list of strings"),
])
def test_infer_with_bad_inputs_fails_at_once_naming_the_expected_keys(minilm_pipe, bad, match):
    with splitnet.connect(minilm_pipe.endpoints, timeout_s=30) as s:
        before = _forwards(s)
        with pytest.raises(ConfigError, match=match):
            s.infer(bad)
        assert _forwards(s) == before
        assert s.infer({"text": ["fine"]})["embedding"].shape == (1, 384)  # the session works on


def test_generation_on_an_encoder_says_use_infer(minilm_pipe):
    with splitnet.connect(minilm_pipe.endpoints, timeout_s=30) as s:
        with pytest.raises(ConfigError, match="use infer"):
            s.generate("hello", 4)
        with pytest.raises(ConfigError, match="use infer"):
            s.generate_many(["hello"], 4)


def test_connect_takes_client_config_fields_and_refuses_unknown_options(gpt_pipe):
    """README's ``connect(..., local_stage=..., local_codec=..., **keys)`` with keys =
    dict(client_key=..., server_key=...): ClientConfig fields are accepted as keywords."""
    with splitnet.connect(gpt_pipe.endpoints, config=ClientConfig(timeout_s=30), heartbeat_interval_s=0.5, prefill_chunk_tokens=4) as s:
        assert s.config.heartbeat_interval_s == 0.5 and s.config.prefill_chunk_tokens == 4 and s.config.timeout_s == 30
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['timeout'\]"):
        splitnet.connect(gpt_pipe.endpoints, timeout=3)
    with pytest.raises(ConfigError, match="client_key and server_key go together"):
        splitnet.connect(gpt_pipe.endpoints, client_key="keys/laptop.key_secret")
