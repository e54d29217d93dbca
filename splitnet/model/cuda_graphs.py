"""CUDA graphs of a decoder stage's decode step: one graph per (batch bucket, KV-length bucket).

A decode step launches hundreds of small kernels; eager PyTorch spends more time launching them
than the GPU spends running them. A stage on CUDA captures the step once per shape and then
replays it: the batch is padded up to a bucket (1, 2, 4, ..., the stage's batch limit), the
members' slot rows are read up to a length bucket (a power of two >= the longest member + 1),
and each member's position, slot and mask come from small index tensors the graph reads, so one
graph serves every batch of that shape. Rows that pad the batch point at a scratch slot the
graphs own, so they never touch a request's cache.

The graphs hold the pool's tensors by address: when the pool grows (more slots, more positions),
the graphs are dropped and captured again on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from splitnet.model.slot_cache import SlotCache, SlotPool

if TYPE_CHECKING:  # pragma: no cover
    from splitnet.model.hf_decoder import HFDecoderStage


def _bucket(n: int, lo: int) -> int:
    b = lo
    while b < n:
        b *= 2
    return b


class _GraphView:
    """The cache interface inside a graph: writes at (slot, position) from index tensors, reads
    the members' rows (gathered) up to the length bucket."""

    is_compileable = False

    def __init__(self, pool: SlotPool, slots: torch.Tensor, lengths: torch.Tensor, read_len: int):
        self.pool, self.slots, self.lengths, self.read_len = pool, slots, lengths, read_len
        B = slots.shape[0]
        self._rows = slots.view(B, 1, 1)
        self._pos = lengths.view(B, 1, 1)
        self._heads: torch.Tensor | None = None  # (1, H, 1), made at the first layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.pool.layer(layer_idx, key_states)
        if self._heads is None or self._heads.shape[1] != key_states.shape[1]:
            self._heads = torch.arange(key_states.shape[1], device=key_states.device).view(1, -1, 1)
        index = (self._rows, self._heads, self._pos)
        keys.index_put_(index, key_states.to(keys.dtype))
        values.index_put_(index, value_states.to(values.dtype))
        # slice, then gather: only the members' first read_len positions are copied, not the whole capacity
        return keys[:, :, : self.read_len].index_select(0, self.slots), values[:, :, : self.read_len].index_select(0, self.slots)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given explicitly


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor):
        self.graph, self.x, self.slots, self.lengths, self.out = graph, x, slots, lengths, out


class DecodeGraphs:
    """Captured decode steps of ``stage`` over ``pool`` for batches up to ``max_batch``."""

    def __init__(self, stage: "HFDecoderStage", pool: SlotPool, max_batch: int, min_length: int = 128):
        self.stage = stage
        self.pool = pool
        self.max_batch = max_batch
        self.min_length = min_length
        self.scratch = pool.acquire()  # the slot padding rows write to
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._pool_shape = (pool.rows, pool.capacity)
        self._mempool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def supports(self, caches: list[SlotCache], new_tokens: int, all_logits: bool) -> bool:
        return new_tokens == 1 and not all_logits and len(caches) <= self.max_batch

    @torch.no_grad()
    def run(self, x: torch.Tensor, caches: list[SlotCache]) -> torch.Tensor:
        """The stage's output for a (B, 1) ids or (B, 1, C) hidden batch: (B, vocab) logits on the
        last stage, else (B, 1, C) hidden; the caches advance by one."""
        B = len(caches)
        if len({c.slot for c in caches}) != B:
            raise ValueError("a batch holds each request at most once")
        Bb = _bucket(B, 1)
        Lb = self._length_bucket(max(c.length for c in caches) + 1)
        self._fit(rows=max(c.slot for c in caches) + 1, positions=Lb)
        g = self.graphs.get((Bb, Lb))
        if g is None:
            g = self.graphs[(Bb, Lb)] = self._capture(Bb, Lb, x)
        slots = [c.slot for c in caches] + [self.scratch.slot] * (Bb - B)
        lengths = [c.length for c in caches] + [0] * (Bb - B)
        g.slots.copy_(torch.tensor(slots, dtype=torch.long))
        g.lengths.copy_(torch.tensor(lengths, dtype=torch.long))
        g.x[:B].copy_(x)
        g.graph.replay()
        for c in caches:
            c.advance(1)
        return g.out[:B].clone()

    def prepare(self, batches: list[int], lengths: list[int], like: torch.Tensor) -> int:
        """Capture the graphs of ``batches`` x ``lengths`` (each rounded up to its bucket, the
        lengths capped by the pool) now, instead of on a request's first step; ``like`` is one
        member's (1, 1) ids or (1, 1, C) hidden. The pool is grown once to the longest length
        first, so no capture here is dropped by a later one. Returns the graphs captured."""
        buckets = sorted({self._length_bucket(n) for n in lengths})
        if not buckets:
            return 0
        self._fit(rows=self.scratch.slot + 1, positions=buckets[-1])
        before = self.captures
        for Bb in sorted({_bucket(b, 1) for b in batches if 1 <= b <= self.max_batch}):
            for Lb in buckets:
                if (Bb, Lb) not in self.graphs:
                    self.graphs[(Bb, Lb)] = self._capture(Bb, Lb, like)
        return self.captures - before

    def _length_bucket(self, n: int) -> int:
        Lb = _bucket(n, self.min_length)
        return Lb if self.pool.max_positions is None else min(Lb, self.pool.max_positions)

    def _fit(self, rows: int, positions: int) -> None:
        """Grow the pool first (graphs hold its tensors by address); when it moved, drop the graphs."""
        self.pool.reserve(rows=rows, positions=positions)
        if (self.pool.rows, self.pool.capacity) != self._pool_shape:
            self.graphs.clear()  # the pool's tensors moved
            self._mempool = torch.cuda.graph_pool_handle()  # a freed graph pool must not be captured into again
            self._pool_shape = (self.pool.rows, self.pool.capacity)

    def _body(self, x: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, read_len: int) -> torch.Tensor:
        st = self.stage
        view = _GraphView(self.pool, slots, lengths, read_len)
        positions = lengths.view(-1, 1)  # (B, 1): each member's one new token sits at its length
        masks = st.slot_masks(positions, read_len, next(st.parameters()).dtype)
        kwargs = {"input_ids": x} if st.embed is not None else {"inputs_embeds": x}
        out = st._run_shell(x.device, attention_mask=masks, position_ids=positions, cache=view, use_cache=True, **kwargs)
        h = out.last_hidden_state
        if st.head is not None:
            return st.head.logits(h[:, -1:])[:, -1]
        return h

    def _capture(self, Bb: int, Lb: int, like: torch.Tensor) -> _Graph:
        device = like.device
        x = torch.zeros((Bb, *like.shape[1:]), dtype=like.dtype, device=device)
        slots = torch.full((Bb,), self.scratch.slot, dtype=torch.long, device=device)
        lengths = torch.zeros((Bb,), dtype=torch.long, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (allocations, lazy layers of the pool) on the scratch slot only
                self._body(x, slots, lengths, Lb)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = self._body(x, slots, lengths, Lb)
        self.captures += 1
        return _Graph(graph, x, slots, lengths, out)
