"""One stage's KV cache for many requests at once: a slot per request in tensors the stage owns.

Per layer, keys and values live in one tensor each, ``(slots, n_kv_heads, capacity, head_dim)``,
allocated on the stage's device and grown (doubling, zero-filled) only when more requests or
longer sequences need it; a request holds one row (its *slot*) for as long as it holds a cache.
A batched forward of several requests (:class:`BatchCacheView`, transformers' cache interface)
writes each member's new keys at its own positions with one ``index_put_`` per layer and reads
the members' rows up to the longest member: a view when their slots are consecutive, else a
gather. What a member may attend to is decided by the mask its stage builds from the members'
lengths (:func:`slot_positions`), never by what a row holds: a row's stale tail (from a previous
occupant or rewound speculation) is never read. Rows are zeroed when handed out, so no stale
NaN can reach a neighbour through a zero attention weight (0 x NaN is NaN).
"""

from __future__ import annotations

import heapq

import torch

from splitnet.errors import LimitExceeded
from splitnet.model.kv_cache import KVCache


class SlotPool:
    """Keys and values of up to ``max_slots`` requests, ``max_positions`` positions each."""

    def __init__(self, *, max_slots: int, max_positions: int | None, max_bytes: int | None = None, initial_slots: int = 4, initial_positions: int = 256):
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.max_slots = max_slots
        self.max_bytes = max_bytes
        self.max_positions = max_positions
        self.rows = min(initial_slots, max_slots)
        self.capacity = initial_positions if max_positions is None else min(initial_positions, max_positions)
        self.keys: dict[int, torch.Tensor] = {}  # layer -> (rows, H, capacity, D)
        self.values: dict[int, torch.Tensor] = {}
        self._free = list(range(self.max_slots))  # a min-heap: low slots first keeps active rows consecutive
        self._bpp: int | None = None  # bytes_per_position, known once the layers are allocated

    # ---------------------------------------------------------------- slots ----------------
    def acquire(self) -> "SlotCache":
        if not self._free:
            raise LimitExceeded(f"all {self.max_slots} KV cache slots of this stage are taken; release finished requests")
        slot = heapq.heappop(self._free)
        self.reserve(rows=slot + 1, positions=0)
        for layer in self.keys:
            self.keys[layer][slot].zero_()
            self.values[layer][slot].zero_()
        return SlotCache(self, slot)

    def release(self, slot: int) -> None:
        if slot in self._free:
            return
        heapq.heappush(self._free, slot)

    @property
    def slots_in_use(self) -> int:
        return self.max_slots - len(self._free)

    @property
    def nbytes(self) -> int:
        """Memory the pool holds now (all rows, whole capacity)."""
        return sum(t.nbytes for t in self.keys.values()) + sum(t.nbytes for t in self.values.values())

    def bytes_per_position(self) -> int:
        """Bytes one position of one request takes over all layers written so far."""
        if self._bpp is None:
            self._bpp = sum(t.shape[1] * t.shape[3] * t.element_size() for t in (*self.keys.values(), *self.values.values()))
        return self._bpp

    # ---------------------------------------------------------------- storage --------------
    def reserve(self, rows: int, positions: int) -> None:
        """Grow every layer's tensors to hold ``rows`` slots and ``positions`` positions (a
        LimitExceeded past the pool's limits)."""
        if self.max_positions is not None and positions > self.max_positions:
            raise LimitExceeded(f"a request needs {positions} cached positions; this stage holds at most {self.max_positions}")
        new_rows, new_cap = self.rows, self.capacity
        while new_rows < rows:
            new_rows = min(self.max_slots, new_rows * 2)
        while new_cap < positions:
            new_cap = new_cap * 2 if self.max_positions is None else min(self.max_positions, new_cap * 2)
        if (new_rows, new_cap) == (self.rows, self.capacity):
            return
        grown_bytes = self.nbytes * (new_rows * new_cap) // (self.rows * self.capacity)
        if self.max_bytes is not None and grown_bytes > self.max_bytes:
            raise LimitExceeded(f"the KV cache would grow to {grown_bytes} bytes ({new_rows} requests x {new_cap} positions), over this stage's limit of {self.max_bytes}; "
                                "release finished requests or raise the stage's cache limit")
        for store in (self.keys, self.values):
            for layer, old in store.items():
                grown = old.new_zeros((new_rows, old.shape[1], new_cap, old.shape[3]))
                grown[: old.shape[0], :, : old.shape[2]] = old
                store[layer] = grown
        self.rows, self.capacity = new_rows, new_cap

    def layer(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (keys, values) storage of ``layer``, allocated on first use from a (B, H, T, D) tensor."""
        if layer not in self.keys:
            self._bpp = None
            shape = (self.rows, like.shape[1], self.capacity, like.shape[3])
            self.keys[layer] = like.new_zeros(shape)
            self.values[layer] = like.new_zeros(shape)
        return self.keys[layer], self.values[layer]

    def view(self, caches: list["SlotCache"], new_tokens: int) -> "BatchCacheView":
        """The cache of one batched forward: ``caches`` (in batch order) each adding ``new_tokens``."""
        lengths = [c.length for c in caches]
        slots = [c.slot for c in caches]
        if len(set(slots)) != len(slots):
            raise ValueError("a batch holds each request at most once")
        self.reserve(rows=max(slots) + 1, positions=max(lengths) + new_tokens)
        return BatchCacheView(self, slots, lengths, new_tokens)


class SlotCache(KVCache):
    """One request's slot in a :class:`SlotPool` (the per-request handle the worker keeps)."""

    def __init__(self, pool: SlotPool, slot: int):
        super().__init__()
        self.pool = pool
        self.slot = slot

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length  # positions past ``length`` are never read again: the mask stops there

    def append(self, layer, k, v):
        raise TypeError("a SlotCache is written through its pool's BatchCacheView")

    def layer_ids(self) -> list[int]:
        return sorted(self.pool.keys)

    def get_layer(self, layer: int):
        k, v = self.pool.keys[layer], self.pool.values[layer]
        return k[self.slot : self.slot + 1, :, : self.length], v[self.slot : self.slot + 1, :, : self.length]

    def set_layer(self, layer, k, v):
        raise TypeError("a SlotCache is written through its pool's BatchCacheView")

    @property
    def nbytes(self) -> int:
        return self.length * self.pool.bytes_per_position()

    def close(self) -> None:
        self.pool.release(self.slot)


def slot_positions(lengths: list[int], new_tokens: int, device: torch.device) -> torch.Tensor:
    """(B, T) absolute positions of each member's new tokens."""
    base = torch.tensor(lengths, device=device, dtype=torch.long).unsqueeze(1)
    return base + torch.arange(new_tokens, device=device).unsqueeze(0)


class BatchCacheView:
    """transformers' cache interface (``update``, ``get_seq_length``) over some slots of a pool.

    The layers of a stage hold local indices 0..n-1 (the stage's blocks), which are the pool's
    layer keys too.
    """

    is_compileable = False

    def __init__(self, pool: SlotPool, slots: list[int], lengths: list[int], new_tokens: int):
        self.pool = pool
        self.slots = slots
        self.lengths = lengths
        self.new_tokens = new_tokens
        self.read_len = max(lengths) + new_tokens  # keys every member's row is read up to (the mask trims)
        self.consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        self._index: tuple[torch.Tensor, ...] | None = None
        self._positions: torch.Tensor | None = None

    def positions(self, device: torch.device) -> torch.Tensor:
        """(B, T) positions of the members' new tokens, copied to ``device`` once per forward
        (the stage's position ids, its masks and every layer's writes use them)."""
        if self._positions is None or self._positions.device != torch.device(device):
            self._positions = slot_positions(self.lengths, self.new_tokens, device)
        return self._positions

    def _write_index(self, k: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._index is None or self._index[0].device != k.device or self._index[1].shape[1] != k.shape[1]:
            B, H, T = k.shape[:3]
            slot = torch.tensor(self.slots, device=k.device, dtype=torch.long).view(B, 1, 1)
            head = torch.arange(H, device=k.device).view(1, H, 1)
            pos = self.positions(k.device).view(B, 1, T)
            self._index = (slot, head, pos)
        return self._index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the batch's new (B, H, T, D) keys/values at each member's positions; return the
        members' (B, H, read_len, D) keys/values."""
        keys, values = self.pool.layer(layer_idx, key_states)
        index = self._write_index(key_states)
        keys.index_put_(index, key_states.to(keys.dtype))
        values.index_put_(index, value_states.to(values.dtype))
        if self.consecutive:
            s = slice(self.slots[0], self.slots[0] + len(self.slots))
            return keys[s, :, : self.read_len], values[s, :, : self.read_len]
        rows = index[0].view(-1)
        return keys[rows, :, : self.read_len], values[rows, :, : self.read_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.read_len - self.new_tokens
