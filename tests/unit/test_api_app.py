"""The HTTP API's own logic, in-process over a scripted session: validation, auth, stop
sequences, end-of-text, context checks before work, chat templates, SDK result shapes.
(tests/integration/test_openai_api.py drives the real server against real stages.)"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from splitnet.cloud.api.app import create_app
from splitnet.cloud.api.auth import APIKeys, read_keys_file
from splitnet.cloud.api.chat_template import ChatTemplate, load_chat_template
from splitnet.cloud.api.config import APIConfig
from splitnet.cloud.api.pipeline import PipelineFacts
from splitnet.cloud.api.sdk_adapter import stream_tokens, token_ids
from splitnet.cloud.api.sessions import SessionPool
from splitnet.cloud.cli_status import StageStatus
from splitnet.errors import ConfigError, StageUnavailable
from splitnet.model.tokenizer import ByteTokenizer

KEY = "test-key-0123456789abcdef"


class ScriptedSession:
    """Stands in for an SDK Session: ``stream`` yields the bytes of ``reply`` as token ids."""

    def __init__(self, reply: bytes | list[int], fail: Exception | None = None):
        self.reply = list(reply)
        self.fail = fail
        self.prompts: list[list[int]] = []
        self.closed = False

    def stream(self, prompt, max_new_tokens, *, sampling=None, timeout_s=None):
        self.prompts.append(list(prompt))
        if self.fail is not None:
            raise self.fail
        yield from self.reply[:max_new_tokens]

    def close(self):
        self.closed = True


def make_client(session, *, template: ChatTemplate | None = None, max_positions: int | None = 1024, kind: str = "decoder", keys=(KEY,), sessions=1,
                config: APIConfig | None = None, stage_probe=None):
    facts = PipelineFacts(model="tiny-gpt2", served_name="tiny-gpt2", kind=kind, fingerprint="f" * 16, max_positions=max_positions, num_stages=2,
                          tokenizer=ByteTokenizer(), eos_ids=frozenset({256}), chat_template=template or ChatTemplate(None), model_dir="", vocab_size=257)
    opened = []

    def open_session():
        opened.append(session)
        return session

    pool = SessionPool(open_session, sessions, acquire_timeout_s=2.0)
    app = create_app(facts, pool, config or APIConfig(sessions=sessions), APIKeys(keys), stage_probe=stage_probe)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client


def completion(client, **body):
    return client.post("/v1/completions", json={"model": "tiny-gpt2", "prompt": "hi", "temperature": 0, **body})


def sse_events(response) -> list:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_missing_or_wrong_key_is_401_openai_shaped_and_counted():
    client = make_client(ScriptedSession(b"x"))
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {KEY}"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    metrics = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert metrics["splitnet_api_auth_refusals"].samples[0].value == 3
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-gpt2"


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"),
    ({"top_p": 0.5, "temperature": 0.7}, None),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 0.5}, None),
    ({"no_such_option": 1}, "no_such_option"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [1, 2, 300]}, "prompt"),
])
def test_unsupported_or_invalid_parameters_are_400_before_any_work(body, param):
    session = ScriptedSession(b"x")
    r = completion(make_client(session), **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param
    assert session.prompts == []


def test_unknown_model_is_404():
    r = completion(make_client(ScriptedSession(b"x")), model="gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_context_overflow_is_refused_before_work():
    session = ScriptedSession(b"x")
    r = completion(make_client(session, max_positions=8), prompt="0123456", max_tokens=4)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at most 2 tokens" in r.json()["error"]["message"]
    assert session.prompts == []


def test_stop_sequence_ends_text_and_streaming_never_leaks_it():
    session = ScriptedSession(b"hello STOP world")
    client = make_client(session)
    r = completion(client, max_tokens=30, stop="STOP")
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["text"] == "hello " and choice["finish_reason"] == "stop"
    events = sse_events(completion(client, max_tokens=30, stop=["STOP"], stream=True))
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "hello " and not any("S" in t for t in texts)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_length_and_end_of_text_finish_reasons():
    client = make_client(ScriptedSession(list(b"abc") + [256] + list(b"zzz")))
    r = completion(client, max_tokens=2, return_token_ids=True).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["choices"][0]["text"] == "ab"
    assert r["choices"][0]["token_ids"] == list(b"ab") and r["usage"]["completion_tokens"] == 2
    r = completion(client, max_tokens=10).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == "abc"


def test_streamed_text_never_splits_a_utf8_character():
    client = make_client(ScriptedSession("é€!".encode()))
    events = sse_events(completion(client, max_tokens=10, stream=True))
    texts = [e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["text"]]
    assert texts == ["é", "€", "!"]


def test_chat_uses_the_template_and_streams_openai_chunks():
    template = ChatTemplate("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}", source="test")
    session = ScriptedSession(b"ok")
    client = make_client(session, template=template)
    body = {"model": "tiny-gpt2", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "max_tokens": 5}
    r = client.post("/v1/chat/completions", json=body).json()
    assert bytes(session.prompts[0]).decode() == "<|system|>be brief<|user|>hi<|assistant|>"
    assert r["object"] == "chat.completion" and r["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-2]) == "ok"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2


def test_chat_fallback_format_without_a_template():
    session = ScriptedSession(b"x")
    make_client(session).post("/v1/chat/completions", json={"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert bytes(session.prompts[0]).decode() == "user: hi\nassistant:"


def test_pipeline_failure_is_503_and_the_session_is_replaced():
    session = ScriptedSession(b"x", fail=StageUnavailable("stage 1 at tcp://x:1 missed 3 heartbeats"))
    r = completion(make_client(session))
    assert r.status_code == 503 and "missed 3 heartbeats" in r.json()["error"]["message"]
    assert session.closed  # a failed session is not handed to the next request


class BlockingSession(ScriptedSession):
    def __init__(self, release):
        super().__init__(b"ab")
        self.release, self.entered = release, threading.Event()

    def stream(self, prompt, max_new_tokens, *, sampling=None, timeout_s=None):
        self.entered.set()
        self.release.wait(10)
        yield from super().stream(prompt, max_new_tokens, sampling=sampling, timeout_s=timeout_s)


def test_no_free_session_is_503_busy_and_the_held_request_completes():
    release = threading.Event()
    session = BlockingSession(release)
    client = make_client(session, sessions=1)
    client.app.state.pool.acquire_timeout_s = 0.3
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(completion, client, max_tokens=2)
        assert session.entered.wait(10)
        r = completion(client, max_tokens=2)
        release.set()
        assert r.status_code == 503 and r.json()["error"]["code"] == "pipeline_busy" and "--sessions" in r.json()["error"]["message"]
        assert first.result(timeout=10).json()["choices"][0]["text"] == "ab"


def test_embeddings_on_a_decoder_is_400():
    r = make_client(ScriptedSession(b"x")).post("/v1/embeddings", json={"model": "tiny-gpt2", "input": "hi"})
    assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]


def test_chat_template_from_tokenizer_config_with_special_tokens(tmp_path: Path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    }))
    t = load_chat_template(tmp_path)
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>[user] hi</s>[assistant] "
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content | tojson }}{% endfor %}")
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "né"}]) == '"né"'  # the .jinja file wins; tojson keeps non-ASCII
    assert load_chat_template(None).template is None


def test_a_template_cannot_reach_python_objects():
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", source="hostile")
    with pytest.raises(ConfigError, match="hostile"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="no system"):
        ChatTemplate("{{ raise_exception('no system messages') }}").render([])


def test_api_keys(tmp_path: Path):
    with pytest.raises(ConfigError, match="at least"):
        APIKeys(["short"])
    f = tmp_path / "keys.txt"
    f.write_text(f"# clients\n{KEY}\n\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod"):
        read_keys_file(f)
    f.chmod(0o600)
    assert read_keys_file(f) == [KEY]
    assert APIKeys([KEY]).allows(f"Bearer {KEY}") and not APIKeys([KEY]).allows(f"Bearer {KEY}x")


@dataclass
class _Chunk:  # the SDK's typed stream items (TokenChunk, then GenerationResult)
    token: int


@dataclass
class _Result:
    tokens: list
    finish_reason: str
    stats: dict


class _TypedSession:
    def stream(self, prompt, max_new_tokens, *, sampling=None, timeout_s=None):
        yield _Chunk(5)
        yield _Chunk(6)
        yield _Result([5, 6], "length", {"replays": [{"after_tokens": 1}]})


def test_sdk_adapter_reads_plain_and_typed_results():
    assert token_ids(7) == [7] and token_ids([1, 2]) == [1, 2] and token_ids(_Chunk(3)) == [3] and token_ids(_Result([1, 2], "stop", {})) == [1, 2]
    stats: dict = {}
    assert list(stream_tokens(_TypedSession(), [1], 2, sampling=None, timeout_s=1.0, stats=stats)) == [5, 6]  # the result repeats no token
    assert stats["replays"] == [{"after_tokens": 1}]


def test_health_with_stages_is_503_when_one_is_down_and_metrics_may_need_the_key():
    probe = lambda: [StageStatus("tcp://a:1", live=True, blocks=[0, 3]), StageStatus("tcp://b:2", error="no answer within 2 s")]  # noqa: E731
    client = make_client(ScriptedSession(b"x"), config=APIConfig(metrics_need_key=True), stage_probe=probe)
    assert client.get("/health").status_code == 200  # the server itself
    r = client.get("/health", params={"stages": "true"})
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert [st["live"] for st in r.json()["stage_status"]] == [True, False]
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
