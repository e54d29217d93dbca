"""The client SDK: connect to a pipeline of stages and run ``infer`` / ``generate``.

The session connects to every stage (no port of its own: it works behind NAT) and sends model
inputs to stage 0 with a ``route`` through the other stages. The last stage sends the result back
over the session's own connection to it (``reply_to = "peer:<routing id>"``), or, with
``ClientConfig(reply_via="bind")``, to an endpoint the session binds.

The session is a thin facade over three layers:

- :mod:`splitnet.edge.links`: the sockets, the one poll loop, heartbeats and liveness
  (a stage that misses ``heartbeat_liveness`` pings, or whose connection closed and did not come
  back, raises :class:`StageUnavailable`);
- :mod:`splitnet.edge.replies` and :mod:`splitnet.edge.recovery`: the bounded, epoch-aware
  store of replies, and the replacement of lost stages (hooks in parallel, faults inside a
  recovery retried within the budget);
- :mod:`splitnet.edge.generation`: ``generate``, ``stream`` and ``generate_many`` over one
  decode loop with typed per-sequence state and typed results.

Forward messages are built through :class:`splitnet.wire.headers.ForwardHeader`.
"""

from __future__ import annotations

import inspect
import time
from contextlib import closing
import uuid
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from splitnet.edge.config import ClientConfig
from splitnet.edge.draft import DraftModel
from splitnet.edge.generation import (
    GenerationResult,
    RecoveryBudget,
    SequenceState,
    StreamEvent,
    TokenChunk,
    decode,
    new_sequences,
    step_stats,
    stream_events,
)
from splitnet.edge.inputs import check_infer_inputs
from splitnet.edge.links import StageLinks
from splitnet.edge.recovery import RecoveryRecord, StageRecovery
from splitnet.edge.replies import Key, ReplyStore
from splitnet.edge.sampling import SamplingConfig
from splitnet.errors import CachesLost, ConfigError, PlanMismatch, SplitnetError, StageUnavailable, UnknownRequest, error_from_code
from splitnet.wire import Message, SocketConfig, encode_message
from splitnet.wire.batches import batch_message, member_shares
from splitnet.wire.headers import MAX_BATCH_MEMBERS, ForwardHeader, SiblingHeaders, batch_member
from splitnet.wire.security import load_server_keys

__all__ = ["GenerationResult", "Session", "TokenChunk", "connect"]


