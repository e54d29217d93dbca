"""`splitnet api` as a real process over real stage processes, driven by the official openai client."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import yaml

import splitnet
from api_processes import free_port, start_api, stop
from stage_processes import serve_stage

pytestmark = pytest.mark.timeout(240)

KEY = "sk-splitnet-test-0123456789abcdef"


def _plan(model: str, endpoints: list[str]) -> dict:
    stages = [{"index": i, "blocks": b, "device": d, "endpoint": e} for i, (b, d, e) in enumerate(zip(([0, 3], [3, 6]), ("edge", "cloud"), endpoints))]
    return {"model": model, "num_blocks": 6, "stages": stages, "cuts": [{"after_block": 2, "codec": "fp16", "bytes_per_token": 768.0}]}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """tiny-gpt2 and minilm, each in two stage processes behind its own `splitnet api` process
    (all started at once: on a 2-core CI the imports overlap). Yields {model: (client, endpoints)}."""
    procs = []
    try:
        with ThreadPoolExecutor(4) as pool:
            stages = list(pool.map(lambda a: serve_stage(*a), [("0:3", ["--insecure"], "tiny-gpt2"), ("3:6", ["--insecure"], "tiny-gpt2"),
                                                               ("0:3", ["--insecure"], "minilm"), ("3:6", ["--insecure"], "minilm")]))
            procs += [p for p, _ in stages]
            eps = [e for _, e in stages]
            plan = tmp_path_factory.mktemp("plan") / "plan.yaml"  # minilm's API finds its stages in a plan
            plan.write_text(yaml.safe_dump(_plan("minilm", eps[2:])))
            apis = list(pool.map(lambda a: start_api([*a, "--api-key", KEY, "--sessions", "2"]),
                                 [["--endpoints", ",".join(eps[:2])], ["--plan", str(plan)]]))
        procs += [p for p, _ in apis]
        yield {name: (openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60), e)
               for name, (_, base), e in zip(("tiny-gpt2", "minilm"), apis, (eps[:2], eps[2:]))}
    finally:
        stop(*procs)


@pytest.fixture(scope="module")
def gpt(servers):
    return servers["tiny-gpt2"]


@pytest.fixture(scope="module")
def minilm(servers):
    return servers["minilm"]


def _reference(endpoints, prompt_ids, n):
    """Greedy tokens of the same pipeline through the SDK."""
    with splitnet.connect(endpoints, timeout_s=30) as s:
        return list(s.generate(prompt_ids, n).tokens)


def _same_greedy(api_tokens, ref_tokens, eos=256):
    """The API stops at end-of-text (not included); otherwise its tokens are the SDK's."""
    assert api_tokens == ref_tokens[: len(api_tokens)]
    if len(api_tokens) < len(ref_tokens):
        assert ref_tokens[len(api_tokens)] == eos


def test_models_lists_the_served_model(gpt):
    client, _ = gpt
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-gpt2"]
    assert client.models.retrieve("tiny-gpt2").id == "tiny-gpt2"


