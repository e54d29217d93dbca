"""Order-1 context coding of codebook indices: a fitted PPM-style model and a range coder.

AlignedVQ's anchor indices are, nearly, the input token ids, and token ids depend strongly on the
previous one: on MiniLM's calibration text a static Huffman code spends ~9.2 bits per anchor
while the cross-entropy given the previous token is ~7.0. :class:`Order1Model` codes each index
under its predecessor's context:

* a context seen in calibration codes its successors with their calibration counts, plus an
  *escape* (PPM method C: as many escape counts as the context has distinct successors);
* after an escape, or in a context never seen (and for the first index of a payload), the index is
  coded with the order-0 model: calibration counts + 1, so every index stays codable.

All frequencies are integers fixed at fit time (they are part of the codec's hashed state), so the
encoder and decoder compute identical intervals. The coder is a carry-propagating range coder with
a 64-bit low and range (:class:`RangeEncoder`, :class:`RangeDecoder`; frequency totals up to 2**40
lose nothing measurable). The stream drops its always-zero first byte and its trailing zero bytes
(the decoder reads zeros past the end), so a 40-token request costs about its information content
plus a byte or two.

The same model codes a symbol under any context the decoder already knows, given explicitly
(``fit(stream, size, contexts, n_contexts)``): AlignedVQ's ``entropy="context"`` codes each
residual VQ index under its token's anchor index, after the anchors, in the same range-coded
stream (:meth:`Order1Model.encode_into` / :meth:`Order1Model.decode_from` share one coder).

Encoding and decoding walk the symbols in Python (a few microseconds per symbol); the tables are
plain lists so each step is a handful of C-level bisects.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Mapping

import numpy as np

from splitnet.errors import CodecError

_BITS = 64
_MASK = (1 << _BITS) - 1
_TOP_BYTE_SHIFT = _BITS - 8
_RENORM = 1 << (_BITS - 8)  # keep range >= 2**56: with totals < 2**40 a step loses < 2**-16 of its width
MAX_TOTAL = 1 << 40
PREFIX = "anchor_order1_"


class RangeEncoder:
    """Carry-propagating range coder (the LZMA scheme, widened to 64 bits)."""

    def __init__(self) -> None:
        self.low, self.range = 0, _MASK
        self.cache, self.cache_size = 0, 1
        self.out = bytearray()

    def encode(self, cum: int, freq: int, total: int) -> None:
        """Narrow to the sub-interval [cum, cum + freq) of ``total``."""
        r = self.range // total
        self.low += r * cum
        self.range = r * freq
        while self.range < _RENORM:
            self.range <<= 8
            self._shift_low()

    def _shift_low(self) -> None:
        if (self.low & _MASK) < (0xFF << _TOP_BYTE_SHIFT) or self.low > _MASK:
            carry = self.low >> _BITS
            temp = self.cache
            while True:  # the cached byte, then any pending 0xFF bytes, all plus the carry
                self.out.append((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if not self.cache_size:
                    break
            self.cache = (self.low & _MASK) >> _TOP_BYTE_SHIFT
        self.cache_size += 1
        self.low = (self.low << 8) & _MASK

    def finish(self) -> bytes:
        """The coded bytes: a value inside the final interval with as many trailing zero bits as
        possible, without the leading zero byte and without trailing zero bytes."""
        hi = self.low + self.range - 1
        for k in range(_BITS, -1, -1):  # the roundest value in [low, hi]
            v = (self.low + (1 << k) - 1) >> k << k
            if v <= hi:
                self.low = v
                break
        for _ in range(_BITS // 8 + 1):
            self._shift_low()
        out = bytes(self.out)
        return out[1:].rstrip(b"\0")  # the first byte is always 0 (no carry reaches it)


class RangeDecoder:
    """Reads what :class:`RangeEncoder` wrote; bytes past the end read as zero."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = bytes(data), 0
        self.range, self.code, self._r = _MASK, 0, 1
        for _ in range(_BITS // 8):
            self.code = (self.code << 8) | self._byte()

    def _byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def target(self, total: int) -> int:
        """Where the current value falls in [0, total); then call :meth:`consume`."""
        self._r = self.range // total
        return min(self.code // self._r, total - 1)

    def consume(self, cum: int, freq: int) -> None:
        self.code -= self._r * cum
        self.range = self._r * freq
        if self.code < 0 or self.code >= self.range:
            raise CodecError("order-1 coded indices are corrupt (the range decoder left its interval)")
        while self.range < _RENORM:
            self.range <<= 8
            self.code = ((self.code << 8) | self._byte()) & _MASK


class Order1Model:
    """Order-1 model over symbols ``0..A-1`` (see the module docstring).

    The context of a symbol is, by default, the symbol before it in the same stream (order 1). A
    model fitted with explicit ``contexts`` (:meth:`fit`) instead codes each symbol under a context
    symbol ``0..C-1`` that the decoder already knows, e.g. a residual VQ index under the anchor
    index of the same token; it is the same PPM-C model with ``C`` context rows.

    Arrays (saved with the codec under a prefix, ``anchor_order1_`` for the anchor index):
    ``unigram`` (A,) counts >= 1, ``indptr`` (C+1,) row offsets, ``next`` (nnz,) symbols sorted
    within each context row, ``counts`` (nnz,) their calibration counts >= 1.
    """

    PREFIX = PREFIX

    def __init__(self, unigram: np.ndarray, indptr: np.ndarray, nxt: np.ndarray, counts: np.ndarray) -> None:
        uni = np.asarray(unigram, dtype=np.int64).reshape(-1)
        ptr = np.asarray(indptr, dtype=np.int64).reshape(-1)
        nx = np.asarray(nxt, dtype=np.int64).reshape(-1)
        cnt = np.asarray(counts, dtype=np.int64).reshape(-1)
        a = uni.size
        if a < 2 or uni.min() < 1 or int(uni.sum()) >= MAX_TOTAL:
            raise ValueError("order-1 model: unigram counts must be >= 1, for at least 2 symbols, summing below 2**40")
        if ptr.size < 2 or ptr[0] != 0 or ptr[-1] != nx.size or np.any(np.diff(ptr) < 0):
            raise ValueError("order-1 model: indptr must run from 0 to len(next) without decreasing, one row per context")
        if cnt.shape != nx.shape or (cnt.size and (cnt.min() < 1 or nx.min() < 0 or nx.max() >= a)):
            raise ValueError("order-1 model: successors must be symbols with counts >= 1")
        rows = np.repeat(np.arange(ptr.size - 1), np.diff(ptr))
        if nx.size > 1 and np.any((np.diff(nx) <= 0) & (rows[1:] == rows[:-1])):
            raise ValueError("order-1 model: successors must be strictly increasing within each row")
        run = np.concatenate([[0], np.cumsum(cnt)])
        if int((run[ptr[1:]] - run[ptr[:-1]] + np.diff(ptr)).max()) >= MAX_TOTAL:
            raise ValueError("order-1 model: a context's counts sum beyond 2**40")
        self.unigram, self.indptr, self.next, self.counts = uni, ptr, nx, cnt
        self.size, self.contexts = a, ptr.size - 1
        self._uni_cum = np.concatenate([[0], np.cumsum(uni)]).tolist()  # order-0 intervals
        self._ptr = ptr.tolist()
        self._next = nx.tolist()
        self._cum = run.tolist()  # running sum over all rows

    @classmethod
    def fit(cls, stream: np.ndarray, size: int, contexts: np.ndarray | None = None, n_contexts: int = 0) -> "Order1Model":
        """Counts from ``stream``: symbols in the order an encoder sends them. Without
        ``contexts``, consecutive symbols (including across sequence boundaries) form the
        order-1 pairs; with ``contexts`` (one symbol ``0..n_contexts-1`` per stream symbol), each
        symbol is counted under its own context."""
        s = np.asarray(stream, dtype=np.int64).reshape(-1)
        if s.size and (s.min() < 0 or s.max() >= size):
            raise ValueError(f"stream symbols must be in 0..{size - 1}")
        if contexts is None:
            prev, cur, rows = s[:-1], s[1:], size
        else:
            prev, cur, rows = np.asarray(contexts, dtype=np.int64).reshape(-1), s, int(n_contexts)
            if prev.shape != s.shape or (prev.size and (prev.min() < 0 or prev.max() >= rows)):
                raise ValueError(f"contexts must give one symbol in 0..{rows - 1} per stream symbol")
        uni = np.bincount(s, minlength=size) + 1
        keys, cnt = np.unique(prev * size + cur, return_counts=True)
        ctx, nxt = keys // size, keys % size
        indptr = np.concatenate([[0], np.cumsum(np.bincount(ctx, minlength=rows))])
        return cls(uni, indptr, nxt, cnt)

    def arrays(self, prefix: str = PREFIX) -> dict[str, np.ndarray]:
        return {prefix + "unigram": self.unigram, prefix + "indptr": self.indptr,
                prefix + "next": self.next.astype(np.int32), prefix + "counts": self.counts}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = PREFIX) -> "Order1Model":
        try:
            return cls(*(arrays[prefix + k] for k in ("unigram", "indptr", "next", "counts")))
        except KeyError as e:
            raise ValueError(f"order-1 model array {e.args[0]!r} is missing") from None

    def _contexts(self, contexts, n: int) -> list[int] | None:
        if contexts is None:
            if self.contexts != self.size:
                raise CodecError("this order-1 model was fitted with explicit contexts; give them")
            return None
        ctx = np.asarray(contexts, dtype=np.int64).reshape(-1)
        if ctx.size != n or (ctx.size and (ctx.min() < 0 or ctx.max() >= self.contexts)):
            raise CodecError(f"order-1 coder: need {n} contexts in 0..{self.contexts - 1}")
        return ctx.tolist()

    def code_lengths(self, symbols: np.ndarray, contexts: np.ndarray | None = None) -> np.ndarray:
        """Ideal code length in bits of each symbol under this model: the intervals
        :meth:`encode_into` codes with (successor count / (row total + escapes); else escape, then
        the order-0 count), without the coder's rounding. Vectorised; for studies and reports: the
        sum is within a few bytes of ``8 * len(encode(symbols, contexts))`` (tested)."""
        sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
        if sym.size and (sym.min() < 0 or sym.max() >= self.size):
            raise CodecError(f"order-1 coder: symbols must be in 0..{self.size - 1}")
        ctx = self._contexts(contexts, sym.size)
        ctx = np.concatenate([[-1], sym[:-1]]) if ctx is None else np.asarray(ctx, dtype=np.int64)
        order0 = np.log2(float(self.unigram.sum())) - np.log2(self.unigram[sym].astype(np.float64))
        known = ctx >= 0
        c = np.where(known, ctx, 0)
        lo, hi = self.indptr[c], self.indptr[c + 1]
        distinct = np.where(known, hi - lo, 0)
        run = np.asarray(self._cum, dtype=np.int64)
        total = (run[hi] - run[lo]) + distinct
        rows = np.repeat(np.arange(self.contexts, dtype=np.int64), np.diff(self.indptr))
        keys = rows * self.size + self.next  # sorted: rows in order, successors sorted within a row
        hit_count = np.zeros(sym.size, dtype=np.float64)
        if keys.size:
            key = c * self.size + sym
            pos = np.minimum(np.searchsorted(keys, key), keys.size - 1)
            found = known & (keys[pos] == key)
            hit_count[found] = self.counts[pos[found]]
        total = np.maximum(total, 1).astype(np.float64)
        escape = np.log2(total) - np.log2(np.maximum(distinct, 1).astype(np.float64)) + order0
        coded = np.where(hit_count > 0, np.log2(total) - np.log2(np.maximum(hit_count, 1.0)), escape)
        return np.where(distinct == 0, order0, coded)

    def encode(self, symbols: np.ndarray, contexts: np.ndarray | None = None) -> bytes:
        enc = RangeEncoder()
        self.encode_into(enc, symbols, contexts)
        return enc.finish()

    def decode(self, data: bytes, n: int, contexts: np.ndarray | None = None) -> np.ndarray:
        return self.decode_from(RangeDecoder(data), n, contexts)

    def encode_into(self, enc: RangeEncoder, symbols: np.ndarray, contexts: np.ndarray | None = None) -> None:
        """Code ``symbols`` into ``enc`` (several models may share one coder, one after another)."""
        sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
        if sym.size and (sym.min() < 0 or sym.max() >= self.size):
            raise CodecError(f"order-1 coder: symbols must be in 0..{self.size - 1}")
        ctx = self._contexts(contexts, sym.size)
        ptr, nxt, cum, ucum = self._ptr, self._next, self._cum, self._uni_cum
        utotal = ucum[-1]
        prev = -1
        for i, s in enumerate(sym.tolist()):
            if ctx is not None:
                prev = ctx[i]
            if prev >= 0 and ptr[prev] < ptr[prev + 1]:
                lo, hi = ptr[prev], ptr[prev + 1]
                base, n_ctx = cum[lo], cum[hi] - cum[lo]
                total = n_ctx + (hi - lo)  # escape count = distinct successors (PPM method C)
                j = bisect_left(nxt, s, lo, hi)
                if j < hi and nxt[j] == s:
                    enc.encode(cum[j] - base, cum[j + 1] - cum[j], total)
                    prev = s
                    continue
                enc.encode(n_ctx, hi - lo, total)  # escape to order 0
            enc.encode(ucum[s], ucum[s + 1] - ucum[s], utotal)
            prev = s

    def decode_from(self, dec: RangeDecoder, n: int, contexts: np.ndarray | None = None) -> np.ndarray:
        """Read ``n`` symbols from ``dec`` (the counterpart of :meth:`encode_into`)."""
        ctx = self._contexts(contexts, n)
        ptr, nxt, cum, ucum = self._ptr, self._next, self._cum, self._uni_cum
        utotal = ucum[-1]
        out = [0] * n
        prev = -1
        for i in range(n):
            if ctx is not None:
                prev = ctx[i]
            if prev >= 0 and ptr[prev] < ptr[prev + 1]:
                lo, hi = ptr[prev], ptr[prev + 1]
                base, n_ctx = cum[lo], cum[hi] - cum[lo]
                v = dec.target(n_ctx + (hi - lo))
                if v < n_ctx:
                    j = bisect_right(cum, base + v, lo, hi + 1) - 1
                    dec.consume(cum[j] - base, cum[j + 1] - cum[j])
                    out[i] = prev = nxt[j]
                    continue
                dec.consume(n_ctx, hi - lo)
            v = dec.target(utotal)
            s = bisect_right(ucum, v) - 1
            dec.consume(ucum[s], ucum[s + 1] - ucum[s])
            out[i] = prev = s
        return np.asarray(out, dtype=np.int64)
