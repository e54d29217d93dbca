"""A thin layer between the HTTP API and the edge SDK's :class:`~splitnet.edge.sdk.Session`.

The SDK's return types are being unified (a typed ``GenerationResult`` with ``tokens``, ``text``
and ``finish_reason``); this module reads the current types and that one alike, so the API does
not depend on which lands first:

- a streamed item may be a token id (int, numpy integer) or a chunk with ``token``; a stream may
  end with the whole result (an object with ``tokens`` and ``finish_reason``), which carries no
  new token, only the stats;
- a generation result may be a list of ids or an object with ``tokens``;
- ``stream()`` is passed only the keyword arguments its signature names.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import numpy as np


def is_final_result(item: Any) -> bool:
    """Whether a streamed item is the whole generation's result (it repeats every token)."""
    return hasattr(item, "finish_reason") and hasattr(item, "tokens")


def token_ids(item: Any) -> list[int]:
    """The token ids one streamed item (or one whole result) carries."""
    if isinstance(item, (int, np.integer)):
        return [int(item)]
    value = getattr(item, "token", None)
    if value is not None:
        return [int(value)]
    for name in ("tokens", "token_ids"):
        value = getattr(item, name, None)
        if value is not None:
            return [int(t) for t in value]
    if isinstance(item, (list, tuple, np.ndarray)):
        return [int(t) for t in item]
    raise TypeError(f"cannot read token ids from a {type(item).__name__} returned by the SDK")


def accepts(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` takes keyword ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def stream_tokens(session: Any, prompt_ids: list[int], max_new_tokens: int, *, sampling: Any, timeout_s: float, stats: dict) -> Iterator[int]:
    """Token ids from ``session.stream`` one at a time; ``stats`` receives the SDK's per-request
    stats (replays, ttft) when its ``stream`` offers them."""
    kwargs: dict[str, Any] = {"sampling": sampling, "timeout_s": timeout_s}
    if accepts(session.stream, "_out"):
        kwargs["_out"] = stats
    gen = session.stream(prompt_ids, max_new_tokens, **kwargs)
    try:
        for item in gen:
            if is_final_result(item):  # the typed result closing a stream: its stats, no new token
                stats.update(getattr(item, "stats", None) or {})
                return
            yield from token_ids(item)
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()  # the SDK releases the request's caches on every stage


def embeddings(session: Any, inputs: dict[str, np.ndarray], timeout_s: float) -> np.ndarray:
    """(B, D) embeddings of an encoder pipeline for tokenized ``inputs``."""
    out = session.infer(inputs, timeout_s=timeout_s)
    out = getattr(out, "outputs", out)
    if "embedding" in out:
        return np.asarray(out["embedding"], dtype=np.float32)
    if "pooler_output" in out:
        return np.asarray(out["pooler_output"], dtype=np.float32)
    raise KeyError(f"the pipeline's last stage returned {sorted(out)}, no 'embedding'")
