"""The stage worker: one process serving one stage of a model over ZeroMQ.

Threads and sockets (a socket belongs to one thread):

- the I/O thread owns the bound ROUTER. It answers ``ping``/``info`` at once (so heartbeats
  flow while a long forward runs), validates every message before use, answers malformed
  ones with a typed error, and queues ``forward``/``release`` work for the compute thread;
- the compute thread owns the KV caches and one DEALER per downstream peer. It runs the stage
  and sends the outputs to the next stage in the message's ``route`` or, at the end of the
  route, to the client's ``reply_to`` endpoint. Errors during compute go to ``reply_to`` too.

Forward messages carry in ``meta``: ``route`` (endpoints still to visit after this stage),
``route_keys`` (their CURVE public keys), ``reply_to`` (the client's result endpoint),
``cache`` (keep a KV cache for ``req``), ``want_result`` (the client needs this step's output),
``all_logits`` and ``trace`` (per-stage timings appended by each stage).

Batch messages (:mod:`splitnet.wire.batches`): a ``forward_batch`` is split by the I/O thread into
one work item per member (each checked and owned as a forward of its own) and queued whole; what
leaves a forward goes on as one ``forward_batch`` per next hop and one ``result_batch`` per
client, where the members' headers say every later hop takes them (``batch_messages``).

Who a request belongs to (its *origin*) is the CURVE public key that authenticated it: the
sender's own, or, when the sender is a trusted upstream stage (``--stage-keys-dir``, or this
stage's own key), the ``meta.origin`` that stage vouches for. KV caches are kept per (origin,
request id); route keys apply to the one request that carried them; results go only to the origin:
to a result socket that must authenticate as that key, or over the origin's own connection
(:mod:`splitnet.runtime.peer_replies`). Any exception while handling a message is answered as a
typed error and the stage keeps serving.
"""

from __future__ import annotations

import logging
import os
import dataclasses
import queue
import re
from collections import deque
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import zmq

from splitnet.errors import AuthError, LimitExceeded, ProtocolError, SplitnetError, StageError, StaleEpoch, UnknownRequest
from splitnet.model import KVCache, load_model
from splitnet.runtime.batching import BatchLimits, Member, StepOptions, StepRhythms, pick_group, signature, take_round
from splitnet.runtime.config import StageWorkerConfig
from splitnet.runtime.cut_codec import COMPACT_VERSION, CutCodecs
from splitnet.runtime.metrics import StageIdentity, stage_metrics
from splitnet.wire import (
    DEFAULT_LIMITS,
    Message,
    SocketConfig,
    WireLimits,
    decode_message,
    encode_message,
    error_message,
    make_socket,
    message_nbytes,
)
from splitnet.runtime.peer_replies import DELIVER, HOLD, PeerReplies
from splitnet.runtime.request_ledger import RequestLedger
from splitnet.runtime.sent_log import SentLog
from splitnet.wire.hop_digest import hop_digest
from splitnet.wire.batches import batch_message, member_shares, split_batch
from splitnet.wire.headers import FILL_CHUNK_TOKENS, MAX_BATCH_MEMBERS, BatchMember, ForwardHeader, SiblingHeaders, batch_member, refill_run
from splitnet.wire.limits import limits_for_input
from splitnet.wire.security import set_peer_key
from splitnet.wire.sockets import frame_user_id, recv_bounded

log = logging.getLogger("splitnet.worker")

#: ``meta.reply_to`` of a client that takes results over its own connection to each stage (no
#: inbound port, so it works behind NAT): "peer:" + the routing id its sockets connect with
PEER_REPLY_PREFIX = "peer:"

_POLL_MS = 100
_MAX_PEERS = 64  # downstream sockets (next stages, client result endpoints) kept open at once
#: SPLITNET_TRACE_CLOCK=1: each trace entry also carries ``clock_s`` = [received, sent on] in this
#: host's CLOCK_MONOTONIC (benchmarks/decode_hop_budget.py times the hops between processes with it).
#: Read when the worker starts, not at import (a stage forked from a preloaded server imported this
#: module before its environment was set).
TRACE_CLOCK_ENV = "SPLITNET_TRACE_CLOCK"
_BAN_S = 10.0  # after a send times out, sends to that endpoint fail at once for this long
_GONE_WAIT_MS = 250  # a peer that took messages before and cannot take one for this long has lost its connection
_ACTIVE_S = 1.0  # a request that ran a step here within this long is expected to send its next one
#: What a CUDA stage runs once before READY (:meth:`StageWorker._warm_up_shapes`): prompt chunks
#: and refills of these many tokens (a refill message carries up to FILL_CHUNK_TOKENS), and the
#: decode graphs of these batch sizes and context lengths (each rounded up to its graph bucket).
WARM_CHUNK_TOKENS = (16, 64, 256, FILL_CHUNK_TOKENS)
WARM_GRAPH_BATCHES = (1, 2, 4)
WARM_GRAPH_POSITIONS = (128, 256, 512)
WARM_POOL_ROWS = 16  # cache slots reserved before the graphs are captured (the pool's limits permitting)
_Z85_KEY = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


#: header fields a stage does not pass on as they came: it writes its own (route, trace, origin, codec fields) or none
_NOT_PASSED_ON = frozenset({"route", "route_keys", "reply_key", "origin", "trace", "codecs", "cc", "packed_tokens", "mask_len", "upstream_batch"})
#: what a refill's fill-only forwards do not carry of the step they precede
_NOT_IN_FILL = frozenset({"resume_from", "refill", "rewind", "final", "all_logits", "want_result", "pos"})


def cache_key(origin: str, req: str) -> str:
    """KV caches are per (authenticated origin, request id): one client cannot reach another's."""
    return f"{origin}/{req}" if origin else req


@dataclass
class _Leaving:
    """One member's output on its way out of a forward: to the next stage of its route, or to its client."""

    member: Member
    index: int  # its place in the batch (row order of the batch's host tensors)
    whole: "_Whole | None"  # the batch's outputs in host memory (None: the forward sent nothing back)
    next_meta: dict  # the header fields it carries on (trace, route, codec fields added when sent)
    route: list
    route_keys: list
    tokens_computed: int | None

    @property
    def outputs(self) -> dict:
        """Its rows of the batch's outputs, in host memory (views, made when first asked for:
        a batch sent on whole as one message never splits them)."""
        return self.whole.rows(self.index) if self.whole is not None else {}


def _oldest_is_chunk(backlog: deque) -> bool:
    """Whether the oldest forward waiting is a chunk of several prompt tokens (a prefill or a
    replay: its request's later chunks are queued behind it already, and a round is built
    around the oldest member, so one-token decode steps of other requests would not join it)."""
    for w in backlog:
        if w.msg.kind == "forward":
            ids = w.msg.tensors.get("input_ids") if w.batch is None else None
            return ids is not None and ids.ndim == 2 and ids.shape[1] > 1
    return False


class _Whole:
    """A forward's outputs for all its members in host memory: rows concatenated in member order;
    or, for a ragged batch (members of different lengths, :attr:`ragged`), one dict per member
    (``members``), which a batch message cannot carry: each member is then sent alone."""

    def __init__(self, host: dict, shared: frozenset, sizes: list, members: "list[dict] | None" = None):
        self.host = host
        self.shared = shared  # tensors every member gets whole (not one row block each)
        self.sizes = sizes  # rows per member
        self.members = members
        self._parts: dict | None = None

    @property
    def ragged(self) -> bool:
        return self.members is not None

    def rows(self, index: int) -> dict:
        """Member ``index``'s outputs: its rows of each tensor (the shared ones whole)."""
        if self.members is not None:
            return self.members[index]
        if self._parts is None:
            self._parts = {k: torch.split(v, self.sizes) for k, v in self.host.items() if k not in self.shared}
        return {k: (v if k in self.shared else self._parts[k][index]) for k, v in self.host.items()}


@dataclass
class _Work:
    msg: Message
    wire_bytes: int
    received_at: float
    origin: str = ""  # the authenticated client this request belongs to ("" without keys)
    prepared: Member | None = None  # decoded and checked in an earlier round that did not run it
    started_at: float = 0.0
    decode_ms: float = 0.0
    batch: "tuple[_BatchInputs, int] | None" = None  # split off a forward_batch: its tensors, and this member's place in it
    decoded: dict | None = None  # its inputs, decoded already (looked at to be merged into an earlier chunk, and not)
    seen: "_Progress | None" = None  # the compute thread's progress when it was queued
    ahead: "_Progress | None" = None  # what the compute thread did between then and its start


@dataclass(frozen=True)
class _Progress:
    """The compute thread's cumulative work: rounds run, and seconds computing, waiting for a
    batch's stragglers and sending. The difference of two readings says where an item's time in
    the queue went (the trace's ``ahead_*`` fields)."""

    rounds: int = 0
    busy_s: float = 0.0
    wait_s: float = 0.0
    send_s: float = 0.0

    def __sub__(self, other: "_Progress") -> "_Progress":
        return _Progress(self.rounds - other.rounds, self.busy_s - other.busy_s, self.wait_s - other.wait_s, self.send_s - other.send_s)


