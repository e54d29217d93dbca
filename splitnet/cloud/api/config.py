"""Configuration of the OpenAI-compatible HTTP API server."""

from __future__ import annotations

from dataclasses import dataclass

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class APIConfig:
    """How :func:`splitnet.cloud.api.app.create_app` serves a pipeline.

    Attributes:
        served_model_name: the ``model`` id clients send and ``/v1/models`` lists ("" : the
            stages' model name, or its directory's name).
        sessions: pipeline sessions kept open; each serves one request at a time, the stages
            batch the requests of all sessions.
        acquire_timeout_s: longest wait for a free session before a 503.
        step_timeout_s: longest wait for one pipeline step (the SDK's ``timeout_s``).
        request_timeout_s: longest one request may run (checked between tokens).
        default_max_tokens: new tokens of a chat completion that names no ``max_tokens``
            (at most what the model's context leaves).
        max_embedding_inputs: most inputs of one ``/v1/embeddings`` request.
        max_embedding_tokens: longest input of ``/v1/embeddings`` (tokens; longer ones are cut,
            as sentence-transformers does).
        metrics_need_key: ``/metrics`` asks for an API key too (``/health`` never does).
    """

    served_model_name: str = ""
    sessions: int = 4
    acquire_timeout_s: float = 30.0
    step_timeout_s: float = 60.0
    request_timeout_s: float = 300.0
    default_max_tokens: int = 256
    max_embedding_inputs: int = 256
    max_embedding_tokens: int = 512
    metrics_need_key: bool = False

    def __post_init__(self) -> None:
        for name in ("sessions", "default_max_tokens", "max_embedding_inputs", "max_embedding_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"APIConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("acquire_timeout_s", "step_timeout_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"APIConfig.{name} must be positive, got {getattr(self, name)}")
