"""Request bodies of the OpenAI-compatible API, validated before any work (pydantic, extra fields refused).

Only what this server does is accepted: a parameter it cannot honour (``n`` > 1, ``top_p`` < 1
while sampling, ``logprobs``, penalties, tools) is a 400 naming the parameter, not silently
ignored. Responses are plain dicts shaped as OpenAI's (see :mod:`splitnet.cloud.api.responses`).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: most stop sequences per request, as OpenAI
MAX_STOP_SEQUENCES = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1024, description="extension (vLLM's name): sample among the k most likely tokens; 0: all")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    return_token_ids: bool = Field(False, description="extension (vLLM's name): the choice also carries prompt_token_ids and token_ids")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported: send one request per choice")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _supported(self) -> "_Sampling":
        if self.top_p < 1.0 and self.temperature > 0:
            raise ValueError("top_p < 1 (nucleus sampling) is not supported by this server; use top_k (extra_body={'top_k': 40}) and temperature instead")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported; leave them at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]  # normalised by _stops


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of prompts would need n choices); send one request per prompt")
            v = v[0]
        if isinstance(v, list) and any((not isinstance(t, int)) or t < 0 for t in v):
            raise ValueError("a token-id prompt holds non-negative integers")
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _completion_only(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of must be 1")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        if isinstance(v, list):  # content parts: only text parts are understood
            texts = []
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return "".join(texts)
        return v


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_only(self) -> "ChatCompletionRequest":
        if self.logprobs or self.top_logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools (function calling) are not supported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings``."""

    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        if isinstance(v, str):
            v = [v]
        elif v and isinstance(v[0], int):
            v = [v]
        if not v:
            raise ValueError("input is empty")
        if any(isinstance(x, str) and not x for x in v) or any(isinstance(x, list) and not x for x in v):
            raise ValueError("input holds an empty string or token list")
        return v

    @model_validator(mode="after")
    def _no_dimensions(self) -> "EmbeddingRequest":
        if self.dimensions is not None:
            raise ValueError("dimensions (shortened embeddings) is not supported; the model's width is returned")
        return self
