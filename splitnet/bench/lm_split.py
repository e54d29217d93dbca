"""An LM split into an edge part and a cloud part, its cut crossed through the real wire format.

:class:`SplitLM` runs blocks ``[0, cut)`` (the edge, with its own KV cache), encodes what leaves
them with the cut codec exactly as the edge SDK does (:class:`splitnet.runtime.cut_codec.CutCodecs`
inside a ``forward`` message whose meta is a :class:`~splitnet.wire.headers.ForwardHeader`),
frames the message with :func:`~splitnet.wire.message.encode_message`, and counts
:func:`~splitnet.wire.message.message_nbytes`: the bytes a socket carries. The cloud side reads
those frames back with :func:`~splitnet.wire.message.decode_message` (version, sizes and dtypes
checked), validates the header, decodes the payload, and runs blocks ``[cut, L)`` with its own
cache. No sockets and no processes: the bytes are the same, the timing is not measured here.

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


@dataclass(frozen=True)
class Sent:
    """What one forward message cost: every framed byte, and the codec payload's share of them."""

    message_nbytes: int
    payload_nbytes: int  # Payload.nbytes (header entry + frames of the coded tensor); 0 without a codec
    data_nbytes: int  # the payload's arrays alone (codes, scales): what the quantizer emits, no names, hash or shape
    tokens: int


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
        """(1, V) logits of the last position (or (1, T, V) with ``all_logits``) for (1, T) ids."""
        import torch

        return self.stage({"input_ids": torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))}, self.cache,
                          all_logits=all_logits)["logits"].float()


class SplitLM:
    """Edge blocks [0, cut) + codec + wire + cloud blocks [cut, L), each side with its own cache.

    ``codec`` is a fitted or stateless :class:`~splitnet.codecs.base.Codec`, or None (the cut's
    float32 tensor travels raw, as a stage without ``--codec`` sends it).
    """

    def __init__(self, bm, cut: int, codec) -> None:
        from splitnet.runtime.cut_codec import CutCodecs

        self.edge, self.cloud = bm.stage(0, cut), bm.stage(cut, bm.num_blocks)
        self.codecs = CutCodecs()
        self.codecs.out = codec  # what the edge SDK's local_codec holds
        if codec is not None and codec.codebook_hash:
            self.codecs.by_hash[codec.codebook_hash] = codec  # the cloud stage loaded the same codec file
        self.edge_cache = self.cloud_cache = None
        self.pos = 0
        self.seq = 0
        self.last_cut: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        self.edge_cache, self.cloud_cache = self.edge.new_cache(), self.cloud.new_cache()
        self.pos = self.seq = 0

    def forward(self, ids: np.ndarray, *, all_logits: bool = False):
        """(logits, :class:`Sent`) for (1, T) ids fed after what this request already holds."""
        import torch

        from splitnet.codecs.framing import CODECS_KEY
        from splitnet.wire.headers import ForwardHeader
        from splitnet.wire.message import Message, decode_message, encode_message, message_nbytes

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = self.edge({"input_ids": torch.from_numpy(ids)}, self.edge_cache)
        tensors, codec_meta = self.codecs.encode(out)
        msg = Message(kind="forward", req=REQUEST_ID, seq=self.seq, epoch=0, tensors=tensors,
                      meta=_header(self.pos, all_logits, codec_meta))
        frames = encode_message(msg)
        sent = message_nbytes(frames)
        payload = data = 0
        if codec_meta.get(CODECS_KEY):
            from splitnet.codecs.framing import extract_payloads

            _, payloads = extract_payloads(tensors, codec_meta)
            payload = sum(p.nbytes for p in payloads.values())
            data = sum(int(a.nbytes) for p in payloads.values() for a in p.parts.values())
        # the cloud stage's side: the frames as they arrive, checked before use
        got = decode_message(_frames_to_bytes(frames))
        ForwardHeader.from_meta(got.meta)
        raw = self.codecs.decode(got.tensors, got.meta)
        hidden = torch.from_numpy(np.array(raw["hidden"], dtype=np.float32))
        c = hidden.shape[-1]
        self.last_cut = (out["hidden"].float().reshape(-1, c).numpy(), hidden.reshape(-1, c).numpy())  # (T, C) sent, received
        logits = self.cloud({"hidden": hidden, **{k: torch.from_numpy(np.asarray(v)) for k, v in raw.items() if k != "hidden"}},
                            self.cloud_cache, all_logits=all_logits)["logits"].float()
        self.pos += ids.shape[1]
        self.seq += 1
        return logits, Sent(sent, payload, data, ids.shape[1])


def greedy(model, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], list[Sent]]:
    """Free-running greedy continuation of (P,) ``prompt``: ``new_tokens`` ids, and the messages
    sent (the prefill first, then one per decode step; the last token is never fed back)."""
    model.reset()
    sent: list[Sent] = []
    out: list[int] = []
    feed = prompt[None, :]
    for _ in range(new_tokens):
        r = model.forward(feed)
        logits, s = r if isinstance(r, tuple) else (r, None)
        if s is not None:
            sent.append(s)
        tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
        out.append(tok)
        feed = np.array([[tok]], dtype=np.int64)
    return out, sent


def teacher_forced(model, window: np.ndarray):
    """(T, V) float logits of every position of (T,) ``window`` in one prefill, and what it sent."""
    model.reset()
    r = model.forward(window[None, :], all_logits=True)
    logits, s = r if isinstance(r, tuple) else (r, None)
    return logits.reshape(-1, logits.shape[-1]), s
