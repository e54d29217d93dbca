"""Tokenizers: the HF ``tokenizers`` library (tokenizer.json) and a byte-level one for built-in LMs."""

from __future__ import annotations

from pathlib import Path

import torch


def pad_batch(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to the longest: ``input_ids`` and ``attention_mask`` (B, T)."""
    T = max(1, max(len(i) for i in ids))
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for b, seq in enumerate(ids):
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


class HFTokenizer:
    """Wraps ``tokenizers.Tokenizer`` from a tokenizer.json; pads to the longest in a batch."""

    def __init__(self, path: Path, pad_id: int = 0, add_special_tokens: bool = True):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.pad_id = pad_id
        self.add_special_tokens = add_special_tokens
        self.tok.no_padding()
        self.tok.no_truncation()

    def __call__(self, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        encs = self.tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        return pad_batch([e.ids[:max_length] for e in encs], self.pad_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; id 256 is end-of-text. Used by the built-in small LMs."""

    eos_id = 256
    vocab_size = 257

    def __call__(self, texts: list[str], max_length: int = 1024) -> dict[str, torch.Tensor]:
        return pad_batch([self.encode(t)[:max_length] for t in texts], 0)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