def test_completion_greedy_tokens_equal_session_generate(gpt):
    client, endpoints = gpt
    prompt = "def split_inference(model, link):"
    r = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    tokens = choice.model_extra["token_ids"]
    _same_greedy(tokens, _reference(endpoints, list(prompt.encode()), 12))
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == len(tokens)
    assert choice.finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert choice.text == bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
    streamed = client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_chat_completion_streaming_and_not_equal_session_generate(gpt):
    client, endpoints = gpt
    messages = [{"role": "system", "content": "You complete Python."}, {"role": "user", "content": "import os"}]
    r = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=10, temperature=0, extra_body={"return_token_ids": True})
    msg = r.choices[0].message
    assert msg.role == "assistant"
    prompt = "system: You complete Python.\nuser: import os\nassistant:"  # the documented fallback format (no template in tiny-gpt2)
    assert r.choices[0].model_extra["prompt_token_ids"] == list(prompt.encode())
    _same_greedy(r.choices[0].model_extra["token_ids"], _reference(endpoints, list(prompt.encode()), 10))
    chunks = list(client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_concurrent_requests_and_a_dropped_stream(gpt):
    """Requests served at once (two sessions, batched by the stages) give the tokens they give
    alone; a client that leaves mid-stream frees its session for the next requests."""
    client, endpoints = gpt
    prompts = ["import numpy as np", "class Stage:", "for i in range(10):"]
    alone = [client.completions.create(model="tiny-gpt2", prompt=p, max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
             .choices[0].model_extra["token_ids"] for p in prompts]
    stream = client.chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "x"}], max_tokens=1000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away after the first chunk: its 1,000 tokens would hold the session for many seconds
    health = str(client.base_url).removesuffix("/v1/") + "/health"
    deadline = time.monotonic() + 10
    while httpx.get(health).json()["sessions_busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(health).json()["sessions_busy"] == 0
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda p: client.completions.create(model="tiny-gpt2", prompt=p, max_tokens=8, temperature=0,
                                                                     extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"], prompts))
    assert together == alone


def test_seeded_sampling_is_reproducible(gpt):
    client, _ = gpt
    runs = [client.completions.create(model="tiny-gpt2", prompt="x = ", max_tokens=8, temperature=0.9, seed=7, extra_body={"top_k": 20, "return_token_ids": True})
            for _ in range(2)]
    assert runs[0].choices[0].model_extra["token_ids"] == runs[1].choices[0].model_extra["token_ids"]


def test_wrong_or_missing_api_key_is_401(gpt):
    client, _ = gpt
    with pytest.raises(openai.AuthenticationError) as e:
        client.with_options(api_key="sk-wrong-key-0123456789abcdef").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{client.base_url}completions", json={"model": "tiny-gpt2", "prompt": "x"})  # no Authorization header
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_invalid_requests_are_400_with_the_parameter(gpt):
    client, _ = gpt
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-gpt2", prompt="x", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-gpt2", prompt="x" * 1000, max_tokens=100)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="encoder"):
        client.embeddings.create(model="tiny-gpt2", input="x")


def test_embeddings_equal_session_infer(minilm):
    client, endpoints = minilm
    texts = ["edge devices send features to the cloud", "hello world"]
    r = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64 floats
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    with splitnet.connect(endpoints, timeout_s=30) as s:
        ref = s.infer({"text": texts})["embedding"]
    assert got.shape == (2, 384) and np.abs(got - ref).max() <= 1e-5
    assert r.usage.prompt_tokens > len(texts)
    floats = client.embeddings.create(model="minilm", input="hello world", encoding_format="float")
    assert np.abs(np.array(floats.data[0].embedding) - ref[1]).max() <= 1e-5
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])


def _api_error(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitnet.cli", "api", *args], capture_output=True, text=True, timeout=60)


def test_startup_mistakes_end_with_one_line_before_serving(tmp_path):
    dead = f"tcp://127.0.0.1:{free_port()}"
    r = _api_error(["--endpoints", dead, "--connect-timeout-s", "1", "--port", str(free_port())])
    assert r.returncode == 2 and "StageUnavailable" in r.stderr and dead in r.stderr and "Traceback" not in r.stderr
    r = _api_error(["--endpoints", dead, "--host", "0.0.0.0", "--port", str(free_port())])
    assert r.returncode == 2 and "without API keys" in r.stderr and "Traceback" not in r.stderr
    plan = tmp_path / "plan.yaml"
    doc = _plan("minilm", [dead, dead])
    del doc["stages"][1]["endpoint"]
    plan.write_text(yaml.safe_dump(doc))
    r = _api_error(["--plan", str(plan), "--port", str(free_port())])
    assert r.returncode == 2 and "no endpoint" in r.stderr and "Traceback" not in r.stderr
    r = _api_error(["--endpoints", dead, "--api-key", "short", "--port", str(free_port())])
    assert r.returncode == 2 and "at least 16 characters" in r.stderr and "Traceback" not in r.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _api_error(["--endpoints", dead, "--port", str(taken.getsockname()[1])])
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
