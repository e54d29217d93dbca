"""The client SDK: connect to a pipeline of stages and run ``infer`` / ``generate``.

The session connects to every stage (no port of its own: it works behind NAT) and sends model
inputs to stage 0 with a ``route`` through the other stages. The last stage sends the result back
over the session's own connection to it (``reply_to = "peer:<routing id>"``), or, with
``ClientConfig(reply_via="bind")``, to an endpoint the session binds. While it waits, the
session pings every stage (``heartbeat_interval_s``) and raises :class:`StageUnavailable` when
a stage misses ``heartbeat_liveness`` pings in a row or the request outlives ``timeout_s``.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import zmq

from splitnet.edge.config import ClientConfig
from splitnet.edge.draft import DraftModel
from splitnet.edge.sampling import Sampler, SamplingConfig, head_request
from splitnet.errors import AuthError, ConfigError, PlanMismatch, ProtocolError, StageUnavailable, UnknownRequest, error_from_code
from splitnet.wire import (
    DEFAULT_LIMITS,
    Message,
    SocketConfig,
    decode_message,
    encode_message,
    make_socket,
    message_nbytes,
)
from splitnet.wire.security import load_server_keys, set_peer_key

log = logging.getLogger("splitnet.sdk")

Key = tuple[str, int]

_DROPPED = object()  # Session._receive: a message that failed authentication
_MAX_PENDING = 1024  # results and errors kept for requests not yet collected; the oldest go first


@dataclass
class GenerationResult:
    """Tokens produced by :meth:`Session.generate` and how they were made."""

    prompt_ids: list[int]
    tokens: list[int]
    text: str | None
    latency_ms: float
    ttft_ms: float
    stats: dict = field(default_factory=dict)


@dataclass
class _Sequence:
    """One sequence of :meth:`Session.generate_many`: its prompt, what it produced, and where
    its current request stands in the pipeline (replaced by a new request on replay)."""

    index: int  # into the caller's prompts
    ids: list[int]  # prompt token ids
    sampler: Sampler
    out: list[int] = field(default_factory=list)
    req: str = ""  # the current request id ("" before the first)
    seq: int = 0  # next step number of ``req``
    pos: int = 0  # tokens ``req`` has fed the pipeline

    def log(self) -> list[int]:
        """Everything this sequence has fed or must feed: prompt + tokens so far (the replay log)."""
        return self.ids + self.out


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
        self.endpoints = list(endpoints)
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
        self._stage_keys = self._keys_per_stage()
        from splitnet.wire.security import HandshakeWatch

        self._watch = HandshakeWatch(secure=self.socket_config.security is not None)
        self.ctx = zmq.Context.instance()
        self._routing_id = uuid.uuid4().hex.encode()  # this session's id on every stage's ROUTER
        self._results: zmq.Socket | None = None
        if self.config.reply_via == "bind":
            self._results = make_socket(self.ctx, zmq.ROUTER, self.socket_config, server=True)
            self._results.setsockopt(zmq.ROUTER_MANDATORY, 0)
            port = self._results.bind_to_random_port(f"tcp://{self.config.reply_host}", min_port=20000, max_port=60000)
            self.reply_to = f"tcp://{self.config.reply_host}:{port}"
        else:
            self.reply_to = "peer:" + self._routing_id.decode()  # a 128-bit random id, sent only inside CURVE's encryption
        self._recovery = recovery
        self.recoveries: list[dict] = []  # what was replaced and replayed, for reports
        self._controls = [self._open_control(i, ep) for i, ep in enumerate(self.endpoints)]
        self._poller = zmq.Poller()
        if self._results is not None:
            self._poller.register(self._results, zmq.POLLIN)
        for s in self._controls:
            self._poller.register(s, zmq.POLLIN)
        self._pending: dict[Key, Message] = {}
        self._result_bytes: dict[Key, int] = {}
        self._last_seen = [time.monotonic()] * len(self.endpoints)
        self._next_ping = 0.0  # heartbeats go out once per interval, not once per wait (per token)
        self._reopened_at = [0.0] * len(self.endpoints)
        self._infos: list[dict] = []
        self._tokenizer = tokenizer
        self.last_stats: dict = {}
        self.epoch = 0
        self._closed = False
        try:
            self._infos = self._handshake()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ set-up -------------
    def _keys_per_stage(self) -> list[bytes] | None:
        """Each stage's CURVE public key, in pipeline order (None without keys)."""
        security = self.socket_config.security
        if security is None:
            return None
        keys = list(load_server_keys(self.config.server_key)) if self.config.server_key else [security.peer_key]
        if len(keys) == 1:
            keys = keys * len(self.endpoints)
        if len(keys) != len(self.endpoints):
            raise ConfigError(f"{len(keys)} stage public keys for {len(self.endpoints)} stages: give one key for all stages, or one per stage in order")
        return keys

    def _open_control(self, i: int, endpoint: str) -> zmq.Socket:
        s = make_socket(self.ctx, zmq.DEALER, self.socket_config)
        if self._stage_keys is not None:
            set_peer_key(s, self._stage_keys[i])
        s.setsockopt(zmq.ROUTING_ID, self._routing_id)  # the stage replies (and the last stage returns results) to this id
        self._watch.add(s, endpoint)  # handshake failures (wrong/missing key) surface as AuthError at connect
        s.connect(endpoint)
        return s

    def _handshake(self) -> list[dict]:
        deadline = time.monotonic() + self.config.connect_timeout_s
        infos: dict[int, dict] = {}
        next_try = 0.0
        while len(infos) < len(self._controls):
            if time.monotonic() >= next_try:  # a send before the TCP connection is up is dropped: retry
                for i in range(len(self._controls)):
                    if i not in infos:
                        self._send_control(i, Message(kind="info", req=f"info-{i}"))
                next_try = time.monotonic() + 0.2
            if time.monotonic() > deadline:
                missing = [f"stage {i} at {self.endpoints[i]}" for i in range(len(self.endpoints)) if i not in infos]
                raise StageUnavailable(f"no answer within {self.config.connect_timeout_s} s from {', '.join(missing)}; is serve-stage running there?")
            self._watch.check()
            for sock, _ in self._poller.poll(100):
                if sock is self._results:
                    continue
                i = self._controls.index(sock)
                msg = decode_message(sock.recv_multipart(copy=False), DEFAULT_LIMITS)
                if msg.kind == "info_reply":
                    infos[i] = dict(msg.meta)
                elif msg.kind == "error" and msg.meta.get("code") in ("auth", "protocol"):
                    # a refusal (wrong or missing keys, another protocol): no point in waiting
                    raise error_from_code(str(msg.meta.get("code")), f"stage {i} at {self.endpoints[i]} refused this client: {msg.meta.get('msg')}")
        self._watch.close()
        ordered = [infos[i] for i in range(len(self._controls))]
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
        return ordered

    @property
    def stages(self) -> list[dict]:
        """What each stage reported at connect: endpoint, pid, blocks, model, codec."""
        return list(self._infos)

    @property
    def kind(self) -> str:
        return self._infos[0]["kind"]

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

    # ------------------------------------------------------------------ transport ----------
    def _send_control(self, i: int, msg: Message) -> bool:
        try:
            self._controls[i].send_multipart(encode_message(msg), copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _run_local(self, req: str, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """What crosses the first cut for model inputs ``tensors``: the local stage's outputs,
        encoded with the local codec, and the ``meta`` entries the next stage needs to decode them."""
        t0 = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in tensors.items()}
        if getattr(self._local, "uses_kv_cache", False):
            out = self._local(arrays, request=req, pos=meta.get("pos"))
        else:
            out = self._local(arrays)
        codec_meta: dict[str, Any] = {}
        if self._local_codec is not None:
            out, codec_meta = self._local_codec.encode(out)
        self.local_ms += (time.perf_counter() - t0) * 1e3
        return out, codec_meta

    def _send_forward(self, req: str, seq: int, tensors: Mapping[str, Any], meta: dict) -> int:
        if self._local is not None:
            tensors, codec_meta = self._run_local(req, tensors, meta)  # only the cut leaves the device
            meta = {**meta, **codec_meta}
        meta = {"route": self.endpoints[1:], "reply_to": self.reply_to, **meta}
        if self._stage_keys is not None and len(self.endpoints) > 1:
            meta["route_keys"] = [k.decode() for k in self._stage_keys[1:]]  # each stage reaches the next with its key
        frames = encode_message(Message(kind="forward", req=req, seq=seq, epoch=self.epoch, tensors=tensors, meta=meta))
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            try:
                self._controls[0].send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return message_nbytes(frames)
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise StageUnavailable(f"stage 0 at {self.endpoints[0]} accepts no connection; is it running?") from None
                self._pump(50)  # keep heartbeats going while stage 0 is unreachable
                self._check_liveness()

    def _pump(self, timeout_ms: int) -> None:
        """Receive whatever arrived within ``timeout_ms``."""
        for sock, _ in self._poller.poll(timeout_ms):
            self._receive(sock)

    def _receive(self, sock: zmq.Socket) -> Message | None | object:
        """Take one message off ``sock`` (a control socket or the bound results socket) and
        :meth:`_store` it. Returns what ``_store`` does, or ``_DROPPED`` for a message that failed
        authentication (dropped; it says nothing about the stage)."""
        frames = sock.recv_multipart(copy=False)
        if sock is self._results:
            return self._store(frames[1:])
        self._last_seen[self._controls.index(sock)] = time.monotonic()
        msg = self._store(frames)
        if msg is not None and msg.kind == "ping":  # the stage asks who holds this connection before it sends a result
            try:
                sock.send_multipart(encode_message(Message(kind="pong", req=msg.req, seq=msg.seq)), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        return msg

    def _store(self, body: list) -> Message | None:
        """Decode a received message; keep results and errors for :meth:`_wait_any`."""
        try:
            msg = decode_message(body, DEFAULT_LIMITS)
        except (ProtocolError, AuthError):
            return None  # a malformed reply is dropped; the request then times out with a clear error
        if msg.kind in ("result", "error") and msg.req:
            self._pending.pop((msg.req, msg.seq), None)
            self._pending[(msg.req, msg.seq)] = msg
            while len(self._pending) > _MAX_PENDING:  # bounded: stale replies of abandoned requests go first
                old = next(iter(self._pending))
                del self._pending[old]
                self._result_bytes.pop(old, None)
            self._result_bytes[(msg.req, msg.seq)] = message_nbytes([getattr(f, "buffer", f) for f in body])
            if msg.kind == "result":
                for t in msg.meta.get("trace", []):
                    if isinstance(t, dict) and isinstance(t.get("stage"), int) and 0 <= t["stage"] < len(self._last_seen):
                        self._last_seen[t["stage"]] = time.monotonic()
        return msg

    def _check_liveness(self) -> None:
        """Raise StageUnavailable for a stage silent for a whole liveness window. Half-way, close
        and reopen its connection once (lazy pirate): libzmq never reconnects a link that failed
        with a protocol error (e.g. bytes injected on path), and a new connection also takes the
        routing id back from a half-open ghost of the old one."""
        now = time.monotonic()
        limit = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        for i, seen in enumerate(self._last_seen):
            if now - seen > limit / 2 and now - self._reopened_at[i] > limit:
                log.info("stage %d at %s silent for %.1f s: reopening the connection", i, self.endpoints[i], now - seen)
                self._reopen(i)
            if now - seen > limit:
                raise StageUnavailable(
                    f"stage {i} at {self.endpoints[i]} missed {self.config.heartbeat_liveness} heartbeats "
                    f"({now - seen:.1f} s silent); the process or its link is down"
                )

    def _wait_any(self, keys: set[Key], timeout_s: float | None = None) -> tuple[Key, Message]:
        """Wait for the first of ``keys`` to complete; raise its error if it failed."""
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + timeout_s
        self._last_seen = [max(s, start) for s in self._last_seen]
        reqs = {k[0] for k in keys}
        while True:
            for k in keys:
                if k in self._pending:
                    msg = self._pending.pop(k)
                    if msg.kind == "error":
                        # a failing chunk makes the stage drop the request, so the chunks after it fail
                        # with UnknownRequest: raise the first error of the request, which says why
                        first = min((e for e in self._pending if e[0] in reqs and self._pending[e].kind == "error" and e[1] < k[1]), default=None, key=lambda e: e[1])
                        if first is not None:
                            msg = self._pending.pop(first)
                        stage = msg.meta.get("stage")
                        where = f"stage {stage}: " if stage is not None else ""
                        raise error_from_code(str(msg.meta.get("code")), where + str(msg.meta.get("msg")))
                    return k, msg
            now = time.monotonic()
            if now >= deadline:
                silent = [i for i, s in enumerate(self._last_seen) if now - s > self.config.heartbeat_interval_s * 2]
                who = ", ".join(f"stage {i} at {self.endpoints[i]}" for i in silent) or "the pipeline"
                raise StageUnavailable(f"no result within {timeout_s:.1f} s from {who}")
            if now >= self._next_ping:
                for i in range(len(self._controls)):
                    self._send_control(i, Message(kind="ping", req="hb", meta={"t": now}))
                self._next_ping = now + self.config.heartbeat_interval_s
            self._pump(max(1, int(min(self._next_ping - now, deadline - now, 0.05) * 1000)))
            self._check_liveness()

    def _release(self, req: str) -> None:
        if self._local is not None and hasattr(self._local, "release"):
            self._local.release(req)
        for i in range(len(self._controls)):
            self._send_control(i, Message(kind="release", req=req))

    # ------------------------------------------------------------------ recovery -----------
    def _silent_stages(self) -> list[int]:
        """Stages that answer no ping within one liveness period."""
        wait_s = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        answered: set[int] = set()
        deadline = time.monotonic() + wait_s
        next_ping = 0.0
        while len(answered) < len(self._controls) and time.monotonic() < deadline:
            if time.monotonic() >= next_ping:
                for i in range(len(self._controls)):
                    if i not in answered:
                        self._send_control(i, Message(kind="ping", req="probe"))
                next_ping = time.monotonic() + min(0.2, wait_s / 3)
            for sock, _ in self._poller.poll(20):
                if self._receive(sock) is not _DROPPED and sock is not self._results:  # results still count
                    answered.add(self._controls.index(sock))
        return [i for i in range(len(self._controls)) if i not in answered]

    def _reopen(self, i: int) -> None:
        """A fresh connection to stage ``i`` (same endpoint, same routing id); its silence clock runs on."""
        seen = self._last_seen[i]
        self._replace_stage(i, self.endpoints[i])
        self._last_seen[i] = seen
        self._reopened_at[i] = time.monotonic()

    def _replace_stage(self, i: int, endpoint: str) -> None:
        old = self._controls[i]
        self._poller.unregister(old)
        old.close(linger=0)
        self._controls[i] = self._open_control(i, endpoint)
        self._poller.register(self._controls[i], zmq.POLLIN)
        self.endpoints[i] = endpoint
        self._last_seen[i] = time.monotonic()

    def _recover(self, cause: Exception) -> None:
        """Move every silent stage to a live process, or re-raise ``cause`` if that can't be done."""
        if self._recovery is None:
            raise cause
        t0 = time.perf_counter()
        dead = self._silent_stages()
        for i in dead:
            try:
                self._replace_stage(i, self._recovery(i))
            except Exception as e:  # the hook failed: report both
                raise StageUnavailable(f"stage {i} is down and could not be replaced: {e}") from cause
        self.epoch += 1  # messages of the old pipeline generation are ignored from here on
        self._infos = self._handshake()
        self.recoveries.append({"cause": str(cause)[:300], "replaced": dead, "epoch": self.epoch, "recover_ms": round((time.perf_counter() - t0) * 1e3, 1)})

    def _recover_for_replay(self, cause: StageUnavailable | UnknownRequest, recoveries: int) -> int:
        """Before a request is replayed from its log: re-raise ``cause`` when the replay budget is
        spent (or a stage is down and there is no recovery hook), else replace lost stages.
        Returns the new count of recoveries. (A stage that merely lost the request's cache,
        ``UnknownRequest``, needs no replacement: the replay alone rebuilds it.)"""
        if recoveries >= self.config.max_recoveries or (self._recovery is None and isinstance(cause, StageUnavailable)):
            raise cause
        if isinstance(cause, StageUnavailable):
            self._recover(cause)
        return recoveries + 1

    # ------------------------------------------------------------------ encoders / vision --
    def infer(self, inputs: Mapping[str, Any], *, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Run one batch through the pipeline and return the last stage's outputs.

        ``inputs`` holds model inputs (``input_ids``/``attention_mask``, ``pixel_values``, ``x``)
        as numpy arrays or torch tensors, or ``{"text": [...]}`` for models with a tokenizer.
        """
        inputs = dict(inputs)
        if "text" in inputs:
            texts = inputs.pop("text")
            texts, max_length = [texts] if isinstance(texts, str) else list(texts), int(inputs.pop("max_length", 256))
            numpy_flag = {"numpy": True} if _has_parameter(self.tokenizer, "numpy") else {}  # numpy: no torch needed here
            inputs.update(self.tokenizer(texts, max_length=max_length, **numpy_flag))
        t0 = time.perf_counter()
        local_before = self.local_ms
        for attempt in range(self.config.max_recoveries + 1):
            req = uuid.uuid4().hex[:16]
            sent = self._send_forward(req, 0, inputs, {"cache": False})
            try:
                key, msg = self._wait_any({(req, 0)}, timeout_s)
                break
            except StageUnavailable as e:
                if attempt == self.config.max_recoveries:
                    raise
                self._recover(e)  # a stateless request is simply sent again
        latency = (time.perf_counter() - t0) * 1e3
        self.last_stats = self._stats(msg, sent, self._result_bytes.pop(key, 0), latency)
        if self._local is not None:
            self.last_stats["local_ms"] = self.local_ms - local_before
        return {k: np.array(v) for k, v in msg.tensors.items()}

    def _stats(self, msg: Message, sent: int, received: int, latency_ms: float) -> dict:
        trace = list(msg.meta.get("trace", []))
        cut_bytes = [t["in_bytes"] for t in trace[1:]]
        return {
            "latency_ms": latency_ms,
            "client_to_stage0_bytes": sent,
            "cut_bytes": cut_bytes,
            "result_bytes": received,
            "wire_bytes": sent + sum(cut_bytes) + received,
            "trace": trace,
        }

    # ------------------------------------------------------------------ decoders -----------
    def _prompt_ids(self, prompt: str | Sequence[int] | Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        arr = np.asarray(prompt if not hasattr(prompt, "numpy") else prompt.numpy()).reshape(-1)
        return [int(x) for x in arr]

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
        _out: dict | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time (prefill in chunks, then one step per token).

        With ``draft`` (a :class:`~splitnet.edge.draft.DraftModel` on this device), each step
        sends the last token plus ``speculate_tokens`` draft proposals; the pipeline scores them
        in one pass and returns its greedy choice at every position; the longest agreeing prefix
        and the pipeline's next token are kept, and the stages drop the rest of their caches on
        the next step. The tokens are exactly those of greedy decoding without a draft.
        """
        if self.kind != "decoder":
            raise ConfigError(f"generate/stream need a decoder model; this pipeline serves a {self.kind}: use infer()")
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        sampling = sampling or SamplingConfig()
        if draft is not None and sampling.temperature != 0:
            raise ConfigError("speculative decoding with a draft model is greedy only (temperature 0) in this release")
        if draft is not None and speculate_tokens < 1:
            raise ConfigError("speculate_tokens must be >= 1")
        ids = self._prompt_ids(prompt)
        if not ids:
            raise ConfigError("the prompt is empty")
        limit = self._infos[0].get("max_positions") if self._infos else None
        if isinstance(limit, int) and len(ids) + max_new_tokens - 1 > limit:
            raise ConfigError(f"a prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the model's {limit} positions; "
                              f"shorten the prompt to at most {limit - max_new_tokens + 1} tokens or ask for fewer tokens")
        sampler = Sampler(sampling)
        head = head_request(sampling)
        t0 = time.perf_counter()
        stats = _out if _out is not None else {}
        stats["replays"] = []
        # the replay log: every token this request has fed the pipeline and kept, in order. A
        # stage that is replaced (or lost its cache) gets its KV cache rebuilt by feeding it again.
        fed: list[int] = []
        req = uuid.uuid4().hex[:16]
        seq = 0
        out: list[int] = []
        recoveries = 0
        spec = {"steps": 0, "round_trips": 0, "proposed": 0, "accepted": 0} if draft is not None else None

        def feed(tokens: list[int], extra: dict | None = None) -> int:
            """Send ``tokens`` (chunked) after what was kept; return the bytes sent."""
            nonlocal seq
            sent = 0
            chunk = self.config.prefill_chunk_tokens
            for s in range(0, len(tokens), chunk):
                piece = tokens[s : s + chunk]
                last = s + chunk >= len(tokens)
                meta = {"cache": True, "pos": len(fed), "want_result": last, "rewind": True, **head, **(extra or {})}
                sent += self._send_forward(req, seq, {"input_ids": np.asarray([piece], dtype=np.int64)}, meta)
                fed.extend(piece)
                seq += 1
            return sent

        pending = list(ids)  # tokens still to feed
        proposals: list[int] = []  # draft tokens sent after ``pending`` in this step
        sent = 0
        try:
            while len(out) < max_new_tokens:
                try:
                    if pending:
                        proposals = []
                        if spec is not None and out:  # decode step: speculate
                            proposals = draft.propose(ids + out, min(speculate_tokens, max_new_tokens - len(out) - 1))
                        sent = feed(pending + proposals, {"all_logits": True} if proposals else None)
                        pending = []
                    key, msg = self._wait_any({(req, seq - 1)}, timeout_s)
                except (StageUnavailable, UnknownRequest) as e:
                    t_r = time.perf_counter()
                    recoveries = self._recover_for_replay(e, recoveries)
                    self._release(req)
                    req, seq = uuid.uuid4().hex[:16], 0
                    fed.clear()
                    pending = list(ids) + out  # replay: rebuilds every stage's cache for this request
                    stats["replays"].append({"after_tokens": len(out), "replayed_tokens": len(pending), "cause": type(e).__name__, "recover_ms": round((time.perf_counter() - t_r) * 1e3, 1)})
                    continue
                received = self._result_bytes.pop(key, 0)
                if not out:
                    stats["ttft_ms"] = (time.perf_counter() - t0) * 1e3
                    stats["prefill"] = self._stats(msg, sent, received, stats["ttft_ms"])
                    stats["decode_wire_bytes"] = 0
                else:
                    stats["decode_wire_bytes"] += self._stats(msg, sent, received, 0)["wire_bytes"]
                stats["tokens_computed"] = [t.get("tokens_computed") for t in msg.meta.get("trace", [])]
                if out:
                    _add_stage_times(stats, msg)
                if proposals:
                    # position j of the reply is the pipeline's choice after pending + proposals[:j]
                    n_ok = 0
                    while n_ok < len(proposals) and sampler.pick(msg.tensors, n_ok) == proposals[n_ok]:
                        n_ok += 1
                    new = proposals[:n_ok] + [sampler.pick(msg.tensors, n_ok)]
                    del fed[len(fed) - (len(proposals) - n_ok):]  # rejected: the stages rewind on the next step
                    spec["steps"] += 1
                    spec["proposed"] += len(proposals)
                    spec["accepted"] += n_ok
                else:
                    new = [sampler.pick(msg.tensors)]
                if spec is not None and out:
                    spec["round_trips"] += 1  # decode steps, with or without proposals
                for tok in new:
                    out.append(tok)
                    yield tok
                    if len(out) == max_new_tokens or (stop_token is not None and tok == stop_token):
                        return
                pending = [out[-1]]
        finally:
            stats["latency_ms"] = (time.perf_counter() - t0) * 1e3
            if spec is not None:
                spec["acceptance"] = round(spec["accepted"] / spec["proposed"], 4) if spec["proposed"] else None
                spec["tokens_per_step"] = round((len(out) - 1) / spec["round_trips"], 3) if spec["round_trips"] else None
                stats["speculative"] = spec
            self._release(req)

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
        """Generate ``max_new_tokens`` tokens (greedy unless ``sampling`` says otherwise; with a
        ``draft`` model, speculatively: see :meth:`stream`)."""
        stats: dict = {}
        ids = self._prompt_ids(prompt)
        tokens = list(self.stream(ids, max_new_tokens, sampling=sampling, stop_token=stop_token, timeout_s=timeout_s,
                                  draft=draft, speculate_tokens=speculate_tokens, _out=stats))
        text = None
        if self._tokenizer is not None or isinstance(prompt, str):
            text = self.tokenizer.decode(tokens)
        self.last_stats = stats
        return GenerationResult(ids, tokens, text, stats.get("latency_ms", 0.0), stats.get("ttft_ms", 0.0), stats)

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 32,
        *,
        sampling: SamplingConfig | None = None,
        timeout_s: float | None = None,
        on_token: Callable[[int, int], None] | None = None,
        _out: dict | None = None,
    ) -> list[list[int]]:
        """Greedy/sampled generation for many prompts at once: while stage i runs a step of one
        sequence, stage i+1 runs a step of another (decode pipelined across sequences).

        ``on_token(index, token)`` is called as each token arrives (``index`` into ``prompts``).
        With a recovery hook, a stage lost mid-way is replaced and every unfinished sequence is
        replayed from its own log (prompt + tokens so far), as :meth:`stream` does: the tokens
        equal those of a run without faults, and none is produced twice.
        """
        if self.kind != "decoder":
            raise ConfigError(f"generate_many needs a decoder model; this pipeline serves a {self.kind}: use infer()")
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        seqs: list[_Sequence] = []
        for i, p in enumerate(prompts):
            ids = self._prompt_ids(p)
            if not ids:
                raise ConfigError(f"prompt {i} is empty")
            seqs.append(_Sequence(i, ids, Sampler(sampling or SamplingConfig())))
        stats = _out if _out is not None else {}
        stats["replays"] = []
        waiting: dict[Key, _Sequence] = {}
        chunk = self.config.prefill_chunk_tokens
        head = head_request(sampling or SamplingConfig())

        def feed(s: _Sequence, tokens: list[int]) -> None:
            """Send ``tokens`` after what sequence ``s`` has fed (chunked); await the last chunk."""
            for k in range(0, len(tokens), chunk):
                piece = np.asarray([tokens[k : k + chunk]], dtype=np.int64)
                self._send_forward(s.req, s.seq, {"input_ids": piece}, {"cache": True, "pos": s.pos + k, "want_result": k + chunk >= len(tokens), **head})
                s.seq += 1
            s.pos += len(tokens)
            waiting[(s.req, s.seq - 1)] = s

        def restart(s: _Sequence) -> None:
            """A new request for ``s`` fed with its whole log: every stage's cache is rebuilt."""
            s.req, s.seq, s.pos = uuid.uuid4().hex[:16], 0, 0
            feed(s, s.log())

        recoveries = 0
        try:
            for s in seqs:
                restart(s)
            while waiting:
                try:
                    key, msg = self._wait_any(set(waiting), timeout_s)
                except (StageUnavailable, UnknownRequest) as e:
                    t_r = time.perf_counter()
                    recoveries = self._recover_for_replay(e, recoveries)
                    live = list(waiting.values())
                    waiting.clear()
                    for s in live:
                        self._release(s.req)
                        restart(s)
                    stats["replays"].append({"sequences": len(live), "replayed_tokens": sum(len(s.log()) for s in live),
                                             "cause": type(e).__name__, "recover_ms": round((time.perf_counter() - t_r) * 1e3, 1)})
                    continue
                self._result_bytes.pop(key, None)
                s = waiting.pop(key)
                tok = s.sampler.pick(msg.tensors)
                s.out.append(tok)
                stats["tokens_computed"] = [t.get("tokens_computed") for t in msg.meta.get("trace", [])]
                if on_token is not None:
                    on_token(s.index, tok)
                if len(s.out) < max_new_tokens:
                    feed(s, [tok])
        finally:
            for s in seqs:
                if s.req:
                    self._release(s.req)
        return [s.out for s in seqs]

    # ------------------------------------------------------------------ lifecycle ----------
    def ping(self, timeout_s: float = 2.0) -> list[float]:
        """Round-trip time (ms) of a ping to every stage; raises StageUnavailable for a silent one."""
        rtts = []
        for i, s in enumerate(self._controls):
            t0 = time.perf_counter()
            if not self._send_control(i, Message(kind="ping", req=f"p{i}")):
                raise StageUnavailable(f"stage {i} at {self.endpoints[i]} is not connected")
            deadline = t0 + timeout_s
            while True:  # results may share this connection: keep them, wait for the pong
                left = deadline - time.perf_counter()
                if left <= 0 or not s.poll(max(1, int(left * 1000))):
                    raise StageUnavailable(f"stage {i} at {self.endpoints[i]} did not answer a ping within {timeout_s} s")
                msg = self._receive(s)
                if isinstance(msg, Message) and msg.kind == "pong":
                    break
            rtts.append((time.perf_counter() - t0) * 1e3)
        return rtts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._controls:
            s.close(linger=0)
        self._watch.close()
        if self._results is not None:
            self._results.close(linger=0)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _add_stage_times(stats: dict, msg: Message) -> None:
    """Sum, per stage, the times a decode step's trace reports (``stats["decode_stage_ms"]``)."""
    per = stats.setdefault("decode_stage_ms", {})
    for t in msg.meta.get("trace", []):
        if not isinstance(t, dict) or not isinstance(t.get("stage"), int):
            continue
        acc = per.setdefault(t["stage"], {"steps": 0, "queue_ms": 0.0, "decode_ms": 0.0, "compute_ms": 0.0, "encode_ms": 0.0})
        acc["steps"] += 1
        for k in ("queue_ms", "decode_ms", "compute_ms", "encode_ms"):
            if isinstance(t.get(k), (int, float)):
                acc[k] += float(t[k])


def connect(stages: Sequence[str] | str | Path | Any, *, config: ClientConfig | None = None, timeout_s: float | None = None, **kwargs: Any) -> Session:
    """Open a :class:`Session` over stage endpoints (listed in order) or a plan file.

    Args:
        stages: ``["tcp://host:port", ...]`` or a plan (YAML/JSON path or object) whose stages
            carry endpoints.
        config: timeouts and heartbeat settings; ``timeout_s`` is a shortcut for its request timeout.
    """
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
    config = config or ClientConfig()
    if timeout_s is not None:
        from dataclasses import replace

        config = replace(config, timeout_s=timeout_s)
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
