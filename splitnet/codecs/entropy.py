"""Static canonical Huffman coding of codebook indices (fitted on calibration frequencies).

Used for AlignedVQ's anchor codebook, whose indices follow the Zipf-like token distribution: the
code lengths are part of the fitted codec (and of its hash), so nothing but the bits travels.
Encoding is vectorised; decoding walks the stream with a 2**max_len lookup table.
"""

from __future__ import annotations

import heapq

import numpy as np

from splitnet.errors import CodecError

MAX_CODE_LEN = 18


def huffman_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Code length per symbol for ``counts`` (every symbol gets a code; lengths <= max_len)."""
    counts = np.asarray(counts, dtype=np.float64) + 1.0  # add-one: unseen symbols stay codable
    if counts.size < 2:
        return np.ones(counts.size, dtype=np.int64)
    add = 0.0
    while True:
        c = counts + add
        heap = [(float(w), i, None) for i, w in enumerate(c)]
        heapq.heapify(heap)
        nxt = len(c)
        parent: dict[int, int] = {}
        while len(heap) > 1:
            w1, i1, _ = heapq.heappop(heap)
            w2, i2, _ = heapq.heappop(heap)
            parent[i1] = parent[i2] = nxt
            heapq.heappush(heap, (w1 + w2, nxt, None))
            nxt += 1
        depth = np.zeros(nxt, dtype=np.int64)
        for node in range(nxt - 2, -1, -1):  # parents have larger ids than children
            depth[node] = depth[parent[node]] + 1
        lengths = depth[: len(c)]
        if lengths.max() <= max_len:
            return lengths
        add = max(1.0, add * 4 or counts.mean() / 16)  # flatten the distribution until it fits


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman code values (MSB-first) for ``lengths``."""
    order = np.lexsort((np.arange(len(lengths)), lengths))
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, int(lengths[order[0]])
    for k, sym in enumerate(order):
        ln = int(lengths[sym])
        if k:
            code = (code + 1) << (ln - prev)
        codes[sym] = code
        prev = ln
    return codes


class Huffman:
    """A fixed code over symbols 0..len(lengths)-1."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0 or self.lengths.min() < 1 or self.lengths.max() > MAX_CODE_LEN:
            raise ValueError(f"Huffman code lengths must be 1..{MAX_CODE_LEN}")
        if np.sum(2.0 ** -self.lengths.astype(np.float64)) > 1.0 + 1e-9:
            raise ValueError("Huffman code lengths violate the Kraft inequality")
        self.codes = canonical_codes(self.lengths)
        self.max_len = int(self.lengths.max())
        self._table_sym = None

    def encode_bits(self, symbols: np.ndarray) -> np.ndarray:
        """0/1 uint8 array: the concatenated codes of ``symbols``."""
        s = np.asarray(symbols, dtype=np.int64).reshape(-1)
        if s.size == 0:
            return np.zeros(0, dtype=np.uint8)
        ln = self.lengths[s]
        total = int(ln.sum())
        starts = np.cumsum(ln) - ln
        sym_of_bit = np.repeat(np.arange(s.size), ln)
        k = np.arange(total) - starts[sym_of_bit]  # bit index inside its code, MSB first
        return ((self.codes[s][sym_of_bit] >> (ln[sym_of_bit] - 1 - k)) & 1).astype(np.uint8)

    def _table(self):
        if self._table_sym is None:
            size = 1 << self.max_len
            sym = np.zeros(size, dtype=np.int64)
            ln = np.zeros(size, dtype=np.int64)
            for i in np.argsort(self.lengths, kind="stable"):
                shift = self.max_len - int(self.lengths[i])
                lo = int(self.codes[i]) << shift
                sym[lo : lo + (1 << shift)] = i
                ln[lo : lo + (1 << shift)] = self.lengths[i]
            self._table_sym, self._table_len = sym.tolist(), ln.tolist()
        return self._table_sym, self._table_len

    def decode_bits(self, bits: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """Decode ``n`` symbols from a 0/1 array; returns (symbols, bits consumed)."""
        if n == 0:
            return np.zeros(0, dtype=np.int64), 0
        b = np.asarray(bits, dtype=np.int64)
        L = self.max_len
        padded = np.concatenate([b, np.zeros(L, dtype=np.int64)])
        window = np.zeros(b.size, dtype=np.int64)  # the next L bits at every position, MSB first
        for j in range(L):
            window = (window << 1) | padded[j : j + b.size]
        w = window.tolist()
        tsym, tlen = self._table()
        out = [0] * n
        pos, size = 0, b.size
        for i in range(n):
            if pos >= size:
                raise CodecError("entropy-coded indices end early: the payload is truncated or corrupt")
            v = w[pos]
            out[i] = tsym[v]
            pos += tlen[v]
        if pos > size:
            raise CodecError("entropy-coded indices overrun the payload: it is truncated or corrupt")
        return np.asarray(out, dtype=np.int64), pos
