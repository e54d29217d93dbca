"""Tokenizers: the HF ``tokenizers`` library (tokenizer.json) and a byte-level one for built-in LMs.

Neither needs torch: ``numpy=True`` returns numpy arrays (an edge device running its stage on
onnxruntime); the default returns torch tensors for torch stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def pad_batch(ids: list[list[int]], pad_id: int, numpy: bool = False) -> dict[str, Any]:
    """Right-pad token id lists to the longest: ``input_ids`` and ``attention_mask`` (B, T), int64."""
    T = max(1, max(len(i) for i in ids))
    input_ids = np.full((len(ids), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), T), dtype=np.int64)
    for b, seq in enumerate(ids):
        input_ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
    if numpy:
        return {"input_ids": input_ids, "attention_mask": mask}
    import torch

    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}


class HFTokenizer:
    """Wraps ``tokenizers.Tokenizer`` from a tokenizer.json; pads to the longest in a batch."""

    def __init__(self, path: Path, pad_id: int = 0, add_special_tokens: bool = True):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.pad_id = pad_id
        self.add_special_tokens = add_special_tokens
        self.tok.no_padding()
        self.tok.no_truncation()

    def __call__(self, texts: list[str], max_length: int = 128, numpy: bool = False) -> dict[str, Any]:
        # the tokenizer truncates before its post-processor adds the special tokens, so a long
        # input keeps its final [SEP] (slicing the ids afterwards cut it off)
        self.tok.enable_truncation(max_length)
        try:
            encs = self.tok.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)
        finally:
            self.tok.no_truncation()
        return pad_batch([e.ids for e in encs], self.pad_id, numpy)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; id 256 is end-of-text. Used by the built-in small LMs."""

    eos_id = 256
    vocab_size = 257

    def __call__(self, texts: list[str], max_length: int = 1024, numpy: bool = False) -> dict[str, Any]:
        return pad_batch([self.encode(t)[:max_length] for t in texts], 0, numpy)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
