"""An LM split into an edge part and a cloud part, its cut crossed through the real wire format.

:class:`SplitLM` runs blocks ``[0, cut)`` (the edge, with its own KV cache), encodes what leaves
them with the cut codec exactly as the edge SDK does (:class:`splitnet.runtime.cut_codec.CutCodecs`
inside a ``forward`` message whose meta is a :class:`~splitnet.wire.headers.ForwardHeader`),
frames the message with :func:`~splitnet.wire.message.encode_message`, and counts
:func:`~splitnet.wire.message.message_nbytes`: the bytes a socket carries. The cloud side reads
those frames back with :func:`~splitnet.wire.message.decode_message` (version, sizes and dtypes
checked), validates the header, decodes the payload with a :class:`CutCodecs` of its own (the
stage's), and runs blocks ``[cut, L)`` with its own cache. Each row is a request with its own id:
its prefill carries the full codec entry, its decode steps the compact form (``meta["cc"]``), as
the SDK and a stage send them (request context = request id and epoch, position > 0). No sockets
and no processes: the bytes are the same, the timing is not measured here.

:class:`UnsplitLM` is the reference: the whole model in one stage, the same calls.
:func:`cloud_only_nbytes` is what the cloud-only baseline sends instead: the token ids in the
same forward message (the SDK's ``input_ids`` tensor, int64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: the reply address an SDK session puts in every forward (``peer:`` + its 128-bit routing id)
REPLY_TO = "peer:" + "0" * 32
REQUEST_ID = "0" * 16  # the SDK's request ids are 16 hex digits
EPOCH = 0


@dataclass(frozen=True)
class Sent:
    """What one forward message cost: every framed byte, and the codec payload's share of them."""

    message_nbytes: int
    payload_nbytes: int  # what the cut codec adds to the message: its header entry (or compact codes) + frames; 0 without a codec
    data_nbytes: int  # the payload's arrays alone (codes, scales): what the quantizer emits, no names, hash or shape
    tokens: int
    compact: bool = False  # the codes travelled in the compact form (meta["cc"])


def _frames_to_bytes(frames: list[Any]) -> list[bytes]:
    return [f if isinstance(f, bytes) else memoryview(f).cast("B").tobytes() for f in frames]


def _header(pos: int, all_logits: bool, codec_meta: dict[str, Any]) -> dict[str, Any]:
    from splitnet.wire.headers import ForwardHeader

    fields = {"cache": True, "pos": pos, "want_result": True, "head": "logits" if all_logits else "argmax", "all_logits": all_logits}
    return ForwardHeader(reply_to=REPLY_TO, **fields, **codec_meta).to_meta()


def cloud_only_nbytes(n_tokens: int, pos: int) -> int:
    """Framed bytes of the forward message that sends ``n_tokens`` token ids to a cloud stage
    holding the whole model (what the SDK sends without a local stage)."""
    from splitnet.wire.message import Message, encode_message, message_nbytes

    ids = np.zeros((1, n_tokens), dtype=np.int64)
    msg = Message(kind="forward", req=REQUEST_ID, seq=0, epoch=0, tensors={"input_ids": ids}, meta=_header(pos, False, {}))
    return message_nbytes(encode_message(msg))