class _BatchInputs:
    """The tensors of one ``forward_batch``, decoded and moved to the stage's device once, on
    the compute thread, for all its members: each member's inputs are its rows (views, made
    for all members in one split per tensor)."""

    def __init__(self, msg: Message, meta: Any, shared: frozenset, sizes: list[int]):
        self.msg, self.meta, self.shared, self.sizes = msg, meta, shared, sizes
        self.inputs: dict | None = None
        self._parts: dict = {}
        self._signatures: dict = {}  # (rows, cached, options) -> signature: equal for members of equal rows

    def rows(self, worker: "StageWorker", index: int) -> dict:
        if self.inputs is None:
            self.inputs = worker._inputs_of(worker.codecs.decode(self.msg.tensors, self.meta), self.msg.dtypes)
            self._parts = {k: torch.split(v, self.sizes) for k, v in self.inputs.items() if k not in self.shared}
        return {k: (v if k in self.shared else self._parts[k][index]) for k, v in self.inputs.items()}

    def signature(self, index: int, inputs: dict, cached: bool, options: StepOptions) -> tuple:
        key = (self.sizes[index], cached, options)
        sig = self._signatures.get(key)
        if sig is None:
            sig = self._signatures[key] = signature(inputs, cached, options)
        return sig


class _CacheTable:
    """KV caches by request id with count, memory and idle-time limits."""

    def __init__(self, max_requests: int, max_bytes: int, ttl_s: float, max_request_bytes: int | None = None, new_cache=KVCache,
                 sent_log_bytes: int = 0):
        self.sent = SentLog(sent_log_bytes)  # what each request's forwards sent on: a lost next stage is refilled from it
        self.new_cache = new_cache  # the stage's own cache type (transformers' DynamicCache for HF families)
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.max_request_bytes = max_request_bytes or max_bytes
        self.ttl_s = ttl_s
        self.caches: dict[str, KVCache] = {}
        self.last_used: dict[str, float] = {}

    def get(self, req: str, create: bool) -> KVCache:
        self.evict_idle()
        cache = self.caches.get(req)
        if cache is None:
            if not create:
                raise UnknownRequest(f"request {req!r} has no KV cache on this stage (expired or never prefilled)")
            if len(self.caches) >= self.max_requests:
                raise LimitExceeded(f"stage holds {len(self.caches)} request caches, the limit is {self.max_requests}; release finished requests")
            cache = self.caches[req] = self.new_cache()
        self.last_used.pop(req, None)
        self.last_used[req] = time.monotonic()  # kept in order of last use: eviction stops at the first live entry
        return cache

    def check_memory(self, req: str, total: int | None = None) -> None:
        """Raise LimitExceeded (and drop ``req``) when it, or all caches together (``total``,
        summed here when not given: a batch sums once for all its members), are over the limits."""
        own = self.caches[req].nbytes if req in self.caches else 0
        if own > self.max_request_bytes:
            self.drop(req)
            raise LimitExceeded(f"request {req!r} holds {own} bytes of KV cache, over the per-request limit of {self.max_request_bytes}; it was dropped")
        total = self.total_bytes() if total is None else total
        if total > self.max_bytes:
            self.drop(req)
            raise LimitExceeded(f"KV caches use {total} bytes, over this stage's limit of {self.max_bytes}; request {req!r} dropped")

    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches.values())

    def drop(self, req: str) -> None:
        cache = self.caches.pop(req, None)
        self.last_used.pop(req, None)
        self.sent.drop(req)
        if cache is not None:
            cache.close()

    def rename(self, old: str, new: str) -> bool:
        """``old``'s cache (and log) is ``new``'s now: a request resumed under a new id. False
        when there is no ``old`` (or ``new`` exists already)."""
        if old not in self.caches or new in self.caches:
            return False
        self.caches[new] = self.caches.pop(old)
        self.last_used.pop(old, None)
        self.last_used[new] = time.monotonic()
        self.sent.rename(old, new)
        return True

    def evict_idle(self) -> None:
        """Drop the caches idle past ``ttl_s``: the oldest first, stopping at the first that is
        not (O(evicted), not O(caches): it runs on every cache lookup of a batch)."""
        now = time.monotonic()
        while self.last_used:
            req, t = next(iter(self.last_used.items()))
            if now - t <= self.ttl_s:
                return
            self.drop(req)