class Session:
    """A connection to one pipeline. Use from one thread; close() (or ``with``) when done."""

    def __init__(
        self,
        endpoints: Sequence[str],
        config: ClientConfig | None = None,
        *,
        socket_config: SocketConfig | None = None,
        tokenizer: Any = None,
        recovery: Callable[[int], str] | None = None,
        local_stage: Any = None,
        local_codec: str = "",
    ):
        """``recovery(stage_index) -> endpoint`` moves a dead stage to a live process (e.g.
        :meth:`splitnet.runtime.launcher.LocalPipeline.respawn_stage`); with it, a request that
        loses a stage is replayed from its own inputs instead of failing.

        ``local_stage`` runs the first blocks on this device (an
        :class:`~splitnet.edge.onnx_stage.OnnxStage`: onnxruntime, no torch); the endpoints then
        serve the blocks after it, and only the cut's features leave the device, encoded with
        ``local_codec`` (a codec name such as ``"fp16"``, or a calibrated codec file; "" sends fp32)."""
        if not endpoints:
            raise ConfigError("connect() needs at least one stage endpoint")
        self.config = config or ClientConfig()
        self._local = local_stage
        if local_stage is not None:
            if local_stage.blocks[0] != 0:
                raise ConfigError(f"a local stage must start at block 0; this one holds blocks {local_stage.blocks}")
            if local_stage.kind == "decoder" and not getattr(local_stage, "uses_kv_cache", False):
                raise ConfigError("a local decoder stage must carry its KV cache (export it again with this splitnet: `splitnet export-onnx`)")
        self.local_ms = 0.0  # time spent in the local stage (and its codec), all calls
        self._local_codec = None
        if local_codec:
            if local_stage is None:
                raise ConfigError("local_codec encodes what a local stage sends; pass local_stage too")
            from splitnet.runtime.cut_codec import CutCodecs

            self._local_codec = CutCodecs(local_codec)
        if socket_config is None and self.config.client_key:
            from splitnet.wire.security import client_curve_config

            socket_config = SocketConfig(security=client_curve_config(self.config.client_key, self.config.server_key, transport=self.config.transport))
        self.socket_config = socket_config or SocketConfig()
        self._stage_keys = self._keys_per_stage(len(endpoints))
        self._replies = ReplyStore(self.config.max_pending_replies)
        self._infos: list[dict] = []
        self._info_replies: dict[int, dict] = {}
        self._refusal: Exception | None = None
        self._handshaking = False
        self._tokenizer = tokenizer
        self.last_stats: dict = {}
        self._closed = False
        self.links = StageLinks(endpoints, self.config, self.socket_config, self._stage_keys, uuid.uuid4().hex.encode(), self._on_message)
        # a replacement reported ready answers info at once: its handshake waits two liveness
        # windows at most, so a replacement lost inside the recovery is retried soon
        recovery_handshake_s = min(self.config.connect_timeout_s, max(2 * self.links.window_s, 1.0))
        self._recovery = StageRecovery(recovery, self.links.silent_stages, self._replace_stage, self._new_epoch,
                                       lambda: self._recovery_handshake(recovery_handshake_s))
        try:
            self._handshake(self.config.connect_timeout_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up -------------
    def _keys_per_stage(self, n: int) -> list[bytes] | None:
        """Each stage's CURVE public key, in pipeline order (None without keys)."""
        security = self.socket_config.security
        if security is None:
            return None
        keys = list(load_server_keys(self.config.server_key)) if self.config.server_key else [security.peer_key]
        if len(keys) == 1:
            keys = keys * n
        if len(keys) != n:
            raise ConfigError(f"{len(keys)} stage public keys for {n} stages: give one key for all stages, or one per stage in order")
        return keys

    def _on_message(self, stage: int | None, msg: Message, nbytes: int) -> None:
        """Where the poll loop hands every decoded message (pings and pongs it answers itself)."""
        if msg.kind == "info_reply" and stage is not None:
            self._info_replies[stage] = dict(msg.meta)
        elif msg.kind == "error" and self._handshaking and msg.req in ("", f"info-{stage}") and msg.meta.get("code") in ("auth", "protocol"):
            # a refusal (wrong or missing keys, another protocol): no point in waiting
            self._refusal = error_from_code(str(msg.meta.get("code")), f"stage {stage} at {self.endpoints[stage]} refused this client: {msg.meta.get('msg')}")
        elif msg.kind in ("result", "error") and msg.req:
            self._replies.put(msg, nbytes)

    def _handshake(self, timeout_s: float) -> None:
        """Ask every stage what it serves (``info``) and check they form one pipeline of one model."""
        self.links.begin_handshake()
        self._info_replies, self._refusal = {}, None
        n = len(self.links)
        next_try = [0.0]

        def answered() -> bool:
            if self._refusal is not None:
                raise self._refusal
            if len(self._info_replies) >= n:
                return True
            if time.monotonic() >= next_try[0]:  # a send before the TCP connection is up is dropped: retry
                for i in range(n):
                    if i not in self._info_replies:
                        self.links.send(i, Message(kind="info", req=f"info-{i}", meta={"t": time.monotonic()}))  # echoed: a first round trip
                next_try[0] = time.monotonic() + 0.2
            return False

        def no_answer() -> StageUnavailable:
            missing = [f"stage {i} at {self.endpoints[i]}" for i in range(n) if i not in self._info_replies]
            return StageUnavailable(f"no answer within {timeout_s:g} s from {', '.join(missing)}; is serve-stage running there?")

        self._handshaking = True
        try:
            self.links.wait_until(answered, timeout_s, no_answer, heartbeats=False, liveness=False)
        finally:
            self._handshaking = False
            self.links.end_handshake()
        ordered = [self._info_replies[i] for i in range(n)]
        fps = {(x["model"], x["fingerprint"]) for x in ordered}
        if self._local is not None:
            fps.add((self._local.model, self._local.fingerprint))
        if len(fps) != 1:
            raise PlanMismatch(f"stages serve different models: {sorted(fps)}; start every stage (and export the local one) from the same model files")
        expected = self._local.blocks[1] if self._local is not None else 0
        for i, info in enumerate(ordered):
            a, b = info["blocks"]
            if a != expected:
                raise PlanMismatch(f"stage {i} at {self.endpoints[i]} serves blocks {a}:{b}, but the pipeline needs it to start at block {expected}")
            expected = b
        if expected != ordered[0]["num_blocks"]:
            raise PlanMismatch(f"stages cover blocks 0:{expected} of {ordered[0]['num_blocks']}; the last stage must end at the head")
        self._infos = ordered

    def _recovery_handshake(self, timeout_s: float) -> list[int]:
        """The handshake at the end of a recovery; returns the stages that answered from another
        process than at the previous handshake. A stage restarted on its own endpoint is found
        here, however far its pongs are behind: a peer's "could not reach the next stage" starts
        the recovery, no stage is silent by then, and its empty caches would fail the resume.
        Its new pid is taken as known, so its next pong starts no second recovery."""
        before = [info.get("pid") for info in self._infos]
        self._handshake(timeout_s)
        changed = [i for i, (pid, info) in enumerate(zip(before, self._infos)) if pid is not None and info.get("pid") != pid]
        for i in changed:
            self.links.accept_process(i, self._infos[i].get("pid"))
        return changed

    def refresh(self, timeout_s: float | None = None) -> list[dict]:
        """Ask every stage again what it serves and how it is doing (``info``: blocks, cached
        requests, counters); returns :attr:`stages`."""
        self._handshake(self.config.connect_timeout_s if timeout_s is None else timeout_s)
        return self.stages

    @property
    def endpoints(self) -> list[str]:
        return self.links.endpoints

    @property
    def reply_to(self) -> str:
        """Where the last stage sends results: ``"peer:" + routing id`` or a bound endpoint."""
        return self.links.reply_to

    @reply_to.setter
    def reply_to(self, endpoint: str) -> None:
        """Have results sent somewhere else (a relay in front of a bound results socket, as the
        netns lab's delay relay does)."""
        self.links.reply_to = endpoint

    @property
    def stages(self) -> list[dict]:
        """What each stage reported at connect: endpoint, pid, blocks, model, codec."""
        return list(self._infos)

    @property
    def kind(self) -> str:
        return self._local.kind if self._local is not None else self._infos[0]["kind"]

    @property
    def max_positions(self) -> int | None:
        """The model's context length in tokens, when the stages report one."""
        limit = self._infos[0].get("max_positions") if self._infos else None
        return limit if isinstance(limit, int) and limit > 0 else None

    @property
    def batch_messages(self) -> bool:
        """Whether every stage takes batch messages (``info["batch_messages"]``): then steps of
        many sequences go to stage 0 as one ``forward_batch`` and the stages send batches on
        (results for this session as one ``result_batch``). False with an older stage anywhere,
        or a local first stage: one message per step, as before."""
        return self._local is None and bool(self._infos) and all(info.get("batch_messages") is True for info in self._infos)

    @property
    def epoch(self) -> int:
        """The pipeline generation: it grows by one with every recovery; older replies are dropped."""
        return self._replies.epoch

    @property
    def recoveries(self) -> list[dict]:
        """What each recovery replaced (``cause``, ``replaced``, ``epoch``, ``recover_ms``, ``attempts``)."""
        return [asdict(r) for r in self._recovery.records]

    @property
    def recovery_records(self) -> list[RecoveryRecord]:
        return list(self._recovery.records)

    @property
    def reply_counts(self):
        """What the reply store kept and dropped (stale epochs, released requests), and its peak size."""
        return self._replies.counts

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._local is not None:
            self._tokenizer = self._local.tokenizer  # exported with it: no model files, no torch
        if self._tokenizer is None:
            from splitnet.model.loading import _tokenizer_for, resolve_model_dir
            from splitnet.model.weights import read_config

            model_dir = resolve_model_dir(self._infos[0]["model"])
            self._tokenizer = _tokenizer_for(read_config(Path(model_dir)), Path(model_dir))
            if self._tokenizer is None:
                raise ConfigError(f"model {self._infos[0]['model']} has no tokenizer; pass token ids")
        return self._tokenizer

    # ------------------------------------------------------------------ requests -----------
    # (the StepClient protocol of splitnet.edge.generation)
    @property
    def prefill_chunk_tokens(self) -> int:
        return self.config.prefill_chunk_tokens

    def open_request(self) -> str:
        """A new request id whose replies the store accepts until :meth:`release`."""
        req = uuid.uuid4().hex[:16]
        self._replies.open(req)
        return req

    def send_tokens(self, req: str, seq: int, tokens: list[int], *, pos: int, want_result: bool, rewind: bool,
                    all_logits: bool, head: dict, resume_from: str | None = None, refill: tuple[int, ...] = (),
                    stages: int | None = None) -> int:
        """One chunk of ``req``'s tokens at ``pos``. ``resume_from``/``refill``: see
        :class:`~splitnet.wire.headers.ForwardHeader`; ``stages``: the chunk visits only the
        first ``stages`` stages (a fill of replacements; it wants no result)."""
        return self._forward(req, seq, {"input_ids": np.asarray([tokens], dtype=np.int64)}, cache=True, pos=pos,
                             want_result=want_result, rewind=rewind, all_logits=all_logits, resume_from=resume_from,
                             refill=tuple(refill), _stages=stages, **head)

    @property
    def can_resume(self) -> bool:
        """Whether a recovery may resume requests where the stages kept their caches (every
        stage announces it) instead of replaying them in full. Not with a local first stage
        (its cache lives here) or a cut codec (its state is per request and connection)."""
        return self._local is None and bool(self._infos) and all(i.get("resume") for i in self._infos) and all(i.get("codec_out", "raw") == "raw" for i in self._infos)

    def last_replaced(self) -> tuple[int, ...] | None:
        """The stages the last recovery replaced (new processes: their caches are empty), or None."""
        recs = self.recovery_records
        return tuple(recs[-1].caches_lost) if recs else None

    def _run_local(self, req: str, tensors: Mapping[str, Any], pos: int | None, cache: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """What crosses the first cut for model inputs ``tensors``: the local stage's outputs,
        encoded with the local codec, and the header fields the next stage needs to decode them
        (a cached request's later steps in the compact form, where stage 0 announces it)."""
        t0 = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in tensors.items()}
        if getattr(self._local, "uses_kv_cache", False):
            out = self._local(arrays, request=req, pos=pos)
        else:
            out = self._local(arrays)
        codec_meta: dict[str, Any] = {}
        if self._local_codec is not None:
            from splitnet.runtime.cut_codec import COMPACT_VERSION

            compact = cache and bool(self._infos) and self._infos[0].get("compact_codes") == COMPACT_VERSION
            out, codec_meta = self._local_codec.encode(out, context=(req, self.epoch) if compact else None, pos=pos)
        self.local_ms += (time.perf_counter() - t0) * 1e3
        return out, codec_meta

    def _forward(self, req: str, seq: int, tensors: Mapping[str, Any], **fields: Any) -> int:
        """Send one forward message to stage 0 (after the local stage, if any); the bytes sent."""
        if self._local is not None:
            tensors, codec_meta = self._run_local(req, tensors, fields.get("pos"), bool(fields.get("cache")))  # only the cut leaves the device
            fields.update(codec_meta)
        if self.batch_messages:
            fields.setdefault("batch_messages", True)
        stages = fields.pop("_stages", None)
        route, keys = tuple(self.endpoints[1:]), self._route_keys()
        if stages is not None:
            route, keys = route[:stages - 1], keys[:stages - 1]
        header = ForwardHeader(reply_to=self.reply_to, route=route, route_keys=keys, **fields)
        frames = encode_message(Message(kind="forward", req=req, seq=seq, epoch=self.epoch, tensors=tensors, meta=header.to_meta()))
        return self.links.send_or_wait(0, frames, self.config.timeout_s)

    def _route_keys(self) -> tuple[str, ...]:
        return tuple(k.decode() for k in self._stage_keys[1:]) if self._stage_keys is not None else ()

    def send_token_steps(self, steps: Sequence[tuple[str, int, int, int]], *, head: dict) -> list[int]:
        """Send one decode step (one token, cached, its result wanted) for each ``(req, seq,
        token, pos)`` in ``steps`` as ONE ``forward_batch`` message to stage 0 (several when
        there are more than :data:`MAX_BATCH_MEMBERS`); returns each step's share of the bytes
        sent. Needs :attr:`batch_messages`."""
        if not self.batch_messages:
            raise ConfigError("send_token_steps needs stages that take batch messages; send each step with send_tokens")
        sent: list[int] = []
        if not steps:
            return sent
        first = ForwardHeader(reply_to=self.reply_to, route=tuple(self.endpoints[1:]), route_keys=self._route_keys(), cache=True,
                              pos=steps[0][3], batch_messages=True, **head)
        first_meta = first.to_meta()
        siblings = SiblingHeaders(first, first_meta)  # the members differ from the first only in their position: checked in it alone
        for i in range(0, len(steps), MAX_BATCH_MEMBERS):
            part = steps[i:i + MAX_BATCH_MEMBERS]
            members = []
            for req, seq, _, pos in part:
                meta = {**first_meta, "pos": pos}
                members.append(batch_member(req, seq, self.epoch, 1, siblings.read(meta), (), meta))  # meta: written as it was read
            ids = np.asarray([[tok] for _, _, tok, _ in part], dtype=np.int64)  # (B, 1): one row per member
            frames = encode_message(batch_message("forward_batch", members, {"input_ids": ids}))
            sent += member_shares([1] * len(part), self.links.send_or_wait(0, frames, self.config.timeout_s))
        return sent

    def reply_ready(self, keys: set[Key]) -> bool:
        """Whether a reply (or error) to one of ``keys`` has arrived already: :meth:`wait_reply`
        would return (or raise) without waiting."""
        return self._replies.ready(keys)

    def wait_reply(self, keys: set[Key], timeout_s: float | None = None) -> tuple[Key, Message, int]:
        """Wait for the first of ``keys`` to complete: ``(key, message, bytes received)``; raise
        the request's error (typed) if it failed, StageUnavailable if a stage is down or nothing
        came within ``timeout_s`` (default ``ClientConfig.timeout_s``)."""
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        got: list[tuple[Key, Message, int]] = []
        since = time.monotonic()

        def arrived() -> bool:
            reply = self._replies.take(keys)
            if reply is not None:
                got.append(reply)
                return True
            opened = [t for t in (self._replies.opened_s(k[0]) for k in keys) if t > 0.0]  # 0.0: not open (released)
            restarted = self.links.restarted_since(since, min(opened, default=0.0))
            if restarted is not None:  # a new process answers on the old endpoint: what the old one owed will never come
                i, old_pid, new_pid = restarted
                raise CachesLost(f"stage {i} at {self.endpoints[i]} was restarted in place (pid {old_pid} -> {new_pid}) "
                                 f"while {sorted(k[0] for k in keys)[:3]} waited; its caches and replies are gone; resuming", stages=(i,))
            lost = self.links.lost_reply_suspect(since)
            if lost is not None:  # the stage is back but what it sent across the reopen is gone: replay now, not after timeout_s
                raise CachesLost(f"stage {lost} at {self.endpoints[lost]} answered again after its connection was reopened, "
                                 f"but the reply of {sorted(k[0] for k in keys)[:3]} did not come; resuming")
            return False

        def nothing() -> StageUnavailable:
            silent = [i for i in range(len(self.links)) if self.links.silent_s(i) > self.config.heartbeat_interval_s * 2]
            who = ", ".join(f"stage {i} at {self.endpoints[i]}" for i in silent) or "the pipeline"
            return StageUnavailable(f"no result within {timeout_s:.1f} s from {who}")

        self.links.wait_until(arrived, timeout_s, nothing)
        self.links.note_used(None, got[0][1], got[0][2])
        return got[0]

    def observe(self, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback(event)`` (a :class:`splitnet.edge.links.LinkEvent`) for every message
        this session sends or receives and every reply it uses; returns a function that stops it."""
        return self.links.observe(callback)

    def release(self, req: str) -> None:
        """Drop ``req``'s caches on every stage (and locally) and any reply still to come."""
        self._replies.release(req)
        if self._local is not None and hasattr(self._local, "release"):
            self._local.release(req)
        for i in range(len(self.links)):
            self.links.send(i, Message(kind="release", req=req))

    def recover(self, cause: StageUnavailable | UnknownRequest, budget: RecoveryBudget) -> None:
        self._recovery(cause, budget)

    def _replace_stage(self, i: int, endpoint: str) -> None:
        self.links.begin_handshake()  # the new connection's handshake failures surface as AuthError
        self.links.replace(i, endpoint)

    def _new_epoch(self) -> int:
        self._replies.epoch += 1
        return self._replies.epoch

    def _budget(self) -> RecoveryBudget:
        return RecoveryBudget(self.config.max_recoveries, self.config.recovery_refill_tokens)

    # --- kept for callers of the former private API (benches): prefer infer/generate ---
    def _send_forward(self, req: str, seq: int, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> int:
        self._replies.open(req)
        return self._forward(req, seq, tensors, **dict(meta))

    @property
    def _pending(self) -> dict[Key, Message]:
        """The replies held now (read by the hostile-peer harness)."""
        return self._replies.held()

    def _wait_any(self, keys: set[Key], timeout_s: float | None = None) -> tuple[Key, Message]:
        key, msg, _ = self.wait_reply(keys, timeout_s)
        return key, msg

    # ------------------------------------------------------------------ encoders / vision --
    def infer(self, inputs: Mapping[str, Any], *, timeout_s: float | None = None, all_logits: bool = False,
              head: str = "logits", top_k: int | None = None) -> dict[str, np.ndarray]:
        """Run one batch through the pipeline and return the last stage's outputs.

        ``inputs`` holds model inputs (``input_ids``/``attention_mask``, ``pixel_values``, ``x``)
        as numpy arrays or torch tensors, or ``{"text": [...]}`` for models with a tokenizer.
        A wrong or missing key fails at once with a ConfigError naming the expected ones.

        For a decoder (no KV cache is kept: one pass over the given tokens), ``all_logits``
        returns the head's output at every position, not only the last, and ``head`` asks the
        last stage to reduce the logits first: ``"argmax"`` (the greedy choice per position, as
        ``argmax``) or ``"topk"`` with ``top_k`` (``topk_values``, ``topk_indices``).
        """
        inputs = check_infer_inputs(inputs, self.kind)
        options: dict[str, Any] = {}
        if all_logits or head != "logits" or top_k is not None:
            if self.kind != "decoder":
                raise ConfigError(f"all_logits, head and top_k are options of a decoder's head; this pipeline serves a {self.kind}")
            options = {"all_logits": bool(all_logits), "head": head, "top_k": top_k}
            try:
                ForwardHeader(reply_to=self.reply_to, **options)
            except SplitnetError as e:
                raise ConfigError(f"infer(): {e}") from e
        if "text" in inputs:
            texts = inputs.pop("text")
            texts, max_length = [texts] if isinstance(texts, str) else list(texts), int(inputs.pop("max_length", 256))
            numpy_flag = {"numpy": True} if _has_parameter(self.tokenizer, "numpy") else {}  # numpy: no torch needed here
            inputs.update(self.tokenizer(texts, max_length=max_length, **numpy_flag))
        t0 = time.perf_counter()
        local_before = self.local_ms
        budget = self._budget()
        while True:
            req = self.open_request()
            try:
                sent = self._forward(req, 0, inputs, cache=False, **options)
                _, msg, received = self.wait_reply({(req, 0)}, timeout_s)
                break
            except (StageUnavailable, UnknownRequest) as e:
                self._recovery(e, budget)  # a stateless request is simply sent again
            finally:
                self._replies.release(req)
        latency = (time.perf_counter() - t0) * 1e3
        self.last_stats = step_stats(msg, sent, received, latency)
        if self._local is not None:
            self.last_stats["local_ms"] = self.local_ms - local_before
        return {k: np.array(v) for k, v in msg.tensors.items()}

    # ------------------------------------------------------------------ decoders -----------
    def _prompt_ids(self, prompt: str | Sequence[int] | Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        arr = np.asarray(prompt if not hasattr(prompt, "numpy") else prompt.numpy()).reshape(-1)
        if arr.size and arr.dtype.kind not in "iu":
            raise ConfigError(f"a prompt is a string or a sequence of token ids (ints), got {arr.dtype} values")
        return [int(x) for x in arr]

    def _check_decoder(self, what: str) -> None:
        if self.kind != "decoder":
            raise ConfigError(f"{what} needs a decoder model; this pipeline serves a {self.kind}: use infer()")

    def _text_of(self, prompts: Sequence[Any]) -> Callable[[], Any] | None:
        """The tokenizer getter when results should carry text (a text prompt or a given tokenizer)."""
        if self._tokenizer is not None or any(isinstance(p, str) for p in prompts):
            return lambda: self.tokenizer
        return None

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        *,
        sampling: SamplingConfig | None = None,
        stop_token: int | None = None,
        timeout_s: float | None = None,
        draft: DraftModel | None = None,
        speculate_tokens: int = 4,
    ) -> Iterator[StreamEvent]:
        """Yield a :class:`TokenChunk` per generated token as it arrives, then the
        :class:`GenerationResult` (the same one :meth:`generate` returns). Everything is
        checked (model kind, prompt, context length, options) before the first message leaves.

        With ``draft`` (a :class:`~splitnet.edge.draft.DraftModel` on this device), each step
        sends the last token plus ``speculate_tokens`` draft proposals; the pipeline scores them
        in one pass and returns its greedy choice at every position; the longest agreeing prefix
        and the pipeline's next token are kept, and the stages drop the rest of their caches on
        the next step. The tokens are exactly those of greedy decoding without a draft.
        """
        self._check_decoder("generate/stream")
        [s] = new_sequences([self._prompt_ids(prompt)], max_new_tokens, sampling, stop_token=stop_token, draft=draft,
                            speculate_tokens=speculate_tokens, max_positions=self.max_positions)
        return self._stream(s, sampling, timeout_s, self._text_of([prompt]))

    def _stream(self, s: SequenceState, sampling: SamplingConfig | None, timeout_s: float | None, text: Callable[[], Any] | None) -> Iterator[StreamEvent]:
        self.last_stats = s.stats  # the live stats, readable after an error too
        with closing(stream_events(self, s, sampling, self._budget(), timeout_s=timeout_s, tokenizer=text)) as events:
            for event in events:  # a caller that stops early closes this: the request is released at once
                if isinstance(event, GenerationResult):
                    self.last_stats = event.stats
                yield event

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 32,
        *,
        sampling: SamplingConfig | None = None,
        stop_token: int | None = None,
        timeout_s: float | None = None,
        draft: DraftModel | None = None,
        speculate_tokens: int = 4,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens (greedy unless ``sampling`` says otherwise;
        with a ``draft`` model, speculatively: see :meth:`stream`)."""
        events = self.stream(prompt, max_new_tokens, sampling=sampling, stop_token=stop_token, timeout_s=timeout_s,
                             draft=draft, speculate_tokens=speculate_tokens)
        with closing(events):
            for event in events:
                if isinstance(event, GenerationResult):
                    return event
        raise AssertionError("stream ended without a result")  # pragma: no cover - stream_events always ends with one

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 32,
        *,
        sampling: SamplingConfig | None = None,
        stop_token: int | None = None,
        timeout_s: float | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[GenerationResult]:
        """Generation for many prompts at once, one :class:`GenerationResult` per prompt in
        order: while stage i runs a step of one sequence, stage i+1 runs a step of another
        (decode pipelined across sequences).

        ``on_token(index, token)`` is called as each token arrives (``index`` into ``prompts``).
        With a recovery hook, a stage lost mid-way (even before a feed) is replaced and every
        unfinished sequence is replayed from its own log (prompt + tokens so far), as
        :meth:`stream` does: the tokens equal those of a run without faults, and none is
        produced twice.
        """
        self._check_decoder("generate_many")
        seqs = new_sequences([self._prompt_ids(p) for p in prompts], max_new_tokens, sampling, stop_token=stop_token,
                             max_positions=self.max_positions)
        t0 = time.perf_counter()
        with closing(decode(self, seqs, sampling, self._budget(), timeout_s=timeout_s, t0=t0)) as steps:
            for s, new in steps:  # an on_token that raises closes this: every request is released
                if on_token is not None:
                    for tok in new:
                        on_token(s.index, tok)
        text = self._text_of(prompts)
        results = [s.result(t0, text().decode(s.out) if text is not None else None) for s in seqs]
        self.last_stats = {"replays": [r for s in seqs for r in s.stats["replays"]], "sequences": len(seqs),
                           "latency_ms": (time.perf_counter() - t0) * 1e3}
        return results

    # ------------------------------------------------------------------ lifecycle ----------
    def ping(self, timeout_s: float = 2.0) -> list[float]:
        """Round-trip time (ms) of a ping to every stage; raises StageUnavailable for a silent one."""
        return [self.links.ping(i, timeout_s) for i in range(len(self.links))]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        links = getattr(self, "links", None)
        if links is not None:
            links.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CONFIG_FIELDS = frozenset(f.name for f in fields(ClientConfig))
_SESSION_OPTIONS = frozenset(p for p in inspect.signature(Session.__init__).parameters if p not in ("self", "endpoints", "config"))


def connect(stages: Sequence[str] | str | Path | Any, *, config: ClientConfig | None = None, timeout_s: float | None = None, **kwargs: Any) -> Session:
    """Open a :class:`Session` over stage endpoints (listed in order) or a plan file.

    Args:
        stages: ``["tcp://host:port", ...]`` or a plan (YAML/JSON path or object) whose stages
            carry endpoints.
        config: timeouts and heartbeat settings.
        timeout_s: the longest wait for anything: a request's result, and the whole connect
            (its handshake waits at most ``min(timeout_s, config.connect_timeout_s)``).
        **kwargs: :class:`Session` options (``recovery``, ``tokenizer``, ``local_stage``,
            ``local_codec``, ``socket_config``) and any :class:`ClientConfig` field, which
            overrides ``config`` (``connect(eps, client_key=..., server_key=...)``).
    """
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    unknown = sorted(set(kwargs) - _SESSION_OPTIONS)
    if unknown:
        raise ConfigError(f"connect() got unknown option(s) {unknown}; known: {sorted(_SESSION_OPTIONS | _CONFIG_FIELDS | {'config', 'timeout_s'})}")
    expected_hash = ""
    is_plan = (isinstance(stages, (str, Path)) and not str(stages).startswith(("tcp://", "ipc://"))) or (
        hasattr(stages, "stages") and not isinstance(stages, (list, tuple))
    ) or isinstance(stages, dict)
    if is_plan:
        from splitnet.runtime.plan_io import endpoints_from_plan, model_hash_from_plan

        expected_hash = model_hash_from_plan(stages)
        stages = endpoints_from_plan(stages)
    elif isinstance(stages, str):
        stages = [stages]
    config = replace(config or ClientConfig(), **overrides)
    if timeout_s is not None:
        config = replace(config, timeout_s=timeout_s, connect_timeout_s=min(config.connect_timeout_s, timeout_s))
    session = Session(list(stages), config, **kwargs)
    if expected_hash and session.stages[0]["fingerprint"] != expected_hash:
        fp = session.stages[0]["fingerprint"]
        session.close()
        raise PlanMismatch(f"the plan was made for model hash {expected_hash}, but the stages serve {fp}; re-run `splitnet plan` for this model")
    return session


def _has_parameter(fn: Any, name: str) -> bool:
    """Whether callable ``fn`` names parameter ``name`` (a caller's own tokenizer may not have
    splitnet's ``numpy`` option; asking its signature, not catching TypeError, keeps errors raised
    inside the tokenizer visible)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
