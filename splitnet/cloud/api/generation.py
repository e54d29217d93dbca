"""One text generation through the pipeline: stop sequences, end-of-text, incremental text.

Tokens come one at a time from the SDK (:func:`~splitnet.cloud.api.sdk_adapter.stream_tokens`);
the text is decoded from all tokens so far and handed out in deltas that never split a UTF-8
character (a trailing U+FFFD waits for its next byte) nor a stop sequence still being matched
(the last ``len(longest stop) - 1`` characters wait). Generation ends at ``max_tokens``
(``finish_reason="length"``), at an end-of-text token or a stop sequence (``"stop"``, neither
included in the text), or when the client went away.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from splitnet.cloud.api.sdk_adapter import stream_tokens
from splitnet.errors import StageUnavailable


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    ttft_s: float | None = None
    replays: int = 0
    stats: dict = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any  # splitnet.edge.sampling.SamplingConfig
    stops: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    step_timeout_s: float = 60.0
    request_timeout_s: float = 300.0


class _TextDeltas:
    """Text of a growing token list, released in safe pieces."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.text = ""

    def update(self, tokens: list[int]) -> tuple[str, bool]:
        """The new safe delta after ``tokens``, and whether a stop sequence ended the text."""
        self.text = self.decode(tokens)
        hit = min((i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            return self.flush(), True
        end = len(self.text) - self.holdback
        while end > self.sent and self.text[end - 1] == "\ufffd":  # maybe a UTF-8 character still arriving
            end -= 1
        if end <= self.sent:
            return "", False
        delta, self.sent = self.text[self.sent:end], end
        return delta, False

    def flush(self) -> str:
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


def run_generation(session: Any, tokenizer: Any, req: GenerationRequest, on_delta: Callable[[str], None] | None = None,
                   cancelled: threading.Event | None = None) -> Completion:
    """Generate for ``req`` on ``session`` (blocking; call it from a worker thread)."""
    t0 = time.monotonic()
    deadline = t0 + req.request_timeout_s
    texts = _TextDeltas(tokenizer.decode, req.stops)
    tokens: list[int] = []
    stats: dict = {}
    finish, ttft = "length", None
    for tok in stream_tokens(session, req.prompt_ids, req.max_tokens, sampling=req.sampling, timeout_s=req.step_timeout_s, stats=stats):
        if ttft is None:
            ttft = time.monotonic() - t0
        if tok in req.eos_ids:
            finish = "stop"
            break
        tokens.append(tok)
        delta, stopped = texts.update(tokens)
        if delta and on_delta is not None:
            on_delta(delta)
        if stopped:
            finish = "stop"
            break
        if cancelled is not None and cancelled.is_set():
            finish = "cancelled"
            break
        if time.monotonic() > deadline and len(tokens) < req.max_tokens:
            raise StageUnavailable(f"the request ran past --request-timeout-s {req.request_timeout_s:g} s after {len(tokens)} tokens")
    rest = texts.flush()
    if rest and on_delta is not None and finish != "cancelled":
        on_delta(rest)
    return Completion(texts.text, tokens, finish, len(req.prompt_ids), ttft, len(stats.get("replays") or []), stats, list(req.prompt_ids))