class UnsplitLM:
    """The whole model in one stage with a KV cache: the reference the split is judged against."""

    def __init__(self, bm) -> None:
        self.stage = bm.full()
        self.cache = None

    def reset(self) -> None:
        self.cache = self.stage.new_cache()

    def forward(self, ids: np.ndarray, *, all_logits: bool = False):
        """(B, V) logits of the last position (or (B, T, V) with ``all_logits``) for (B, T) ids, and no messages."""
        import torch

        logits = self.stage({"input_ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))}, self.cache,
                            all_logits=all_logits)["logits"].float()
        return logits, []


class SplitLM:
    """Edge blocks [0, cut) + codec + wire + cloud blocks [cut, L), each side with its own cache.

    Each row of a (B, T) batch is one request: its cut features cross in a message of its own
    (as B edge devices would send them); the two halves of the model run the B rows in one
    forward, in lockstep, as :class:`UnsplitLM` does (same shapes, same arithmetic).
    ``codec`` is a fitted or stateless :class:`~splitnet.codecs.base.Codec`, or None (the cut's
    float32 tensor travels raw, as a stage without ``--codec`` sends it).
    """

    def __init__(self, bm, cut: int, codec) -> None:
        from splitnet.runtime.cut_codec import CutCodecs

        self.edge, self.cloud = bm.stage(0, cut), bm.stage(cut, bm.num_blocks)
        self.edge_codecs = CutCodecs()
        self.edge_codecs.out = codec  # what the edge SDK's local_codec holds
        self.cloud_codecs = CutCodecs()  # the cloud stage's: it encodes nothing (last stage) and loaded the same codec file
        if codec is not None and codec.codebook_hash:
            self.cloud_codecs.by_hash[codec.codebook_hash] = codec
        self.edge_cache = self.cloud_cache = None
        self.pos = 0
        self.seq = 0
        self._requests = 0
        self.reqs: list[str] = []
        self.last_cut: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        """New requests (ids of 16 hex digits, as the SDK's): empty caches, and a full codec entry in their first step."""
        self.edge_cache, self.cloud_cache = self.edge.new_cache(), self.cloud.new_cache()
        self.pos = self.seq = 0
        self.reqs = []

    def _cross(self, hidden, req: str) -> tuple[np.ndarray, Sent]:
        """One request's (1, T, C) cut features through the edge's codec, the wire and the cloud's codec."""
        from splitnet.runtime.cut_codec import COMPACT_KEY, cut_wire_nbytes
        from splitnet.wire.headers import ForwardHeader
        from splitnet.wire.message import Message, decode_message, encode_message, message_nbytes

        context = (req, EPOCH)  # what the SDK keys a cached request's steps by (the stage: origin/req, epoch)
        tensors, codec_meta = self.edge_codecs.encode({"hidden": hidden}, context=context, pos=self.pos)
        msg = Message(kind="forward", req=req, seq=self.seq, epoch=EPOCH, tensors=tensors,
                      meta=_header(self.pos, self._all_logits, codec_meta))
        frames = encode_message(msg)
        payload, data = cut_wire_nbytes(tensors, codec_meta)
        got = decode_message(_frames_to_bytes(frames))  # the cloud stage's side: checked before use
        ForwardHeader.from_meta(got.meta)
        raw = self.cloud_codecs.decode(got.tensors, got.meta, context=(got.req, got.epoch))  # cached: the stage binds / reads its context
        if sorted(raw) != ["hidden"]:
            raise RuntimeError(f"the cut carried {sorted(raw)}; this bench handles decoders whose cut is the hidden state alone")
        return (np.asarray(raw["hidden"], dtype=np.float32),
                Sent(message_nbytes(frames), payload, data, int(hidden.shape[1]), COMPACT_KEY in codec_meta))

    def forward(self, ids: np.ndarray, *, all_logits: bool = False):
        """(logits, [one :class:`Sent` per row]) for (B, T) ids fed after what the requests already hold."""
        import torch

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        hidden = self.edge({"input_ids": torch.from_numpy(ids)}, self.edge_cache)["hidden"]
        self._all_logits = all_logits
        while len(self.reqs) < hidden.shape[0]:
            self.reqs.append(f"{self._requests:016x}")
            self._requests += 1
        crossed = [self._cross(hidden[b : b + 1], self.reqs[b]) for b in range(hidden.shape[0])]
        received = torch.from_numpy(np.concatenate([h for h, _ in crossed]))
        c = received.shape[-1]
        self.last_cut = (hidden.float().reshape(-1, c).numpy(), received.reshape(-1, c).numpy())  # (B*T, C) sent, received
        logits = self.cloud({"hidden": received}, self.cloud_cache, all_logits=all_logits)["logits"].float()
        self.pos += ids.shape[1]
        self.seq += 1
        return logits, [s for _, s in crossed]


def greedy(model, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray, list[list[Sent]]]:
    """Free-running greedy continuations of (B, P) ``prompts``: (B, new_tokens) ids, the
    (B, new_tokens) logit margin of each chosen token over the runner-up, and per row the messages
    it sent (the prefill first, then one per decode step; the last token is never fed back)."""
    model.reset()
    sent: list[list[Sent]] = [[] for _ in range(prompts.shape[0])]
    out = np.empty((prompts.shape[0], new_tokens), dtype=np.int64)
    margin = np.empty((prompts.shape[0], new_tokens), dtype=np.float32)
    feed = prompts
    for i in range(new_tokens):
        logits, s = model.forward(feed)
        for row, m in zip(sent, s):
            row.append(m)
        top = logits.reshape(prompts.shape[0], -1, logits.shape[-1])[:, -1].topk(2, dim=-1)
        out[:, i] = top.indices[:, 0].numpy()
        margin[:, i] = (top.values[:, 0] - top.values[:, 1]).numpy()
        feed = out[:, i : i + 1]
    return out, margin, sent


def teacher_forced(model, windows: np.ndarray):
    """(B, T, V) float logits of every position of (B, T) ``windows`` in one prefill each, and what each row sent."""
    model.reset()
    logits, s = model.forward(windows, all_logits=True)
    return logits.reshape(windows.shape[0], windows.shape[1], -1), s