class StageWorker:
    """Serve ``config``'s stage until :meth:`stop` (or SIGTERM/SIGINT in :func:`serve_forever`)."""

    def __init__(self, config: StageWorkerConfig, *, socket_config: SocketConfig | None = None, limits: WireLimits | None = None, max_request_cache_bytes: int | None = None):
        self.config = config
        self._started_s = time.monotonic()  # its pongs report the uptime: a client dates a restart in place by it
        self._trace_clock = os.environ.get(TRACE_CLOCK_ENV) == "1"
        # the largest input this stage takes bounds every tensor and (as ZMQ_MAXMSGSIZE) every frame
        self.limits = limits or limits_for_input(config.max_input_bytes, DEFAULT_LIMITS)
        self.socket_config = socket_config or SocketConfig(send_timeout_ms=config.send_timeout_ms)
        frame_cap = max(self.limits.max_header_bytes, self.limits.max_tensor_bytes)
        if self.socket_config.max_message_bytes > frame_cap:
            self.socket_config = dataclasses.replace(self.socket_config, max_message_bytes=frame_cap)
        security = self.socket_config.security
        self._stage_keys = security.stage_list() if security is not None and hasattr(security, "stage_list") else None
        if config.cpus:
            os.sched_setaffinity(0, config.cpus)  # this process and the threads it starts from now on
        if config.torch_threads or config.cpus:
            torch.set_num_threads(config.torch_threads or len(config.cpus))
        # the metrics port is bound before the model loads: a taken port fails at once
        self.metrics = stage_metrics(StageIdentity(config.stage_index, config.model, config.start_block, config.end_block), config.bind, config.metrics_port)
        bm = load_model(config.model, blocks=range(config.start_block, config.end_block))
        self.model_name = config.model
        self.fingerprint = bm.fingerprint()
        self.kind = bm.kind
        self.num_blocks = bm.num_blocks
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.stage = bm.stage(config.start_block, config.end_block).to(self.device, self.dtype)
        self.codecs = CutCodecs(config.codec_out, config.codec_files, max_contexts=max(4096, 4 * config.max_requests))  # + compact-form contexts
        self.batch_limits = BatchLimits(config.max_batch_size, config.max_batch_tokens, config.max_padding)
        self._rhythms = StepRhythms(active_s=_ACTIVE_S)  # when each request's next step is due (see _await_stragglers)
        self.ledger = RequestLedger(max(4096, 4 * config.max_requests))  # newest epoch and cancelled steps per request (compute thread)
        self._compute_tick = time.monotonic()  # when the compute thread last finished a round or found nothing to do
        self._send_since = 0.0  # when the compute thread's send in progress began (0: none): a bounded wait, not a stall
        self._send_to = ""  # that send's target, a forward's: hop_digest(endpoint, key) ("": a reply, or none)
        self._last_forward_s = 0.0
        self._round_captures = 0  # decode graphs the last forward captured (a trace field when not 0)
        self._progress = _Progress()  # replaced (never mutated) by the compute thread; read by the I/O thread
        self._batch_id = 0  # numbers this stage's forwards (meta.upstream_batch of what it sends on)
        # decoder stages keep every request's KV cache in one slot pool, so steps of many requests batch
        self.pool = self.stage.cache_pool(config.max_requests, config.max_cache_bytes) if self.stage.arch.uses_kv_cache else None
        self.caches = _CacheTable(config.max_requests, config.max_cache_bytes, config.cache_ttl_s, max_request_cache_bytes,
                                  new_cache=self.pool.acquire if self.pool is not None else getattr(self.stage, "new_cache", KVCache),
                                  sent_log_bytes=config.sent_log_bytes if not self.stage.is_last else 0)
        if self.pool is not None and self.device.type == "cuda" and config.cuda_graphs and hasattr(self.stage, "enable_cuda_graphs"):
            self.stage.enable_cuda_graphs(self.pool, config.max_batch_size)
        if config.warm_up:
            self._warm_up()
        self._banned: dict[tuple[str, bytes | None], float] = {}  # (endpoint, key) -> monotonic time until which sends fail fast
        self._peers_up: set[tuple[str, bytes | None]] = set()  # (endpoint, key) that took a message (a later send finds it gone fast)
        self.ctx = zmq.Context.instance()
        # a list: one batch message's members; bounded by members (_enqueue), not by entries, so a
        # batch of 256 counts as 256 steps waiting
        self.work: queue.Queue[_Work | list[_Work] | None] = queue.Queue()
        self._queued_members = 0
        self._queued_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.endpoint = ""
        self.stats = {"forwards": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0, "replies_refused": 0,
                      "busy_s": 0.0, "batches": 0, "batched_requests": 0, "max_batch": 0, "cancelled_steps": 0,
                      "batch_messages_in": 0, "batch_messages_out": 0, "merged_chunks": 0,
                      "ragged_batches": 0, "resumed": 0, "refills": 0, "refill_tokens": 0, "graph_captures": 0}
        self.peer_replies = PeerReplies(hold_s=max(1.0, config.send_timeout_ms / 1000))
        # replies to a client over its own connection ("peer:" reply_to) leave through the ROUTER,
        # which belongs to the I/O thread: the compute thread hands them over on this inproc pipe
        self._replies_endpoint = f"inproc://splitnet-replies-{id(self):x}"

    def _warm_up(self) -> None:
        """Dummy forwards through scratch cache slots before READY: a prompt chunk, then a
        batched one-token step of two requests. A fresh process's first forward costs tens of
        milliseconds more than the next (82 ms against 1.5 ms for a tiny-gpt2 block on a CPU),
        and the first request a replacement stage serves is a replay someone waits for. Decoder
        stages with a cache pool only: other stages have no input shape known before a request."""
        if self.pool is None or self.config.max_requests < 2:
            return
        first = self.stage.is_first
        hidden = self.stage.arch.hidden_size if not first else 0

        def inputs(tokens: int) -> dict:
            if first:
                return {"input_ids": torch.zeros(1, tokens, dtype=torch.long)}
            return {"hidden": torch.zeros(1, tokens, hidden, dtype=self.dtype, device=self.device)}

        slots = [self.pool.acquire(), self.pool.acquire()]
        try:
            self.stage.forward_batch([inputs(8)], slots[:1])  # no_grad inside, as every real forward
            self.stage.forward_batch([inputs(8)], slots[1:])
            self.stage.forward_batch([inputs(1), inputs(1)], slots)
            if self.device.type == "cuda":
                self._warm_up_shapes(inputs, slots)  # on a CPU the ladder costs seconds at real sizes and saved nothing measurable
                torch.cuda.synchronize(self.device)
        finally:
            for c in slots:
                c.close()

    def _warm_up_shapes(self, inputs: Callable[[int], dict], slots: list) -> None:
        """On CUDA, the shapes a replacement's first requests bring, before READY: prompt chunks
        and refills of :data:`WARM_CHUNK_TOKENS` tokens (alone, and beside a shorter one as a
        ragged pair), and the decode graphs of :data:`WARM_GRAPH_BATCHES` x
        :data:`WARM_GRAPH_POSITIONS` over a cache pool of :data:`WARM_POOL_ROWS` slots. A CUDA
        process pays each new shape's first forward (kernels loaded on first use, a graph
        captured per batch and length bucket, captured again when the pool grows: 20-60 ms a
        stage at real sizes, ``benchmarks/warm_up_probe.py``), and the first work of a warm
        standby is a resume that several requests wait for. Stops at the stage's limits (batch
        tokens, positions, cache bytes)."""
        for n in WARM_CHUNK_TOKENS:
            if n > self.config.max_batch_tokens:
                break
            try:
                for pair in (slots[:1], slots):
                    for c in slots:
                        c.truncate(0)
                    self.stage.forward_batch([inputs(n), inputs(max(1, n // 2))][: len(pair)], pair)
            except (LimitExceeded, StageError) as e:
                log.debug("stage %d: warm-up stops at %d-token chunks (%s)", self.config.stage_index, n, e)
                break
        for c in slots:
            c.truncate(0)
        graphs = self.stage.__dict__.get("_graphs")
        if graphs is None:
            return
        try:  # rows for several requests now: a pool that grows later moves its tensors, and the graphs are captured again
            self.pool.reserve(rows=min(self.pool.max_slots, WARM_POOL_ROWS), positions=0)
        except LimitExceeded as e:
            log.debug("stage %d: cache pool not grown before READY (%s)", self.config.stage_index, e)
        like = next(iter(inputs(1).values())).to(self.device)  # a first stage's ids live on the host
        try:
            graphs.prepare([b for b in WARM_GRAPH_BATCHES if b <= self.config.max_batch_size], list(WARM_GRAPH_POSITIONS), like)
        except (LimitExceeded, StageError) as e:
            log.debug("stage %d: decode graphs not all captured before READY (%s)", self.config.stage_index, e)

    # ---------------------------------------------------------------- I/O thread -----------
    def run(self) -> None:
        router = make_socket(self.ctx, zmq.ROUTER, self.socket_config, server=True)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)  # replies to vanished peers are dropped, not raised
        # a client reconnecting (new network, NAT rebinding) takes its routing id back from its own
        # half-open ghost connection instead of being locked out; who may then receive results is
        # decided by the authenticated key, not the id (peer_replies)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH) if self.socket_config.security is not None else None
        replies = self.ctx.socket(zmq.PULL)
        replies.bind(self._replies_endpoint)
        compute = threading.Thread(target=self._compute_loop, name="splitnet-compute", daemon=True)
        max_frames = 2 + self.limits.max_tensors  # routing id + header + tensor frames
        try:
            self.endpoint = _bind(router, self.config.bind)
            compute.start()
            self.metrics.bind_worker(self)
            self._announce_ready()
            poller = zmq.Poller()
            poller.register(router, zmq.POLLIN)
            poller.register(replies, zmq.POLLIN)
            if monitor is not None:
                poller.register(monitor, zmq.POLLIN)
            while not self.stop_event.is_set():
                if self.config.parent_pid and not _alive(self.config.parent_pid):
                    log.warning("parent process %d is gone; stage %d exits", self.config.parent_pid, self.config.stage_index)
                    break
                ready = dict(poller.poll(_POLL_MS))
                self.metrics.tick()
                self._note_disconnects(monitor)
                if self.peer_replies.expire():
                    log.warning("results for a client whose connection could not be confirmed were dropped")
                if not ready:
                    continue
                if replies in ready:
                    self._relay_replies(router, replies, monitor)
                if router not in ready:
                    continue
                frames, dropped = recv_bounded(router, max_frames)
                try:
                    self._handle(router, frames, dropped)
                except Exception as e:  # never let one message end the I/O thread
                    self.stats["errors"] += 1
                    log.exception("stage %d failed handling a message", self.config.stage_index)
                    try:
                        self._refuse(router, frames[0].bytes, StageError(f"stage {self.config.stage_index} could not handle the message: {type(e).__name__}"))
                    except Exception:  # noqa: BLE001 - the reply is best effort
                        pass
        finally:
            self.stop_event.set()
            try:
                self.work.put_nowait(None)
            except queue.Full:
                pass
            if compute.is_alive():
                compute.join(timeout=10)  # let an in-flight forward finish before the process exits
            if monitor is not None:
                router.disable_monitor()
                monitor.close(linger=0)
            router.close(linger=0)
            replies.close(linger=0)
            self.metrics.close()

    def _note_disconnects(self, monitor: zmq.Socket | None) -> None:
        """Drain the ROUTER's monitor: a disconnect anywhere unconfirms every routing id's holder."""
        if monitor is None:
            return
        changed = False
        while True:
            try:
                event = monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if self.metrics.handshake_refused(event):
                continue  # a refused handshake (counted) changes no connection
            changed = True
        if changed:
            self.peer_replies.connections_changed()

    def _relay_replies(self, router: zmq.Socket, replies: zmq.Socket, monitor: zmq.Socket | None) -> None:
        """Send what the compute thread queued for clients reached over their own connection:
        [routing id, origin key, *message frames], delivered only to a connection authenticated
        as the origin (held while that is unproven, refused when another key holds the id)."""
        for _ in range(64):  # bounded: the ROUTER's requests get their turn
            try:
                frames = replies.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._note_disconnects(monitor)  # a connection that just dropped must not get this
            rid, origin, body = frames[0].bytes, frames[1].bytes.decode("ascii", "replace"), frames[2:]
            verdict = self.peer_replies.decide(rid, origin)
            if verdict == DELIVER:
                self._send_router(router, [rid, *body])
            elif verdict == HOLD:
                if self.peer_replies.hold(rid, origin, body):
                    self._reply(router, rid, Message(kind="ping", req="confirm", meta={"t": time.time()}))  # prove who holds the id
                else:
                    self.stats["replies_refused"] += 1
            else:
                self.stats["replies_refused"] += 1
                log.warning("a result for one client was not sent to routing id %r: another key holds it", rid[:40])

    def _send_router(self, router: zmq.Socket, frames: list) -> None:
        try:
            router.send_multipart(frames, copy=False)
        except zmq.Again:
            log.warning("reply to a slow client dropped")

    def stop(self) -> None:
        self.stop_event.set()

    def _announce_ready(self) -> None:
        info = self.info()
        if not self.config.ready_endpoint:
            print(f"READY {self.endpoint} pid={os.getpid()} blocks={self.config.start_block}:{self.config.end_block}", flush=True)
            return
        s = make_socket(self.ctx, zmq.DEALER, SocketConfig(send_timeout_ms=self.socket_config.send_timeout_ms))  # the local launcher's socket is plaintext
        s.setsockopt(zmq.IMMEDIATE, 0)
        try:
            s.connect(self.config.ready_endpoint)
            s.send_multipart(encode_message(Message(kind="info_reply", meta={"ready": True, **info})))
        finally:
            s.close(linger=2000)

    def info(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "stage_index": self.config.stage_index,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "blocks": [self.config.start_block, self.config.end_block],
            "num_blocks": self.num_blocks,
            "max_positions": getattr(getattr(self.stage.arch, "hf", None), "max_position_embeddings", None),
            "codec_out": self.codecs.out.name if self.codecs.out is not None else "raw",
            "codec_hash": self.codecs.out.codebook_hash if self.codecs.out is not None else "",
            "compact_codes": COMPACT_VERSION,  # decodes a cached request's later steps sent as meta.cc (splitnet.codecs.framing)
            "cached_requests": len(self.caches.caches),
            "stats": dict(self.stats),
            "queue_depth": self._queued_members,
            "metrics_url": self.metrics.url,
            "batch_messages": True,  # takes forward_batch (and sends batches on where each member's header allows)
            "resume": 1,  # takes meta.resume_from and meta.refill (a recovery resumes requests where caches survived)
        }

    def progress(self) -> dict[str, Any]:
        """What a heartbeat reports of the work, so liveness sees a stuck compute thread and not
        only an answering I/O thread: forwards done, steps queued, and how long ago the compute
        thread last finished a round or found nothing to do (grows while it is stuck, or while
        one forward runs long)."""
        now, since = time.monotonic(), self._send_since
        return {"forwards": self.stats["forwards"], "batches": self.stats["batches"], "queued": self._queued_members,
                "compute_tick_age_s": round(now - self._compute_tick, 3),
                "send_wait_s": round(now - since, 3) if since else 0.0, "send_timeout_s": self.socket_config.send_timeout_ms / 1000,
                "send_to": self._send_to if since else ""}

    def _principal(self, frames: list) -> str:
        """The CURVE key that authenticated this message ("" without keys)."""
        if self.socket_config.security is None:
            return ""
        return frame_user_id(frames[-1])

    def _is_stage(self, principal: str) -> bool:
        return self._stage_keys is not None and principal.encode() in self._stage_keys

    def _handle(self, router: zmq.Socket, frames: list, dropped: int = 0) -> None:
        identity, body = frames[0].bytes, frames[1:]
        principal = self._principal(frames)
        if principal:
            self.peer_replies.seen(identity, principal)
            for held in self.peer_replies.ready(identity):
                self._send_router(router, [identity, *held])
        if dropped or not body:
            self.stats["errors"] += 1
            n = len(body) + dropped
            self._refuse(router, identity, LimitExceeded(f"a message of {n} frames; a stage takes at most {1 + self.limits.max_tensors}") if dropped else ProtocolError("empty message: expected a header frame"))
            return
        try:
            msg = decode_message(body, self.limits)
        except (ProtocolError, AuthError) as e:
            self.stats["errors"] += 1
            self._refuse(router, identity, e)
            return
        if msg.kind == "ping":
            self._reply(router, identity, Message(kind="pong", req=msg.req, seq=msg.seq, meta={"pid": os.getpid(), "up_s": round(time.monotonic() - self._started_s, 3), "t": msg.meta.get("t"), "progress": self.progress()}))
        elif msg.kind == "info":
            self._reply(router, identity, Message(kind="info_reply", req=msg.req, meta={**self.info(), "t": msg.meta.get("t")}))
        elif msg.kind in ("pong", "info_reply"):
            pass  # a client answering this stage's ping (it proved who holds its routing id above)
        elif msg.kind == "forward_batch":
            self._queue_batch(router, identity, msg, principal, message_nbytes(body))
        elif msg.kind in ("forward", "release"):
            try:
                if msg.kind == "forward":
                    _check_forward_meta(msg)
                origin = self._origin(msg, principal)
            except ProtocolError as e:
                self.stats["errors"] += 1
                self._refuse(router, identity, e, msg)
                return
            if not self._enqueue(_Work(msg, message_nbytes(body), time.monotonic(), origin), 1):
                err = LimitExceeded(f"stage {self.config.stage_index} has {self.config.queue_depth} requests queued; retry later")
                self._refuse(router, identity, err, msg)
        else:
            err = ProtocolError(f"a stage does not accept {msg.kind!r} messages")
            self._refuse(router, identity, err, msg)

    def _queue_batch(self, router: zmq.Socket, identity: bytes, msg: Message, principal: str, nbytes: int) -> None:
        """Split a ``forward_batch`` here, at the I/O boundary, into one work item per member:
        each is checked as a forward of its own (its whole header), its origin decided by the
        same rule as one message's (a client speaks for itself only), and its bytes are its share
        of the message. The items are queued as one entry, so the compute thread takes the whole
        batch at once and never waits for part of it; a member that fails later fails alone."""
        try:
            header, parts = split_batch(msg)
            now = time.monotonic()
            items = [_Work(p, share, now, self._origin(p, principal)) for p, share in zip(parts, member_shares([m.rows for m in header.members], nbytes))]
            whole = _BatchInputs(msg, parts[0].meta, frozenset(header.shared), [m.rows for m in header.members])
            for i, item in enumerate(items):
                item.batch = (whole, i)
        except ProtocolError as e:
            self.stats["errors"] += 1
            self._refuse(router, identity, e, msg)
            return
        if self._enqueue(items, len(items)):
            self.stats["batch_messages_in"] += 1
        else:
            err = LimitExceeded(f"stage {self.config.stage_index} has {self.config.queue_depth} requests queued; retry later")
            for p in parts:
                self._refuse(router, identity, err, p)

    def _enqueue(self, item: "_Work | list[_Work]", members: int) -> bool:
        """Queue ``item`` for the compute thread unless that would put more than ``queue_depth``
        steps in the queue (a batch message counts each member): False = refuse it."""
        with self._queued_lock:
            if self._queued_members + members > self.config.queue_depth:
                return False
            self._queued_members += members
        seen = self._progress
        for w in item if type(item) is list else (item,):
            w.seen = seen
        self.work.put_nowait(item)
        return True

    def _take(self, timeout_s: float | None) -> "_Work | list[_Work] | None":
        """The next queued entry (raises queue.Empty); its members leave the queue's count."""
        item = self.work.get(timeout=timeout_s) if timeout_s is not None else self.work.get_nowait()
        if item is not None:
            with self._queued_lock:
                self._queued_members -= len(item) if type(item) is list else 1
        return item

    def _origin(self, msg: Message, principal: str) -> str:
        """Whose request this is: the sender's key, or the origin a trusted upstream stage vouches for."""
        claimed = msg.meta.get("origin")
        if claimed is not None and not (isinstance(claimed, str) and (claimed == "" or _Z85_KEY.fullmatch(claimed))):
            raise ProtocolError("meta.origin must be a 40-character Z85 CURVE public key")
        if principal and not self._is_stage(principal):
            return principal  # a client speaks for itself only
        return claimed if isinstance(claimed, str) and claimed else principal

    def _refuse(self, router: zmq.Socket, identity: bytes, err: SplitnetError, msg: Message | None = None) -> None:
        """Answer ``identity`` with ``err`` as a typed error message (about ``msg`` when it was decoded)."""
        req, seq, epoch = (msg.req, msg.seq, msg.epoch) if msg is not None else ("", 0, 0)
        self.metrics.observe_refusal(err.code)
        self._reply(router, identity, error_message(req, seq, epoch, err.code, str(err), stage=self.config.stage_index))

    def _reply(self, router: zmq.Socket, identity: bytes, msg: Message) -> None:
        """Answer the connection a message just came in on (pong, info, refusals)."""
        self._send_router(router, [identity, *encode_message(msg)])

    # ---------------------------------------------------------------- compute thread -------
    def _compute_loop(self) -> None:
        peers: dict[tuple[str, bytes | None], zmq.Socket] = {}  # downstream sockets by (endpoint, its CURVE key)
        self._to_io = self.ctx.socket(zmq.PUSH)  # this thread's end of the replies pipe
        self._to_io.setsockopt(zmq.SNDTIMEO, self.socket_config.send_timeout_ms)
        self._to_io.connect(self._replies_endpoint)
        backlog: deque[_Work] = deque()  # taken off the queue, not run yet (arrival order)
        try:
            while not self.stop_event.is_set():
                if not self._fill_backlog(backlog, peers) or not self._await_stragglers(backlog, peers):
                    break
                if backlog:
                    self._run_round(backlog, peers)
                self._compute_tick = time.monotonic()
        finally:
            for s in peers.values():
                s.close(linger=0)
            self._to_io.close(linger=0)

    def _fill_backlog(self, backlog: deque, peers: dict) -> bool:
        """Move queued work into ``backlog`` (waiting a poll interval when there is none); False
        when the worker is stopping."""
        while len(backlog) < self.config.queue_depth:
            try:
                item = self._take(_POLL_MS / 1000 if not backlog else None)
            except queue.Empty:
                return True
            if item is None:
                return False
            self._connect_ahead(peers, item)
            _add(backlog, item)
        return True

    def _await_stragglers(self, backlog: deque, peers: dict) -> bool:
        """Wait briefly for the rest of a batch before running part of it. False when stopping.

        - A later stage waits (up to ``batch_wait_ms``) until every member of the upstream batch
          its oldest item came in is queued, when the upstream stage sent the batch's outputs
          one message each (``meta.upstream_batch`` = [batch id, members sent this way]). A
          batch that came as one ``forward_batch`` is queued whole and carries no mark: nothing
          is waited for.
        - The first stage (inputs straight from the clients) waits, up to ``batch_wait_ms`` and
          at most its last forward's time, for the next steps of the requests it expects (those
          keeping their step rhythm, :class:`StepRhythms`): while one batch computes, the clients
          of the previous one send their next steps, and without waiting the stage would
          alternate between two half-size batches forever (on a memory-bound device, or two
          stages sharing one GPU, each costs about a full one). On devices of their own it waits
          at most one forward's time: groups at different stages then keep every stage busy,
          and a group one stage away comes back within about one forward. With
          ``shared_device`` (all stages on one GPU) it waits the whole ``batch_wait_ms``: there
          a second group costs a second forward on the same device.
        Only the first stage waits for requests; stages that all did would wait for each other."""
        if not backlog or self.batch_limits.max_batch_size == 1:
            return True
        t0 = time.monotonic()
        try:
            return self._wait_for_stragglers(backlog, peers)
        finally:
            p = self._progress
            self._progress = dataclasses.replace(p, wait_s=p.wait_s + time.monotonic() - t0)

    def _wait_for_stragglers(self, backlog: deque, peers: dict) -> bool:
        if self.stage.is_first:
            expected = self._rhythms.expected(time.monotonic())
            if len(expected) <= 1 or _oldest_is_chunk(backlog):
                return True  # a prompt chunk first: the decode steps waited for would not stack with it
            wait_s = self.config.batch_wait_ms / 1000
            deadline = time.monotonic() + (wait_s if self.config.shared_device else min(wait_s, self._last_forward_s))
        else:
            expected = set()
            deadline = time.monotonic() + self.config.batch_wait_ms / 1000
        while True:
            if self._batch_complete(backlog, expected):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or len(backlog) >= self.config.queue_depth:
                return True
            try:
                item = self._take(left)
            except queue.Empty:
                return True
            if item is None:
                return False
            self._connect_ahead(peers, item)
            _add(backlog, item)

    def _batch_complete(self, backlog: deque, expected: "set | frozenset" = frozenset()) -> bool:
        forwards = [w for w in backlog if w.msg.kind == "forward"]
        if not forwards:
            return True
        if not self.stage.is_first:
            mark = forwards[0].msg.meta.get("upstream_batch")
            if not (isinstance(mark, list) and len(mark) == 2 and isinstance(mark[1], int)):
                return True
            return sum(1 for w in forwards if w.msg.meta.get("upstream_batch") == mark) >= min(mark[1], self.batch_limits.max_batch_size)
        queued = {cache_key(w.origin, w.msg.req) for w in forwards}
        return len(queued) >= self.batch_limits.max_batch_size or not expected - queued

    def _run_round(self, backlog: deque, peers: dict) -> None:
        """Run what is runnable now: pending releases, then one batched forward (the oldest
        step and every other request's step that stacks with it); the rest waits in ``backlog``."""
        self._drop_cancelled(backlog)
        releases, taken = take_round(backlog, key_of=lambda w: cache_key(w.origin, w.msg.req),
                                     is_release=lambda w: w.msg.kind == "release", max_members=self.batch_limits.max_batch_size)
        for item in releases:
            self.caches.drop(cache_key(item.origin, item.msg.req))
            self._rhythms.drop(cache_key(item.origin, item.msg.req))
        members = []
        for item in taken:
            try:
                members.append(item.prepared if item.prepared is not None else self._prepare(item, peers))
            except Exception as e:  # a bad member fails alone, before any batch runs
                self._fail(peers, item, e)
        if self.config.merge_chunk_tokens > 1 and self.pool is not None:
            members = [self._merge_queued_chunks(m, backlog) for m in members]
        group, rest = pick_group(members, self.batch_limits)
        for m in reversed(rest):  # next round, first, with their inputs already decoded
            m.work.prepared = m
            backlog.appendleft(m.work)
        if group:
            self._run_group(group, peers)

    def _drop_cancelled(self, backlog: deque) -> None:
        """Drop queued steps of requests given up: those before a release of theirs (the client
        replays under a new request id), or after this stage failed to pass one on."""
        for w in backlog:
            if w.msg.kind == "release":
                self.ledger.cancel(cache_key(w.origin, w.msg.req), w.received_at)
        n = len(backlog)
        for _ in range(n):
            w = backlog.popleft()
            if w.msg.kind == "forward" and self.ledger.is_cancelled(cache_key(w.origin, w.msg.req), w.received_at):
                self.stats["cancelled_steps"] += 1
                continue
            backlog.append(w)

    def _fail(self, peers: dict, item: _Work, e: Exception) -> None:
        """Answer ``item``'s client with ``e`` as a typed error; its cache on this stage is gone."""
        msg = item.msg
        self.stats["errors"] += 1
        if not isinstance(e, SplitnetError):
            log.error("stage %d failed on request %s", self.config.stage_index, msg.req, exc_info=e)
            e = StageError(f"stage {self.config.stage_index} failed: {type(e).__name__}: {e}")
        self.metrics.observe_refusal(e.code)
        if not isinstance(e, StaleEpoch):  # a stale step must not touch the newer epoch's cache
            self.caches.drop(cache_key(item.origin, msg.req))
        self._reply_to_origin(peers, item, error_message(msg.req, msg.seq, msg.epoch, e.code, str(e), stage=self.config.stage_index))

    def _prepare(self, item: _Work, peers: dict) -> Member:
        """Decode and check one forward's inputs, find (or make) its cache and check its position."""
        msg, meta = item.msg, item.msg.meta
        self.ledger.check_epoch(cache_key(item.origin, msg.req), msg.epoch, msg.req)
        t0 = time.perf_counter()
        whole = None
        if item.batch is not None:  # one decode and one copy to the device for the whole batch message
            whole, index = item.batch
            inputs = whole.rows(self, index)
        elif item.decoded is not None:
            inputs = item.decoded
        else:
            inputs = self._decode(item)
        item.decode_ms += (time.perf_counter() - t0) * 1e3
        item.started_at = t0
        if item.seen is not None:
            item.ahead = self._progress - item.seen
        cache, ckey = None, cache_key(item.origin, msg.req)
        if meta.get("cache") and self.stage.arch.uses_kv_cache:
            resumed, took_over = meta.get("resume_from"), False
            if resumed and ckey not in self.caches.caches:
                old = cache_key(item.origin, resumed)
                took_over = self.caches.rename(old, ckey)  # the client's own request only: the key holds its origin
                if took_over:
                    self.ledger.cancel(old, time.monotonic())  # its steps still queued were sent before the recovery
                    self.stats["resumed"] += 1
            cache = self.caches.get(ckey, create=True)
            pos = meta.get("pos")
            if isinstance(pos, int) and pos < cache.length and meta.get("rewind"):
                cache.truncate(pos)  # the client rejected speculative tokens past ``pos``, or resumes at ``pos``
                self.caches.sent.truncate(ckey, pos)
            if isinstance(pos, int) and pos != cache.length:
                self.caches.drop(ckey)
                raise UnknownRequest(f"request {msg.req!r} step {msg.seq} starts at position {pos} but this stage's cache holds {cache.length}; replay the request from its first token")
            if took_over and meta.get("refill") and isinstance(pos, int) and pos > 0:
                # once per resume, by a stage that just took the request over: a step naming
                # ``refill`` alone never makes a stage resend what it sent (no amplification)
                self._refill_next(peers, item, ckey, pos)
        first = next(iter(inputs.values()), None)
        tokens = int(first.shape[0] * first.shape[1]) if first is not None and first.dim() >= 2 else 1
        # members of one forward also share what leaves it: last stage or not, and the head reduction
        options = _step_options(meta)
        sig = whole.signature(index, inputs, cache is not None, options) if whole is not None else signature(inputs, cache is not None, options)
        return Member(item, inputs, cache, ckey, sig, tokens, options)

    def _refill_next(self, peers: dict, item: _Work, ckey: str, pos: int) -> None:
        """Before a resumed step: when the next stages of its route (a run of ``meta.refill``)
        lost their caches and this stage did not, send them what this stage sent before for
        positions ``0..pos-1`` (fill-only forwards, ending at the last stage of the run), so
        that they hold the request again when the step itself comes (after these, on the same
        connection). Without a log that covers them nothing is sent, and the first stage of the
        run answers the step with UnknownRequest: the client then replays in full."""
        meta = item.msg.meta
        me, refill = self.config.stage_index, set(meta.get("refill") or ())
        route = meta.get("route") or []
        if me in refill or me + 1 not in refill or not route or self.codecs.out is not None:
            return  # not the stage before a lost run; or a cut with a codec, whose state a fill cannot rebuild
        run = min(refill_run(refill, me + 1), len(route))
        chunks = self.caches.sent.chunks(ckey, pos, FILL_CHUNK_TOKENS)
        if chunks is None:
            log.info("stage %d: no log of %s up to %d to refill stage %d from", me, item.msg.req, pos, me + 1)
            return
        keys = list(meta.get("route_keys") or [])
        fill_meta = {k: v for k, v in meta.items() if k not in _NOT_PASSED_ON and k not in _NOT_IN_FILL}
        if item.origin:
            fill_meta["origin"] = item.origin
        key = keys[0].encode() if keys else None
        for p, outputs in chunks:
            m = dict(fill_meta, pos=p, cache=True, want_result=False, route=route[1:run])
            if len(keys) > 1:
                m["route_keys"] = keys[1:run]
            self._send(peers, route[0], Message(kind="forward", req=item.msg.req, seq=item.msg.seq, epoch=item.msg.epoch,
                                                                  tensors=dict(outputs), meta=m), key=key)
        self.stats["refills"] += 1
        self.stats["refill_tokens"] += pos

    def _decode(self, item: _Work) -> dict:
        """One forward message's inputs, decoded (codecs) and made the stage's tensors."""
        msg, meta = item.msg, item.msg.meta
        context = (cache_key(item.origin, msg.req), msg.epoch) if meta.get("cache") else None  # binds / reads compact codes
        return self._inputs_of(self.codecs.decode(msg.tensors, meta, context=context), msg.dtypes)

    def _merge_queued_chunks(self, m: Member, backlog: deque) -> Member:
        """``m`` with its request's next chunks, queued in ``backlog`` right behind it, merged in:
        one forward of their inputs concatenated along the tokens, up to ``merge_chunk_tokens``.

        A follower must continue ``m`` exactly: same epoch, origin and route, its ``pos`` where
        ``m``'s tokens end, one sequence of the same tensors, no logits at every position; and
        every chunk but the last merged must want no result (a prefill's chunks before its last). The
        merged step goes on in the last chunk's name (its seq, ``want_result``, ``final``) from
        ``m``'s position, so the next stage sees one longer chunk and the client the reply it
        waits for (the last chunk's). A follower that does not fit stays queued, decoded."""
        cap = self.config.merge_chunk_tokens
        head = m.work
        meta0 = head.msg.meta
        pos0 = meta0.get("pos")
        if (m.cache is None or head.batch is not None or m.options.all_logits or m.tokens >= cap
                or not isinstance(pos0, int) or meta0.get("final") or meta0.get("want_result", True)):
            return m  # a chunk whose result is wanted is answered in its own name: never merged into a later one
        merged = [(head, m.inputs)]
        tokens = m.tokens
        while tokens < cap and not merged[-1][0].msg.meta.get("want_result", True):
            nxt = next((w for w in backlog if w.msg.kind in ("forward", "release") and cache_key(w.origin, w.msg.req) == m.cache_key), None)
            if nxt is None or nxt.msg.kind != "forward" or nxt.batch is not None or nxt.prepared is not None:
                break
            meta = nxt.msg.meta
            if (nxt.msg.epoch != head.msg.epoch or nxt.origin != head.origin or meta.get("pos") != pos0 + tokens
                    or meta.get("route") != meta0.get("route") or meta.get("all_logits") or not meta.get("cache")):
                break
            if nxt.decoded is None:
                t0 = time.perf_counter()
                try:
                    nxt.decoded = self._decode(nxt)
                except Exception:  # noqa: BLE001 - it fails alone, in its own round
                    break
                nxt.decode_ms += (time.perf_counter() - t0) * 1e3
            inputs = nxt.decoded
            n = _one_sequence_tokens(inputs, m.inputs)
            if n is None or tokens + n > cap:
                break
            backlog.remove(nxt)
            merged.append((nxt, inputs))
            tokens += n
        if len(merged) == 1:
            return m
        last = merged[-1][0]
        self.stats["merged_chunks"] += len(merged) - 1
        inputs = {k: torch.cat([x[k] for _, x in merged], dim=1) for k in m.inputs}
        meta = dict(last.msg.meta)
        meta["pos"] = pos0
        work = _Work(last.msg._replace(meta=meta), sum(w.wire_bytes for w, _ in merged), head.received_at, head.origin,
                     started_at=head.started_at, decode_ms=sum(w.decode_ms for w, _ in merged), ahead=head.ahead)
        options = _step_options(meta)  # no all_logits, the same route as m: checked above
        return Member(work, inputs, m.cache, m.cache_key, signature(inputs, True, options), tokens, options)

    def _inputs_of(self, arrays: dict, dtypes: Any) -> dict:
        """Decoded arrays as the stage's input tensors: floats in its dtype on its device; token
        ids of a first stage left in host memory (checked against the vocabulary there)."""
        inputs = {}
        for name, arr in arrays.items():
            t = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr)
            if dtypes.get(name) == "bf16":
                t = t.view(torch.bfloat16)
            if t.is_floating_point():
                t = t.to(self.dtype)
            elif name == "input_ids" and self.stage.is_first:
                inputs[name] = t  # the stage checks token ids against its vocabulary on the host, then copies them
                continue
            inputs[name] = t.to(self.device, non_blocking=True)
        return inputs

    def _run_group(self, group: list[Member], peers: dict) -> None:
        """One forward for ``group``; a failing batch is retried member by member, so only the
        member at fault gets an error."""
        group = [m for m in group if m.cache is None or self.caches.caches.get(m.cache_key) is m.cache]  # released meanwhile
        if not group:
            return
        cached = group[0].cache is not None
        if cached and self.pool is not None:
            group.sort(key=lambda m: m.cache.slot)  # consecutive slots read as one view, not a gather
        lengths = [m.cache.length if m.cache is not None else 0 for m in group]
        captured = self._graph_captures()
        t1 = time.perf_counter()
        try:
            outputs = self._forward_members(group, cached)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # busy time is the GPU's, not the launches'
        except Exception as e:
            if len(group) == 1:
                self._fail(peers, group[0].work, e)
                return
            log.warning("stage %d: a batch of %d failed (%s: %s); running its members one by one", self.config.stage_index, len(group), type(e).__name__, e)
            for m, length in zip(group, lengths):
                if m.cache is not None:
                    m.cache.truncate(min(length, m.cache.length))  # what the failed batch wrote is not kept
                self._run_group([m], peers)
            return
        compute_ms = (time.perf_counter() - t1) * 1e3
        self._last_forward_s = compute_ms / 1e3
        self._round_captures = self._graph_captures() - captured  # decode graphs this forward captured (a first-use shape)
        self.stats["graph_captures"] += self._round_captures
        if cached and self.stage.is_first:
            now = time.monotonic()
            for m in group:
                if m.work.msg.meta.get("final"):
                    self._rhythms.drop(m.cache_key)
                else:
                    self._rhythms.note(m.cache_key, now)
        self.stats["busy_s"] += compute_ms / 1e3
        p = self._progress
        self._progress = dataclasses.replace(p, rounds=p.rounds + 1, busy_s=p.busy_s + compute_ms / 1e3)
        self.stats["batches"] += 1
        self._batch_id = (self._batch_id + 1) % (1 << 31)
        self.stats["batched_requests"] += len(group)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(group))
        if cached and len({m.tokens for m in group}) > 1:
            self.stats["ragged_batches"] += 1  # members of different lengths, padded to the longest
        self.metrics.observe_batch(len(group), compute_ms / 1e3, sum(m.tokens for m in group), sum(m.work.wire_bytes for m in group))
        try:
            whole = self._to_host(group, outputs)
        except Exception as e:
            for m in group:
                self._fail(peers, m.work, e)
            return
        cache_bytes = self.caches.total_bytes() if cached else 0  # once for the batch, not once per member
        leaving: list[_Leaving] = []
        for i, m in enumerate(group):
            try:
                if m.cache is not None:
                    self.caches.check_memory(m.cache_key, cache_bytes)
                lv = self._finish(m, whole, i)
            except Exception as e:
                self._fail(peers, m.work, e)
                if cached:
                    cache_bytes = self.caches.total_bytes()  # a dropped cache frees its bytes for the members after it
                continue
            if lv is not None:
                leaving.append(lv)
        t3 = time.monotonic()
        try:
            self._send_on(peers, leaving, whole, compute_ms, len(group))
        finally:
            p = self._progress
            self._progress = dataclasses.replace(p, send_s=p.send_s + time.monotonic() - t3)

    def _forward_members(self, group: list[Member], cached: bool) -> list[dict]:
        inputs, opts = [m.inputs for m in group], group[0].options  # options are shared by the group (its signature)
        all_logits = opts.all_logits
        if not cached:
            return self.stage.forward_batch(inputs, None, all_logits=all_logits)
        if self.pool is not None:
            if self.stage.is_last and opts.last and not opts.want_result:
                return self.stage.forward_batch(inputs, [m.cache for m in group], head=False)  # nobody reads these logits
            return self.stage.forward_batch(inputs, [m.cache for m in group], all_logits=all_logits)
        return [self.stage(x, m.cache, all_logits=all_logits) for x, m in zip(inputs, group)]  # a stage without a pool

    def _to_host(self, group: list[Member], outputs: list[dict]) -> "_Whole | None":
        """The members' outputs in host memory, reduced as their head asks (argmax, top-k) on the
        device for the whole batch at once, moved in one copy per tensor; float32 from the last
        stage whatever the stage's dtype: the whole batch's host tensors (members' rows
        concatenated), which a batch message sends as they are, and each member's rows are split
        from (:meth:`_Whole.rows`) only where one is sent alone."""
        if not outputs[0]:
            return None  # caches filled, nothing to send (a prefill chunk without a result)
        opts = group[0].options  # members share route end and head (their signature)
        last = opts.last
        sizes = [next(iter(o.values())).shape[0] for o in outputs]
        if any(o[k].shape[1:] != outputs[0][k].shape[1:] for o in outputs[1:] for k in outputs[0]):  # a ragged batch: member by member
            members = []
            for m, o in zip(group, outputs):
                if last and "logits" in o and opts.head != "logits":
                    o = _reduce_logits(o["logits"], m.work.msg.meta)
                members.append({k: (v.float() if last and v.is_floating_point() else v).to("cpu") for k, v in o.items()})
            return _Whole({}, frozenset(), sizes, members)
        batched = {k: torch.cat([o[k] for o in outputs]) if len(outputs) > 1 else outputs[0][k] for k in outputs[0]}
        if last and "logits" in batched and opts.head != "logits":
            batched = _reduce_logits(batched["logits"], group[0].work.msg.meta)
        total = sum(sizes)
        host = {k: (v.float() if last and v.is_floating_point() else v).to("cpu") for k, v in batched.items()}
        split = {k for k, v in host.items() if v.dim() and v.shape[0] == total}
        return _Whole(host, frozenset(set(host) - split), sizes)

    def _finish(self, m: Member, whole: "_Whole | None", index: int) -> "_Leaving | None":
        """What leaves for one member (outputs in host memory): its next stage's header fields,
        or its result's; None when nobody reads it. Drops a final step's cache."""
        item, cache, ckey = m.work, m.cache, m.cache_key
        meta = item.msg.meta
        route = list(meta.get("route") or [])
        next_meta = {k: v for k, v in meta.items() if k not in _NOT_PASSED_ON}
        self.stats["forwards"] += 1
        tokens_computed = cache.tokens_computed if cache is not None else None
        if meta.get("final") and cache is not None:
            self.caches.drop(ckey)
        if item.origin:
            next_meta["origin"] = item.origin  # the next stage trusts it only from a stage key it lists
        if not route and not meta.get("want_result", True):
            return None
        route_keys = list(meta.get("route_keys") or [])
        lv = _Leaving(m, index, whole, next_meta, route, route_keys, tokens_computed)
        if route and cache is not None and not meta.get("final") and self.caches.sent.max_bytes > 0 and self.codecs.out is None:
            self.caches.sent.append(ckey, meta.get("pos"), lv.outputs)  # host rows already made to send: no copy
        return lv

    def _trace_common(self, compute_ms: float, encode_ms: float, batch: int) -> dict:
        """The fields of this stage's trace entry that every member sent on at once shares."""
        common = {"stage": self.config.stage_index, "pid": os.getpid(), "compute_ms": round(compute_ms, 3), "encode_ms": round(encode_ms, 3), "batch": batch}
        if self._round_captures:
            common["graph_captures"] = self._round_captures
        return common

    def _graph_captures(self) -> int:
        """Decode graphs this stage has captured so far (0 without CUDA graphs)."""
        graphs = self.stage.__dict__.get("_graphs")
        return int(getattr(graphs, "captures", 0) or 0)

    def _trace(self, lv: "_Leaving", common: dict, now: float) -> list:
        """The member's trace with this stage's entry appended (``common``: :meth:`_trace_common`;
        ``now``: when it is sent on, monotonic)."""
        item = lv.member.work
        trace = list(item.msg.meta.get("trace") or [])
        entry = {
            **common,
            "in_bytes": item.wire_bytes,
            "queue_ms": round(max(0.0, (item.started_at - item.received_at) * 1e3), 3),
            "decode_ms": round(item.decode_ms, 3),
            "tokens_computed": lv.tokens_computed,
            "held_ms": round((now - item.received_at) * 1e3, 3),  # received by the I/O thread -> sent on
        }
        if item.ahead is not None:  # where its queue time went: other rounds' forwards, waits for stragglers, sends
            a = item.ahead
            entry.update(ahead_rounds=a.rounds, ahead_busy_ms=round(a.busy_s * 1e3, 3), ahead_wait_ms=round(a.wait_s * 1e3, 3),
                         ahead_send_ms=round(a.send_s * 1e3, 3))
        if self._trace_clock:  # host-local CLOCK_MONOTONIC stamps, comparable between processes of one host (hop timing)
            entry["clock_s"] = [round(item.received_at, 6), round(now, 6)]
        trace.append(entry)
        return trace

    def _send_on(self, peers: dict, leaving: list["_Leaving"], whole: "_Whole | None", compute_ms: float, batch: int) -> None:
        """Send what leaves a forward: members going to the same next stage (same route, same
        keys) as one ``forward_batch``, results for the same client (same ``reply_to``, same
        origin) as one ``result_batch``, when the members' headers say every later hop takes
        batch messages (``batch_messages``) and the cut travels raw; otherwise one message each."""
        by_hop: dict[tuple, list[_Leaving]] = {}
        for lv in leaving:
            if lv.route:
                hop = ("forward", tuple(lv.route), tuple(lv.route_keys))
            else:
                hop = ("result", lv.member.work.msg.meta.get("reply_to", ""), lv.member.work.origin)
            by_hop.setdefault(hop, []).append(lv)
        for hop, lvs in by_hop.items():
            raw_cut = hop[0] == "result" or self.codecs.out is None
            if len(lvs) > 1 and raw_cut and whole is not None and not whole.ragged and all(lv.next_meta.get("batch_messages") for lv in lvs):
                try:
                    self._send_batch(peers, hop[0], lvs, whole, compute_ms, batch)
                except Exception as e:  # the batch could not be built: its members fail, each to its own client
                    for lv in lvs:
                        self._fail(peers, lv.member.work, e)
                continue
            for lv in lvs:
                try:
                    self._send_one(peers, lv, compute_ms, batch, len(lvs))
                except Exception as e:
                    self._fail(peers, lv.member.work, e)

    def _send_one(self, peers: dict, lv: "_Leaving", compute_ms: float, batch: int, to_same_hop: int) -> None:
        msg, meta = lv.member.work.msg, lv.next_meta
        t2 = time.perf_counter()
        if lv.route:
            context = (cache_key(lv.member.work.origin, msg.req), msg.epoch) if meta.get("cache") else None
            tensors, out_meta = self.codecs.encode(lv.outputs, context=context, pos=meta.get("pos"))
        else:
            tensors, out_meta = dict(lv.outputs), {}
        encode_ms = (time.perf_counter() - t2) * 1e3
        meta.update(out_meta)
        meta["trace"] = self._trace(lv, self._trace_common(compute_ms, encode_ms, batch), time.monotonic())
        if lv.route:
            meta["route"] = lv.route[1:]
            meta["upstream_batch"] = [self._batch_id, to_same_hop]  # the next stage waits for the rest sent its way
            if len(lv.route_keys) > 1:
                meta["route_keys"] = lv.route_keys[1:]
            key = lv.route_keys[0].encode() if lv.route_keys else None  # for this request only
            fwd = Message(kind="forward", req=msg.req, seq=msg.seq, epoch=msg.epoch, tensors=tensors, meta=meta)
            self._send(peers, lv.route[0], fwd, key=key, on_fail=[lv.member.work])
        else:
            self._reply_to_origin(peers, lv.member.work, Message(kind="result", req=msg.req, seq=msg.seq, epoch=msg.epoch, tensors=tensors, meta=meta))

    def _send_batch(self, peers: dict, kind: str, lvs: list["_Leaving"], whole: "_Whole", compute_ms: float, batch: int) -> None:
        """``lvs`` (one hop, in batch order) as batch messages: the batch's host tensors as they
        are when ``lvs`` is the whole batch, else the members' rows concatenated; split into
        several messages only when one would pass :data:`MAX_BATCH_MEMBERS` members."""
        t2 = time.perf_counter()
        if [lv.index for lv in lvs] == list(range(len(whole.sizes))):
            tensors = dict(whole.host)
        else:
            own = [lv.outputs for lv in lvs]
            tensors = {k: (v if k in whole.shared else torch.cat([r[k] for r in own])) for k, v in whole.host.items()}
        out_meta: dict[str, Any] = {}
        if kind == "forward":
            tensors, out_meta = self.codecs.encode(tensors)  # raw cut: only the attention mask is compacted
        shared = [k for k in tensors if k in whole.shared]
        encode_ms = (time.perf_counter() - t2) * 1e3
        chunks = [lvs[i:i + MAX_BATCH_MEMBERS] for i in range(0, len(lvs), MAX_BATCH_MEMBERS)]
        common = self._trace_common(compute_ms, encode_ms, batch)
        start = 0
        for chunk in chunks:
            rows = [whole.sizes[lv.index] for lv in chunk]
            part = {k: (v if k in whole.shared else v[start:start + sum(rows)]) for k, v in tensors.items()} if len(chunks) > 1 else tensors
            start += sum(rows)
            members: list[BatchMember] = []
            siblings: SiblingHeaders | None = None
            # one hop: every member has the same route and keys (one list object each, for all)
            route, route_keys, mark = chunk[0].route[1:], chunk[0].route_keys[1:], [self._batch_id, len(lvs)]
            now = time.monotonic()
            for lv, n in zip(chunk, rows):
                msg, meta = lv.member.work.msg, lv.next_meta
                trace = self._trace(lv, common, now)
                if kind == "forward":
                    meta.update(out_meta)
                    meta["trace"] = trace
                    meta["route"] = route
                    if len(lv.route_keys) > 1:
                        meta["route_keys"] = route_keys
                    if len(chunks) > 1:
                        meta["upstream_batch"] = mark  # the rest comes in the next message
                    # a member like the first (but its step fields) is checked in those fields only
                    if siblings is None:
                        header = ForwardHeader.from_meta(meta)
                        siblings = SiblingHeaders(header, meta)
                    else:
                        header = siblings.read(meta)
                    members.append(batch_member(msg.req, msg.seq, msg.epoch, n, header, (), meta))  # meta: written as it was read
                else:
                    members.append(batch_member(msg.req, msg.seq, msg.epoch, n, None, tuple(trace)))
            out = batch_message(f"{kind}_batch", members, part, shared)
            self.stats["batch_messages_out"] += 1
            first = chunk[0]
            if kind == "forward":
                key = first.route_keys[0].encode() if first.route_keys else None
                self._send(peers, first.route[0], out, key=key, on_fail=[lv.member.work for lv in chunk])
            else:
                self._reply_to_origin(peers, first.member.work, out)  # one client, one origin: the same rule as one result

    def _reply_to_origin(self, peers: dict, item: _Work, msg: Message) -> None:
        """Send a result or error to the client the request belongs to, and to no one else: a
        result socket must authenticate as the origin's key; a client's own connection must be
        held by the origin (checked by the I/O thread)."""
        reply_to = item.msg.meta.get("reply_to", "")
        if reply_to.startswith(PEER_REPLY_PREFIX):  # the client's own connection to this stage
            frames = encode_message(msg)
            try:
                self._to_io.send_multipart([reply_to[len(PEER_REPLY_PREFIX):].encode(), item.origin.encode(), *frames], copy=False)
                self.stats["bytes_out"] += message_nbytes(frames)
            except zmq.Again:
                log.warning("could not hand %s for %s to the I/O thread", msg.kind, msg.req)
            return
        key = item.origin.encode() if item.origin and self.socket_config.security is not None else None
        self._send(peers, reply_to, msg, key=key)

    def _peer(self, peers: dict, endpoint: str, key: bytes | None) -> zmq.Socket:
        """The socket to a next stage at ``endpoint`` that authenticates it as ``key``, connected
        now if there is none (a ZMQError for an endpoint libzmq refuses)."""
        sock = peers.get((endpoint, key))
        if sock is None:
            if len(peers) >= _MAX_PEERS:  # route and reply_to come from peers: bound the sockets they make us open
                peers.pop(next(iter(peers))).close(linger=0)
            sock = make_socket(self.ctx, zmq.DEALER, self.socket_config)
            try:
                if key is not None and self.socket_config.security is not None:
                    set_peer_key(sock, key)
                sock.connect(endpoint)
            except zmq.ZMQError:
                sock.close(linger=0)
                raise
            peers[(endpoint, key)] = sock
        return sock

    def _connect_ahead(self, peers: dict, item: "_Work | list[_Work]") -> None:
        """Open the socket to a forward's next stage when the forward is taken off the queue, so
        that its TCP and ZMTP (CURVE) handshakes overlap the queueing and the compute instead of
        holding up the send after them. A replay onto a replacement meets two new hops at once
        (the stage before it, and the replacement itself to the stage after it)."""
        w = item[0] if isinstance(item, list) else item  # a batch message's members share one route
        if w is None or w.msg.kind != "forward":
            return
        route, keys = w.msg.meta.get("route"), w.msg.meta.get("route_keys")
        if not route or not isinstance(route, list) or not isinstance(route[0], str):
            return
        key = keys[0].encode() if isinstance(keys, list) and keys and isinstance(keys[0], str) else None
        try:
            self._peer(peers, route[0], key)
        except zmq.ZMQError:
            pass  # the send reports it, to the request's client

    def _send(self, peers: dict, endpoint: str, msg: Message, key: bytes | None = None, on_fail: list[_Work] | None = None) -> None:
        """Send ``msg`` to ``endpoint`` over a socket that authenticates the peer as ``key`` (None:
        the configured default peer key). With ``on_fail``, a peer that cannot take it is reported
        to the client of each of those requests (the members of a batch message)."""
        frames = encode_message(msg)
        try:
            sock = self._peer(peers, endpoint, key)
        except zmq.ZMQError as e:
            log.warning("cannot connect to %s (%s); %s for %s dropped", endpoint, e, msg.kind, msg.req)
            return
        ban = (endpoint, key)  # a ban follows the key too: one request's bad key must not cut the link for others
        why = f"within {self.socket_config.send_timeout_ms} ms"
        self._send_to = hop_digest(endpoint, key) if msg.kind in ("forward", "forward_batch") else ""
        self._send_since = time.monotonic()
        try:
            if self._banned.get(ban, 0.0) > time.monotonic():
                if sock.poll(0, zmq.POLLOUT):
                    # it can take a message now (ZMQ_IMMEDIATE: a connected pipe with room): a
                    # stage restarted on the same endpoint, a healed link; the ban is over
                    self._banned.pop(ban, None)
                else:
                    why = f"(it took none within {self.socket_config.send_timeout_ms} ms less than {_BAN_S:.0f} s ago)"
                    raise zmq.Again()  # timed out recently: fail at once instead of stalling compute again
            if ban in self._peers_up and not sock.poll(_GONE_WAIT_MS, zmq.POLLOUT):
                why = f"(it took messages before and has had no connection for {_GONE_WAIT_MS} ms)"
                raise zmq.Again()  # it took messages before and has no connection now: gone (a killed stage), not a 5 s stall of compute
            sock.send_multipart(frames, copy=False)
            if len(self._peers_up) >= 2 * _MAX_PEERS:
                self._peers_up.clear()
            self._peers_up.add(ban)
            self.stats["bytes_out"] += message_nbytes(frames)
        except zmq.Again:
            if self._banned.get(ban, 0.0) <= time.monotonic():
                self._banned.pop(ban, None)
                self._banned[ban] = time.monotonic() + _BAN_S
                while len(self._banned) > _MAX_PEERS:
                    self._banned.pop(next(iter(self._banned)))
            if on_fail:
                # the next stage is unreachable: tell each client once instead of hanging it, and
                # drop the request's queued steps instead of running and failing each of them
                for item in on_fail:
                    self.ledger.cancel(cache_key(item.origin, item.msg.req), time.monotonic())
                    err = error_message(item.msg.req, item.msg.seq, item.msg.epoch, "unavailable", f"stage {self.config.stage_index} could not reach the next stage at {endpoint} {why}", stage=self.config.stage_index + 1)
                    self._reply_to_origin(peers, item, err)
            else:
                log.warning("could not deliver %s for %s to %s", msg.kind, msg.req, endpoint)
        finally:
            self._send_since = 0.0


def _add(backlog: deque, item: "_Work | list[_Work]") -> None:
    """Append a queued entry to the backlog: one work item, or the members of a batch message."""
    if type(item) is list:
        backlog.extend(item)
    else:
        backlog.append(item)


def _step_options(meta: Any) -> StepOptions:
    """What a forward's header asks beyond its inputs (members of one forward share it)."""
    return StepOptions(bool(meta.get("all_logits")), not meta.get("route"), meta.get("head", "logits"), meta.get("top_k"), bool(meta.get("want_result", True)))


def _one_sequence_tokens(inputs: dict, like: dict) -> int | None:
    """How many tokens ``inputs`` holds when it is one sequence with the same tensors as
    ``like`` (shapes equal but the token dimension); None otherwise."""
    if inputs.keys() != like.keys() or not inputs:
        return None
    n = None
    for k, t in inputs.items():
        o = like[k]
        if t.dim() < 2 or t.shape[0] != 1 or t.dim() != o.dim() or t.shape[2:] != o.shape[2:] or t.dtype != o.dtype or t.device != o.device:
            return None
        if n is not None and t.shape[1] != n:
            return None
        n = t.shape[1]
    return int(n)


def _reduce_logits(logits: torch.Tensor, meta: Any) -> dict[str, torch.Tensor]:
    """What the client asked the last stage to send back instead of whole logits (``meta.head``):
    ``"argmax"`` (greedy: 8 bytes a position instead of 4 x vocab) or ``"topk"`` (the ``top_k``
    largest logits and their token ids, all that top-k sampling needs)."""
    vocab = torch.tensor([logits.shape[-1]], dtype=torch.int64)
    if meta["head"] == "argmax":
        return {"argmax": logits.argmax(dim=-1).to(torch.int64), "vocab": vocab}
    values, indices = torch.topk(logits.float(), k=min(int(meta["top_k"]), logits.shape[-1]), dim=-1)
    return {"topk_values": values, "topk_indices": indices.to(torch.int64), "vocab": vocab}


def _check_forward_meta(msg: Message) -> None:
    """A forward's meta is its declared header (:class:`~splitnet.wire.headers.ForwardHeader`):
    unknown versions, unknown keys and wrong types are refused before the step is queued."""
    ForwardHeader.from_meta(msg.meta)


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        host = endpoint[len("tcp://"):-2]
        port = sock.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=60000, max_tries=200)
        return f"tcp://{host}:{port}"
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def serve_forever(config: StageWorkerConfig, **kwargs: Any) -> None:
    """Run a worker in this process until SIGTERM/SIGINT; used by ``splitnet serve-stage``."""
    worker = StageWorker(config, **kwargs)

    def _stop(signum, frame):  # noqa: ARG001
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker.run()
