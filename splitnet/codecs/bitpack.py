"""Exact bit packing of unsigned integer indices, vectorised with numpy.

``pack_bits(values, width)`` stores ``n`` values of ``width`` bits in exactly
``ceil(n * width / 8)`` bytes: value ``i`` occupies bits ``i*width .. (i+1)*width - 1`` of the
stream, least significant bit first (the order faiss' ``BitstringWriter`` uses). A 12-bit index
takes 12 bits, not 16.
"""

from __future__ import annotations

import numpy as np

from splitnet.errors import CodecError

MAX_WIDTH = 32


def packed_nbytes(n: int, width: int) -> int:
    """Bytes needed for ``n`` values of ``width`` bits."""
    return (n * width + 7) // 8


#: widths that are whole bytes: plain little-endian integers, no bit shuffling
_BYTE_ALIGNED = {8: "<u1", 16: "<u2", 32: "<u4"}


def _check_width(width: int) -> None:
    if not isinstance(width, (int, np.integer)) or not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width must be an int in 1..{MAX_WIDTH}, got {width!r}")


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers ``< 2**width`` into a uint8 array of ``packed_nbytes`` bytes."""
    _check_width(width)
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if v.dtype.kind not in "ui":
        raise TypeError(f"pack_bits needs integers, got {v.dtype}")
    if v.dtype.kind == "i" and v.min() < 0 or int(v.max()) >> width:
        raise ValueError(f"values do not fit in {width} bits (range {int(v.min())}..{int(v.max())})")
    if width in _BYTE_ALIGNED:
        return v.astype(_BYTE_ALIGNED[width]).view(np.uint8)
    v = v.astype(np.uint32 if width <= 32 else np.uint64, copy=False)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, width), LSB first
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values as uint32. Raises CodecError on a short buffer."""
    _check_width(width)
    b = np.asarray(buf)
    if b.dtype != np.uint8:
        raise CodecError(f"packed indices must be uint8, got {b.dtype}")
    b = b.reshape(-1)
    need = packed_nbytes(n, width)
    if b.size != need:
        raise CodecError(f"packed buffer has {b.size} bytes, {n} values of {width} bits need {need}")
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    if width in _BYTE_ALIGNED:
        return b.view(_BYTE_ALIGNED[width]).astype(np.uint32)
    bits = np.unpackbits(b, count=n * width, bitorder="little").reshape(n, width)  # (n, width)
    weights = (np.uint32(1) << np.arange(width, dtype=np.uint32))
    return (bits.astype(np.uint32) * weights).sum(axis=1, dtype=np.uint32)


class BitWriter:
    """Concatenate several bit-packed fields into one byte buffer (one wire frame)."""

    def __init__(self) -> None:
        self._fields: list[tuple[np.ndarray, int]] = []

    def add(self, values: np.ndarray, width: int) -> None:
        if width:
            self._fields.append((np.asarray(values).reshape(-1), width))

    def add_bits(self, bits: np.ndarray) -> None:
        """Append a raw 0/1 array (e.g. an entropy-coded stream) as it is."""
        self._fields.append((np.asarray(bits, dtype=np.uint8).reshape(-1), 0))

    def getvalue(self) -> np.ndarray:
        if not self._fields:
            return np.zeros(0, dtype=np.uint8)
        if len(self._fields) == 1 and self._fields[0][1]:
            v, w = self._fields[0]
            return pack_bits(v, w)
        chunks = []
        for v, w in self._fields:
            if w == 0:
                chunks.append(v)
                continue
            _check_width(w)
            if v.size and (v.min() < 0 or int(v.max()) >> w):
                raise ValueError(f"values do not fit in {w} bits")
            v = v.astype(np.uint32, copy=False)
            chunks.append(((v[:, None] >> np.arange(w, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1))
        return np.packbits(np.concatenate(chunks), bitorder="little")


class BitReader:
    """Read back the fields a :class:`BitWriter` wrote, in the same order."""

    def __init__(self, buf: np.ndarray, fields: list[tuple[int, int]]) -> None:
        """``fields`` = [(count, width), ...] of the whole buffer, so its size can be checked first."""
        b = np.asarray(buf)
        if b.dtype != np.uint8:
            raise CodecError(f"packed buffer must be uint8, got {b.dtype}")
        total = sum(n * w for n, w in fields)
        if b.size != (total + 7) // 8:
            raise CodecError(f"packed buffer has {b.size} bytes, its fields need {(total + 7) // 8}")
        self._fields = [(n, w) for n, w in fields if w]
        if len(self._fields) == 1:
            n, w = self._fields[0]
            self._out = [unpack_bits(b, w, n)]
        else:
            bits = np.unpackbits(b.reshape(-1), count=total, bitorder="little")
            self._out, pos = [], 0
            for n, w in self._fields:
                chunk = bits[pos : pos + n * w].reshape(n, w).astype(np.uint32)
                pos += n * w
                self._out.append((chunk * (np.uint32(1) << np.arange(w, dtype=np.uint32))).sum(axis=1, dtype=np.uint32))
        self._i = 0

    def read(self) -> np.ndarray:
        out = self._out[self._i]
        self._i += 1
        return out


def read_fields(bits: np.ndarray, fields: list[tuple[int, int]]) -> tuple[list[np.ndarray], int]:
    """Fixed-width fields [(count, width), ...] from the start of a 0/1 array; (values, bits used)."""
    out, pos = [], 0
    for n, w in fields:
        if not w:
            continue
        if pos + n * w > bits.size:
            raise CodecError("packed buffer is shorter than its fields need")
        chunk = bits[pos : pos + n * w].reshape(n, w).astype(np.uint32)
        out.append((chunk * (np.uint32(1) << np.arange(w, dtype=np.uint32))).sum(axis=1, dtype=np.uint32))
        pos += n * w
    return out, pos
