"""The client's links to the stages of one pipeline, and their liveness, behind one poll loop.

:class:`StageLinks` owns one DEALER per stage (all with this session's routing id, so the last
stage can send results back over the client's own connection) and, with
``ClientConfig(reply_via="bind")``, the bound results ROUTER. Every wait of the session goes
through :meth:`StageLinks.wait_until`, the one loop (zguide ``lpclient``) that

- receives what arrives and hands each decoded message to the session's ``on_message``;
- answers a stage's ``ping`` (a stage asks who holds a connection before it sends a result);
- sends heartbeats once per ``heartbeat_interval_s``;
- watches liveness: any message from a stage (or a result whose trace names it) counts as a
  sign of life; half-way through a silent window the connection is closed and reopened (libzmq
  never reconnects a link that failed with a protocol error, and a new connection takes the
  routing id back from a half-open ghost); a stage silent for a whole window
  (``heartbeat_interval_s x heartbeat_liveness``) raises :class:`StageUnavailable`;
- watches each socket's disconnect events (zmq socket monitor): a stage whose connection closed
  and has not come back within ``disconnect_grace_s`` is unavailable at once, without waiting
  for the heartbeat window (a killed process closes its sockets).

Observers (:meth:`StageLinks.observe`) are called with a :class:`LinkEvent` for every message
sent or received on these links and for every reply the session uses (``note_used``), so that a
history log or a metric needs no wrapper around private methods.

A socket belongs to one thread: use a StageLinks from the thread that made it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from splitnet.edge.config import ClientConfig
from splitnet.errors import AuthError, ProtocolError, StageUnavailable
from splitnet.wire import DEFAULT_LIMITS, Message, SocketConfig, decode_message, encode_message, make_socket, message_nbytes
from splitnet.wire.hop_digest import hop_digest
from splitnet.wire.batches import member_shares, split_batch
from splitnet.wire.security import HandshakeWatch, set_peer_key

log = logging.getLogger("splitnet.sdk")

#: heartbeat round trips remembered per stage for its silence window (the longest counts)
_RTT_SAMPLES = 16

#: on_message(stage index or None for the bound results socket, message, bytes received)
OnMessage = Callable[[int | None, Message, int], None]


@dataclass(frozen=True)
class LinkEvent:
    """One message on the session's links, as an observer sees it.

    Attributes:
        direction: ``"send"`` (queued to a stage, or refused when ``queued`` is False),
            ``"recv"`` (decoded from a stage or the bound results socket) or ``"use"`` (a reply
            the session took as a step's answer).
        stage: the stage's index; None for the bound results socket.
        kind: the message kind (``forward``, ``result``, ``error``, ``release``, ``ping`` ...).
        req: the request id ("" for kinds without one).
        seq: the step number within the request (-1 when the header has none).
        epoch: the pipeline generation the message carries.
        nbytes: bytes of the message (all frames).
        t_s: when it happened (``time.monotonic()``).
        queued: for sends, whether the socket took it.
        code: an error's code ("" otherwise).
        trace: a result's per-stage trace (queue, compute times, batch), as the stages wrote it.
    """

    direction: str
    stage: int | None
    kind: str
    req: str
    seq: int
    epoch: int
    nbytes: int
    t_s: float
    queued: bool = True
    code: str = ""
    trace: tuple[Any, ...] = ()


Observer = Callable[[LinkEvent], None]


def _sent_header(frames: list) -> dict:
    """The msgpack header (frame 0) of a message this client encoded."""
    try:
        h = msgpack.unpackb(bytes(getattr(frames[0], "buffer", frames[0])), raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return {}
    return h if isinstance(h, dict) else {}


def _event(direction: str, stage: int | None, msg: Message, nbytes: int) -> LinkEvent:
    trace = msg.meta.get("trace", ()) if msg.kind == "result" and isinstance(msg.meta, dict) else ()
    code = str(msg.meta.get("code", "")) if msg.kind == "error" and isinstance(msg.meta, dict) else ""
    return LinkEvent(direction, stage, msg.kind, msg.req, msg.seq, msg.epoch, nbytes, time.monotonic(), code=code,
                     trace=tuple(trace) if isinstance(trace, (list, tuple)) else ())

_LIVENESS_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
_POLL_SLICE_S = 0.05  # the loop wakes at least this often to check deadlines and liveness
_MAX_HELD_RELEASES = 256  # per stage: releases kept while its connection is down
_CONNECT_WAIT_S = 0.25  # how long replace() waits for a new process's connection to take messages
_PROBE_GONE_S = 0.3  # in a recovery's probe: a stage with a closed connection silent this long (at least) is gone


@dataclass
class _Link:
    """One stage's connection and what the loop knows about it."""

    index: int
    endpoint: str
    sock: zmq.Socket
    monitor: zmq.Socket | None = None  # disconnect events (None while a HandshakeWatch holds the socket's monitor)
    last_seen: float = 0.0  # monotonic time of the last sign of life
    reopened_at: float = 0.0
    replaced_at: float = 0.0  # when it was last pointed at a new process (replace())
    held_releases: list = field(default_factory=list)  # releases not sent yet: the connection was down
    disconnected_at: float | None = None  # the connection closed and has not come back since
    declared_down: bool = False  # a liveness check raised for it; cleared by its next message
    compute_stuck: str = ""  # why its heartbeats say the compute thread is stuck ("" while it moves)
    forwards_seen: int | None = None  # forwards its previous heartbeat reported
    longest_step_s: float = 0.0  # the longest compute time its traces reported to this client
    rtts_s: deque = field(default_factory=lambda: deque(maxlen=_RTT_SAMPLES))  # recent heartbeat round trips
    draining: list = field(default_factory=list)  # [(socket, close at)]: connections replaced by a reopen, still read
    pid: int | None = None  # the stage process's pid, from its pongs (None until one, and after a replacement)
    restarted: tuple[float, int, int] | None = None  # (when seen, old pid, new pid): its pongs came from a new process on the same connection
    restart_at: float = 0.0  # when that new process started, from its pong's uptime (monotonic, here; an upper bound)
    max_slack_s: float = float("inf")  # ClientConfig.max_rtt_slack_s: the most the round trips may widen its window

    @property
    def rtt_slack_s(self) -> float:
        """4 x the longest of its recent heartbeat round trips (0 before the first), at most
        :attr:`max_slack_s`."""
        return min(4.0 * max(self.rtts_s, default=0.0), self.max_slack_s)

    def window_s(self, base_s: float) -> float:
        """How long this stage may stay silent: ``base_s`` (heartbeat interval x liveness) plus
        :attr:`rtt_slack_s`, so a slow link or a loaded host (a pong delayed by a
        retransmission, an I/O thread that waited for a core) widens its own window instead of
        reading as a failure; on a LAN it adds milliseconds."""
        return base_s + self.rtt_slack_s

    def close_draining(self, poller: zmq.Poller, until: float = float("inf")) -> None:
        """Close the reopened-away connections due by ``until`` (all by default)."""
        for sock, _ in [d for d in self.draining if d[1] <= until]:
            poller.unregister(sock)
            sock.close(linger=0)
        self.draining = [d for d in self.draining if d[1] > until]


class StageLinks:
    """Sockets to every stage of a pipeline, one poll loop, heartbeats and liveness."""

    def __init__(
        self,
        endpoints: Sequence[str],
        config: ClientConfig,
        socket_config: SocketConfig,
        stage_keys: list[bytes] | None,
        routing_id: bytes,
        on_message: OnMessage,
    ):
        self.config = config
        self.socket_config = socket_config
        self._stage_keys = stage_keys
        self._routing_id = routing_id
        self._on_message = on_message
        self.ctx = zmq.Context.instance()
        self._poller = zmq.Poller()
        self._watch: HandshakeWatch | None = None
        self._next_ping = 0.0
        self._pongs: set[tuple[int, str]] = set()  # (stage, ping id) answered
        self._results: zmq.Socket | None = None
        self._links: list[_Link] = []
        self._observers: list[Observer] = []
        self._closed = False
        try:
            if config.reply_via == "bind":
                self._results = make_socket(self.ctx, zmq.ROUTER, socket_config, server=True)
                self._results.setsockopt(zmq.ROUTER_MANDATORY, 0)
                port = self._results.bind_to_random_port(f"tcp://{config.reply_host}", min_port=20000, max_port=60000)
                self.reply_to = f"tcp://{config.reply_host}:{port}"
                self._poller.register(self._results, zmq.POLLIN)
            else:
                self.reply_to = "peer:" + routing_id.decode()  # a 128-bit random id, sent only inside CURVE's encryption
            self.begin_handshake()
            now = time.monotonic()
            for i, ep in enumerate(endpoints):
                self._links.append(_Link(i, ep, self._open(i, ep), last_seen=now, max_slack_s=config.max_rtt_slack_s))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ sockets ------------
    @property
    def endpoints(self) -> list[str]:
        return [link.endpoint for link in self._links]

    @property
    def binds_results(self) -> bool:
        """Whether results come to a socket this client bound (``reply_via="bind"``)."""
        return self._results is not None

    def __len__(self) -> int:
        return len(self._links)

    def _open(self, i: int, endpoint: str) -> zmq.Socket:
        s = make_socket(self.ctx, zmq.DEALER, self.socket_config)
        if self._stage_keys is not None:
            set_peer_key(s, self._stage_keys[i])
        s.setsockopt(zmq.ROUTING_ID, self._routing_id)  # the stage replies (and the last stage returns results) to this id
        if self._watch is not None:
            self._watch.add(s, endpoint)  # handshake failures (wrong/missing key) surface as AuthError
        s.connect(endpoint)
        self._poller.register(s, zmq.POLLIN)
        return s

    def _start_monitor(self, link: _Link) -> None:
        # an address of our own: the one pyzmq derives from the socket's fd may still be bound
        # by the handshake watch's monitor that was just closed
        addr = f"inproc://splitnet.links.{uuid.uuid4().hex}"
        link.sock.monitor(addr, _LIVENESS_EVENTS)
        link.monitor = self.ctx.socket(zmq.PAIR)
        link.monitor.connect(addr)
        self._poller.register(link.monitor, zmq.POLLIN)

    def _stop_monitor(self, link: _Link) -> None:
        if link.monitor is None:
            return
        self._poller.unregister(link.monitor)
        try:
            link.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        link.monitor.close(linger=0)
        link.monitor = None

    def _close_link(self, link: _Link) -> None:
        self._stop_monitor(link)
        if link.sock is not None:
            self._poller.unregister(link.sock)
            link.sock.close(linger=0)

    def replace(self, i: int, endpoint: str, connect_wait_s: float = _CONNECT_WAIT_S) -> None:
        """Connect stage ``i`` to ``endpoint`` (a new process), with a fresh silence clock;
        with ``connect_wait_s``, wait up to that long for the connection to take messages (a
        message sent before it is up is dropped, and the sender would retry only later)."""
        link = self._links[i]
        self._close_link(link)
        link.close_draining(self._poller)  # an earlier reopen's connection: not read past a replacement
        link.endpoint = endpoint
        link.sock = self._open(i, endpoint)
        if connect_wait_s > 0:
            waiter = zmq.Poller()
            waiter.register(link.sock, zmq.POLLOUT)
            waiter.poll(int(connect_wait_s * 1000))  # bounded; a replacement that never connects is found by the handshake
        link.last_seen = link.replaced_at = time.monotonic()
        link.disconnected_at = None
        link.declared_down = False
        link.compute_stuck, link.forwards_seen, link.longest_step_s = "", None, 0.0
        link.pid, link.restarted = None, None
        link.held_releases = []  # a new process holds none of the caches they were for
        if self._watch is None:
            self._start_monitor(link)

    def reopen(self, i: int) -> None:
        """A fresh connection to stage ``i`` (same endpoint, same routing id); its silence clock runs on.

        The old connection is not closed at once: it is still read for one window, so a reply
        the stage wrote on it before the new connection took its routing id over (a stage that
        was only slow: stopped, swapped out, starved of a core) arrives instead of being lost
        with the socket (which would cost the request a replay)."""
        link = self._links[i]
        seen, gone, held, replaced, pid = link.last_seen, link.disconnected_at, link.held_releases, link.replaced_at, link.pid
        old, window = link.sock, link.window_s(self.window_s)
        self._stop_monitor(link)
        link.sock = None  # kept open below, not closed by replace()
        self.replace(i, link.endpoint, connect_wait_s=0.0)  # the loop goes on at once; the stage is silent anyway
        link.draining.append((old, time.monotonic() + window))
        link.last_seen, link.disconnected_at, link.held_releases, link.replaced_at, link.pid = seen, gone, held, replaced, pid
        link.reopened_at = time.monotonic()

    def _close_drained(self, now: float) -> None:
        for link in self._links:
            if link.draining:
                link.close_draining(self._poller, now)

    # ------------------------------------------------------------------ handshake phase ----
    def begin_handshake(self) -> None:
        """Sockets opened from now on report handshake failures (AuthError) until end_handshake()."""
        if self._watch is None:
            self._watch = HandshakeWatch(secure=self.socket_config.security is not None)

    def end_handshake(self) -> None:
        """Hand every socket's monitor to the disconnect watch."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for link in self._links:
            if link.monitor is None:
                self._start_monitor(link)

    # ------------------------------------------------------------------ sending ------------
    def send(self, i: int, msg: Message) -> bool:
        """Queue ``msg`` to stage ``i`` without blocking; False when it cannot take it now.

        A ``release`` that cannot be queued (the connection is down: a partition, a stage that
        is restarting) is kept, up to ``_MAX_HELD_RELEASES`` per stage, and sent once the
        connection is back (:meth:`_flush_releases`), so that a stage that comes back frees
        the caches of requests this client gave up meanwhile."""
        ok = self.send_frames(i, encode_message(msg))
        if not ok and msg.kind == "release":
            held = self._links[i].held_releases
            if msg.req not in held and len(held) < _MAX_HELD_RELEASES:
                held.append(msg.req)
        return ok

    def _flush_releases(self) -> None:
        for link in self._links:
            while link.held_releases:
                if not self.send_frames(link.index, encode_message(Message(kind="release", req=link.held_releases[0]))):
                    break
                link.held_releases.pop(0)

    def send_frames(self, i: int, frames: list) -> bool:
        try:
            self._links[i].sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            queued = True
        except zmq.Again:
            queued = False
        if self._observers:
            h = _sent_header(frames)
            seq, epoch = h.get("seq", -1), h.get("epoch", -1)
            self._notify(LinkEvent("send", i, str(h.get("kind", "")), str(h.get("req", "")), seq if type(seq) is int else -1,
                                   epoch if type(epoch) is int else -1, message_nbytes(frames), time.monotonic(), queued=queued))
        return queued

    # ------------------------------------------------------------------ observers ----------
    def observe(self, callback: Observer) -> Callable[[], None]:
        """Call ``callback(LinkEvent)`` for every message sent and received from now on, and for
        every reply the session uses; returns a function that stops it. The callback runs in
        the session's thread, inside its poll loop: keep it short, and never call the session
        from it."""
        self._observers.append(callback)

        def stop() -> None:
            if callback in self._observers:
                self._observers.remove(callback)

        return stop

    def note_used(self, stage: int | None, msg: Message, nbytes: int) -> None:
        """Tell the observers that the session took ``msg`` as a step's answer."""
        if self._observers:
            self._notify(_event("use", stage, msg, nbytes))

    def _notify(self, ev: LinkEvent) -> None:
        for cb in list(self._observers):
            cb(ev)

    def send_or_wait(self, i: int, frames: list, timeout_s: float) -> int:
        """Send ``frames`` to stage ``i``, polling (heartbeats, liveness) while it cannot take them;
        StageUnavailable when it does not within ``timeout_s``. Returns the bytes sent."""
        sent: list[bool] = []

        def try_send() -> bool:
            if not sent and self.send_frames(i, frames):
                sent.append(True)
            return bool(sent)

        self.wait_until(try_send, timeout_s, lambda: StageUnavailable(
            f"stage {i} at {self._links[i].endpoint} accepted no message within {timeout_s:.1f} s; is it running?"))
        return message_nbytes(frames)

    def ping_all(self, req: str = "hb") -> None:
        now = time.monotonic()
        for i in range(len(self._links)):
            self.send(i, Message(kind="ping", req=req, meta={"t": now}))

    # ------------------------------------------------------------------ the loop -----------
    def wait_until(
        self,
        done: Callable[[], bool],
        timeout_s: float,
        on_timeout: Callable[[], Exception],
        *,
        heartbeats: bool = True,
        liveness: bool = True,
    ) -> None:
        """Poll until ``done()`` is true; raise ``on_timeout()`` after ``timeout_s``. With
        ``heartbeats`` stages are pinged once per interval; with ``liveness`` a silent or
        disconnected stage raises StageUnavailable."""
        deadline = time.monotonic() + timeout_s
        if liveness:
            self.restart_clocks()
        while not done():
            now = time.monotonic()
            if now >= deadline:
                raise on_timeout()
            if heartbeats and now >= self._next_ping:
                self.ping_all()
                self._next_ping = now + self.config.heartbeat_interval_s
            slice_s = min(deadline - now, _POLL_SLICE_S, max(self._next_ping - now, 0.001) if heartbeats else _POLL_SLICE_S)
            if liveness and self._links:  # wake when the first silent window ends: detection takes one window, not one window + a slice
                base = self.window_s
                slice_s = min(slice_s, max(min(link.last_seen + link.window_s(base) for link in self._links) - now + 0.001, 0.001))
            self.poll(slice_s)
            if self._watch is not None:
                self._watch.check()
            if any(link.held_releases for link in self._links):
                self._flush_releases()
            if liveness:
                self.check_liveness()

    def poll(self, timeout_s: float) -> None:
        """Receive whatever arrives within ``timeout_s`` (at least 1 ms)."""
        for sock, _ in self._poller.poll(max(1, int(timeout_s * 1000))):
            if sock is self._results:
                frames = sock.recv_multipart(copy=False)
                self._deliver(None, frames[1:])
                continue
            link = self._link_of(sock)
            if link is None:
                continue
            if sock is link.monitor:
                self._monitor_events(link)
            else:
                link.last_seen = time.monotonic()
                link.declared_down = False
                self._deliver(link.index, sock.recv_multipart(copy=False))
        if any(link.draining for link in self._links):
            self._close_drained(time.monotonic())

    def _link_of(self, sock: zmq.Socket) -> _Link | None:
        for link in self._links:
            if sock is link.sock or sock is link.monitor or any(sock is d[0] for d in link.draining):
                return link
        return None

    def _deliver(self, stage: int | None, body: list, decoded: tuple[Message, int] | None = None) -> None:
        """Handle received frames; ``decoded``: a result split off a ``result_batch`` (its
        message and its share of the batch's bytes), delivered as a result of its own."""
        if decoded is None:
            try:
                msg = decode_message(body, DEFAULT_LIMITS)
                batch = split_batch(msg) if msg.kind == "result_batch" else None
            except (ProtocolError, AuthError):
                return  # a malformed reply is dropped; the request then times out with a clear error
            if batch is not None:  # many of this client's results in one message: each goes on as one result
                shares = member_shares([m.rows for m in batch[0].members], message_nbytes([getattr(f, "buffer", f) for f in body]))
                for part, share in zip(batch[1], shares):
                    self._deliver(stage, body, (part, share))
                return
        else:
            msg = decoded[0]
        nbytes = decoded[1] if decoded is not None else message_nbytes([getattr(f, "buffer", f) for f in body])
        if self._observers:
            self._notify(_event("recv", stage, msg, nbytes))
        if stage is not None and msg.kind == "ping":  # the stage asks who holds this connection before it sends a result
            self.send(stage, Message(kind="pong", req=msg.req, seq=msg.seq))
            return
        if stage is not None and msg.kind in ("pong", "info_reply"):
            sent = msg.meta.get("t")  # our own clock, echoed: a round trip (a value we never sent is ignored)
            rtt = time.monotonic() - sent if isinstance(sent, float) else -1.0
            if 0.0 <= rtt <= 60.0:
                self._links[stage].rtts_s.append(rtt)
        if stage is not None and msg.kind == "pong":
            self._pongs.add((stage, msg.req))
            self._note_pid(self._links[stage], msg.meta.get("pid"), msg.meta.get("up_s"))
            self._check_progress(self._links[stage], msg.meta.get("progress"))
            return
        if msg.kind == "result":  # a result proves every stage in its trace worked on it
            now = time.monotonic()
            for t in msg.meta.get("trace", []):
                if isinstance(t, dict) and type(t.get("stage")) is int and 0 <= t["stage"] < len(self._links):
                    link = self._links[t["stage"]]
                    link.last_seen = now
                    if isinstance(t.get("compute_ms"), (int, float)):
                        link.longest_step_s = max(link.longest_step_s, float(t["compute_ms"]) / 1e3)
        self._on_message(stage, msg, nbytes)

    @staticmethod
    def _note_pid(link: _Link, pid: object, up_s: object = None) -> None:
        """A pong from another pid than the last on the same endpoint: the process was restarted
        in place (a supervisor, a restart on a known port) between two heartbeats, faster than
        the disconnect grace; whatever it held or owed is gone. ``up_s`` (its uptime) dates the
        new process: now minus it, later than the truth by the pong's way here."""
        if type(pid) is not int:
            return
        if link.pid is not None and pid != link.pid:
            now = time.monotonic()
            link.restarted = (now, link.pid, pid)
            link.restart_at = now - float(up_s) if isinstance(up_s, (int, float)) and 0 <= up_s else now
        link.pid = pid

    def accept_process(self, i: int, pid: object) -> None:
        """Take ``pid`` as stage ``i``'s process from now on (a recovery has dealt with its
        restart): a pong from it is no restart, and one already seen is forgotten."""
        if type(pid) is int:
            link = self._links[i]
            link.pid, link.restarted = pid, None

    def restarted_since(self, since_s: float, opened_s: float = 0.0) -> tuple[int, int, int] | None:
        """(stage, old pid, new pid) of a stage whose process was restarted in place after
        ``since_s`` (monotonic): replies it owed for work sent before are lost. None when none.
        ``opened_s``: when the oldest request waited for was opened; a restart whose new process
        is older than that (a client idle meanwhile, which sends no heartbeats, learns of it only
        from its next request's first pong) lost none of that work."""
        for link in self._links:
            if link.restarted is not None and link.restarted[0] > since_s and not (opened_s and link.restart_at < opened_s):
                return link.index, link.restarted[1], link.restarted[2]
        return None

    def _check_progress(self, link: _Link, progress: object) -> None:
        """Liveness that sees the work: a heartbeat whose compute thread has not ticked for
        ``compute_stall_s`` (and 4 x the longest step seen on this stage), with no forward
        done since the previous heartbeat, marks the stage stuck; one that moves clears it."""
        if not isinstance(progress, dict):
            return
        forwards, age = progress.get("forwards"), progress.get("compute_tick_age_s")
        if type(forwards) is not int or not isinstance(age, (int, float)):
            return
        limit = max(self.config.compute_stall_s, 4 * link.longest_step_s)
        moved = link.forwards_seen is None or forwards != link.forwards_seen
        link.forwards_seen = forwards
        wait, bound = progress.get("send_wait_s"), progress.get("send_timeout_s")
        if isinstance(wait, (int, float)) and isinstance(bound, (int, float)) and 0 < wait <= bound + 1.0 and not self._next_answers(link, progress):
            moved = True  # inside a send the stage bounds itself (a next stage that does not take it): it ends, or fails the step, by then
        if age > limit and not moved:
            if not link.compute_stuck:
                log.warning("stage %d at %s: compute thread stuck for %.1f s (%s steps queued)", link.index, link.endpoint, age, progress.get("queued"))
            link.compute_stuck = (f"its compute thread has finished no step for {age:.1f} s (limit {limit:.1f} s, "
                                  f"{progress.get('queued')} steps queued); its I/O thread answers but the work does not move")
        else:
            link.compute_stuck = ""

    def _next_answers(self, link: _Link, progress: dict) -> bool:
        """Whether a send ``link``'s stage reports in progress goes to this client's own next
        stage (same endpoint and key: :func:`hop_digest`) while that stage answers this
        client's heartbeats (heard from within two intervals). Its I/O thread then reads
        whatever arrives, so a send there does not block for long: a compute thread "inside a
        send" for seconds is frozen, not waiting for a slow peer. A send elsewhere (another
        client's route, a key that does not authenticate) is bounded and is not its fault."""
        target = progress.get("send_to")
        if not isinstance(target, str) or not target or link.index + 1 >= len(self._links):
            return False
        nxt = self._links[link.index + 1]
        key = self._stage_keys[nxt.index] if self._stage_keys is not None and nxt.index < len(self._stage_keys) else None
        if target != hop_digest(nxt.endpoint, key):
            return False
        return time.monotonic() - nxt.last_seen <= 2 * self.config.heartbeat_interval_s

    def _monitor_events(self, link: _Link) -> None:
        while link.monitor is not None:
            try:
                ev = recv_monitor_message(link.monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                if link.disconnected_at is None:
                    link.disconnected_at = time.monotonic()
                    log.info("stage %d at %s closed its connection", link.index, link.endpoint)
            elif ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.disconnected_at = None

    # ------------------------------------------------------------------ liveness -----------
    @property
    def window_s(self) -> float:
        """The base of every stage's silence window: heartbeat interval x liveness (each stage's
        own window adds its measured round trips: :meth:`stage_window_s`)."""
        return self.config.heartbeat_interval_s * self.config.heartbeat_liveness

    def stage_window_s(self, i: int) -> float:
        """How long stage ``i`` may stay silent now (the base window + 4 x its recent round trips)."""
        return self._links[i].window_s(self.window_s)

    def restart_clocks(self) -> None:
        """Silence counts from the start of a wait at the earliest (time between requests is not silence)."""
        now = time.monotonic()
        for link in self._links:
            link.last_seen = max(link.last_seen, now)

    def silent_s(self, i: int) -> float:
        return time.monotonic() - self._links[i].last_seen

    def lost_reply_suspect(self, since_s: float) -> int | None:
        """A stage whose connection was reopened after ``since_s`` (monotonic), that has spoken
        on the new connection, and whose reply still has not come ``max(window, 4 x its longest
        step)`` after the reopen: a reply it sent while the old connection was being replaced
        is lost (libzmq drops what was queued for a closed pipe). None when there is none.
        A replay is the cure; a false alarm costs one replay, never a wrong token."""
        now = time.monotonic()
        for link in self._links:
            if link.reopened_at > since_s and link.last_seen > link.reopened_at:
                if now - link.reopened_at > max(link.window_s(self.window_s), 4 * link.longest_step_s):
                    return link.index
        return None

    def is_down(self, i: int) -> bool:
        """Whether stage ``i`` is known dead now: a liveness check found it silent for a whole
        window (and it said nothing since), or it is disconnected past the grace."""
        link, now = self._links[i], time.monotonic()
        if link.declared_down or link.compute_stuck:
            return True
        return link.disconnected_at is not None and now - link.disconnected_at > self.config.disconnect_grace_s

    def check_liveness(self) -> None:
        """Raise StageUnavailable for a stage that is down; half-way through a silent window,
        close and reopen its connection once (lazy pirate)."""
        now = time.monotonic()
        base = self.window_s
        for link in self._links:
            silent = now - link.last_seen
            window = link.window_s(base)
            if link.compute_stuck:
                link.declared_down = True
                raise StageUnavailable(f"stage {link.index} at {link.endpoint}: {link.compute_stuck}")
            if link.disconnected_at is not None and now - link.disconnected_at > self.config.disconnect_grace_s:
                link.declared_down = True
                raise StageUnavailable(
                    f"stage {link.index} at {link.endpoint} closed its connection {now - link.disconnected_at:.1f} s ago "
                    "and has not come back; the process is gone or restarting"
                )
            if silent > window / 2 and now - link.reopened_at > window:
                log.info("stage %d at %s silent for %.1f s: reopening the connection", link.index, link.endpoint, silent)
                self.reopen(link.index)
            if silent > window:
                link.declared_down = True
                raise StageUnavailable(
                    f"stage {link.index} at {link.endpoint} missed {self.config.heartbeat_liveness} heartbeats "
                    f"({silent:.1f} s silent, window {window:.1f} s); the process or its link is down"
                )

    def silent_stages(self, suspects: Sequence[int] = ()) -> list[int]:
        """Stages that are down: those already known down count at once, and so do
        ``suspects`` (e.g. replacements whose handshake just failed) that have said nothing since
        they were connected; the others are pinged and each gets one liveness window to answer
        (any message counts)."""
        self.poll(0.001)  # events and replies already queued
        dead = {i for i in range(len(self._links)) if self.is_down(i)}
        dead |= {i for i in suspects if 0 <= i < len(self._links) and self._links[i].last_seen <= self._links[i].replaced_at}
        start = time.monotonic()
        probe = f"probe-{start:.6f}"
        answered: set[int] = set()
        before = {link.index: link.last_seen for link in self._links}

        def settled() -> bool:
            for link in self._links:
                if link.compute_stuck:
                    dead.add(link.index)  # it answers, but its work does not move
                    answered.discard(link.index)
                elif link.index not in dead and (link.last_seen > before[link.index] or (link.index, probe) in self._pongs):
                    answered.add(link.index)
                elif link.index not in answered and self.is_down(link.index):
                    dead.add(link.index)  # its connection closed during the probe and did not come back within the grace
                elif (link.index not in answered and link.disconnected_at is not None
                      and time.monotonic() - max(start, link.disconnected_at) > max(_PROBE_GONE_S, link.rtt_slack_s)):
                    # a recovery is under way, its connection is closed and it answered no probe in
                    # several of its round trips: gone (the disconnect grace, which waits for a
                    # restart on the same endpoint, would only delay the replacement)
                    dead.add(link.index)
            return len(answered) + len(dead) >= len(self._links)

        next_ping = [0.0]

        def settled_or_ping() -> bool:
            if settled():
                return True
            if time.monotonic() >= next_ping[0]:
                for i in range(len(self._links)):
                    if i not in dead and i not in answered:
                        self.send(i, Message(kind="ping", req=probe))
                next_ping[0] = time.monotonic() + min(0.2, self.window_s / 3)
            return False

        try:
            probe_s = max((link.window_s(self.window_s) for link in self._links), default=self.window_s)
            self.wait_until(settled_or_ping, probe_s, lambda: TimeoutError(), heartbeats=False, liveness=False)
        except TimeoutError:
            pass
        self._pongs = {p for p in self._pongs if p[1] != probe}
        return sorted(i for i in range(len(self._links)) if i not in answered)

    def ping(self, i: int, timeout_s: float) -> float:
        """Round-trip time (ms) of one ping to stage ``i``."""
        req = f"p{i}-{time.monotonic():.6f}"
        t0 = time.perf_counter()
        if not self.send(i, Message(kind="ping", req=req, meta={"t": time.monotonic()})):
            raise StageUnavailable(f"stage {i} at {self._links[i].endpoint} is not connected")
        self.wait_until(lambda: (i, req) in self._pongs, timeout_s, lambda: StageUnavailable(
            f"stage {i} at {self._links[i].endpoint} did not answer a ping within {timeout_s} s"), heartbeats=False, liveness=False)
        self._pongs.discard((i, req))
        return (time.perf_counter() - t0) * 1e3

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        for link in self._links:
            self._stop_monitor(link)
            link.sock.close(linger=0)
            link.close_draining(self._poller)
        if self._results is not None:
            self._results.close(linger=0)


__all__ = ["LinkEvent", "Observer", "OnMessage", "StageLinks"]
