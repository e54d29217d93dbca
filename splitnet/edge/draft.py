"""A draft model on the edge device, for speculative decoding.

The draft (a small decoder with the target's vocabulary, run locally with its own KV cache)
proposes a few tokens; the pipeline checks them all in one pass (one round trip through every
stage instead of one per token) and keeps the longest prefix the target agrees with, plus the
target's own next token. Greedy verification gives exactly the tokens of plain greedy decoding.
"""

from __future__ import annotations

from typing import Any, Sequence

from splitnet.errors import ConfigError


class DraftModel:
    """Greedy proposals from a local decoder (a built-in name, an HF directory, or a loaded
    :class:`~splitnet.model.blocks.BlockModel`).

    Its cache follows the context it is asked about: a proposal after a rejection first rewinds
    the cache to the longest prefix it shares with the new context, so accepted work is reused.
    """

    def __init__(self, model: Any, *, threads: int = 0):
        import torch

        from splitnet.model import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model) if isinstance(model, str) else model
        if self.model.kind != "decoder":
            raise ConfigError(f"a draft model must be a decoder, got a {self.model.kind}")
        self.stage = self.model.full()
        self._torch = torch
        self._cache = self.stage.new_cache()
        self._fed: list[int] = []  # tokens in the cache, in order
        self._next = -1  # the draft's greedy next token after ``_fed``
        self.proposed = 0

    def _feed(self, tokens: list[int]) -> None:
        torch = self._torch
        ids = torch.tensor([tokens], dtype=torch.int64)
        out = self.stage({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, self._cache)
        self._fed.extend(tokens)
        self._next = int(out["logits"][0].argmax())

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """``k`` greedy tokens that follow ``context`` (prompt + tokens so far)."""
        if k < 1:
            return []
        context = list(context)
        common = 0
        for a, b in zip(self._fed, context):
            if a != b:
                break
            common += 1
        if not (common == len(context) == len(self._fed) and self._next >= 0):  # else the cache ends at the context
            if common == len(context):
                common -= 1  # re-feed the last context token to get the logits after it
            self._cache.truncate(common)
            del self._fed[common:]
            self._feed(context[common:])
        out = [self._next]
        while len(out) < k:
            self._feed([out[-1]])
            out.append(self._next)
        self.proposed += len(out)
        return out
