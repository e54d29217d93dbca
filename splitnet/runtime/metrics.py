"""Prometheus metrics and a health route for one stage process (``serve-stage --metrics-port``).

The worker calls a handful of hooks (:meth:`StageMetrics.observe_batch` where it counts a
forward, :meth:`StageMetrics.observe_refusal` where it answers with a typed error,
:meth:`StageMetrics.tick` once per I/O loop, :meth:`StageMetrics.handshake_refused` for its
socket monitor's events); everything else (queue depth, cached requests, the worker's own byte
and error counters) is read from the worker when Prometheus scrapes, so serving costs nothing
between scrapes. With metrics off the worker holds a :class:`NullStageMetrics` whose hooks do
nothing, and prometheus-client is never imported.

The HTTP server is prometheus-client's WSGI server (a thread of this process, bound to the
stage's host): ``GET /metrics`` (Prometheus text format) and ``GET /health`` (JSON, 200 while the
I/O loop turns, 503 once it has stalled or the worker is stopping).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from splitnet.errors import ConfigError

#: an I/O loop that has not turned for this long is reported unhealthy (it polls every 0.1 s)
STALL_S = 5.0

#: forward latency buckets (seconds): a decode step of a tiny model on a CPU to a long prefill
FORWARD_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class StageIdentity:
    """What labels every metric of one stage process."""

    stage_index: int
    model: str
    start_block: int
    end_block: int


def is_auth_failure(event_frames: list) -> bool:
    """Whether a ZeroMQ socket-monitor event is a handshake refused for its key (ZAP said no)."""
    import zmq
    from zmq.utils.monitor import parse_monitor_message

    try:
        return parse_monitor_message(event_frames)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    except (ValueError, KeyError, TypeError):
        return False


class NullStageMetrics:
    """The hooks of :class:`StageMetrics`, doing nothing (``--metrics-port`` not given)."""

    url = ""

    def observe_batch(self, batch_size: int, forward_s: float, tokens: int, bytes_in: int) -> None:
        pass

    def observe_refusal(self, code: str) -> None:
        pass

    def handshake_refused(self, event_frames: list) -> bool:
        return is_auth_failure(event_frames)

    def tick(self) -> None:
        pass

    def bind_worker(self, worker: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _WorkerCounters:
    """A prometheus-client collector that reads the worker's own counters when scraped."""

    def __init__(self, labels: dict[str, str], read: Callable[[], dict[str, Any]]):
        self.labels, self.read = labels, read

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        names, values = list(self.labels), list(self.labels.values())
        snap = self.read()
        if not snap:
            return
        counters = [
            ("splitnet_stage_forwards", "Requests (prefill chunks, decode steps, encoder batches) this stage computed and sent on", "forwards"),
            ("splitnet_stage_errors", "Messages this stage answered with a typed error", "errors"),
            ("splitnet_stage_bytes_out", "Bytes this stage sent on: to the next stage (its outgoing cut) or results to clients", "bytes_out"),
            ("splitnet_stage_busy_seconds", "Seconds this stage spent in forwards", "busy_s"),
            ("splitnet_stage_replies_refused", "Results not delivered because the routing id was held by another key", "replies_refused"),
        ]
        for name, doc, key in counters:
            if key in snap:
                c = CounterMetricFamily(name, doc, labels=names)
                c.add_metric(values, float(snap[key]))
                yield c
        gauges = [
            ("splitnet_stage_queue_depth", "Messages waiting for the compute thread", "queue_depth"),
            ("splitnet_stage_cached_requests", "Requests holding a KV cache on this stage", "cached_requests"),
            ("splitnet_stage_max_batch", "Largest batch one forward has combined since start", "max_batch"),
        ]
        for name, doc, key in gauges:
            if key in snap:
                g = GaugeMetricFamily(name, doc, labels=names)
                g.add_metric(values, float(snap[key]))
                yield g


class StageMetrics:
    """Collectors of one stage in their own registry, served over HTTP on ``host:port``.

    ``port`` 0 picks a free port; :attr:`url` says which. Binding happens here, before the
    worker loads its model, so a taken port fails at once."""

    def __init__(self, identity: StageIdentity, host: str, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.identity = identity
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"stage": str(identity.stage_index)}
        names = list(self.labels)
        self._batch = Histogram("splitnet_stage_batch_size", "Requests combined in one forward", names, buckets=BATCH_BUCKETS, registry=self.registry).labels(**self.labels)
        self._forward = Histogram("splitnet_stage_forward_seconds", "Time of one (batched) forward of this stage's blocks", names,
                                  buckets=FORWARD_BUCKETS_S, registry=self.registry).labels(**self.labels)
        self._tokens = Counter("splitnet_stage_tokens", "Tokens (positions) this stage computed", names, registry=self.registry).labels(**self.labels)
        self._bytes_in = Counter("splitnet_stage_bytes_in", "Wire bytes of the forwards this stage computed: its incoming cut (stage 0: from the clients)",
                                 names, registry=self.registry).labels(**self.labels)
        self._refusals = Counter("splitnet_stage_refusals", "Messages answered with a typed error, by error code", [*names, "code"], registry=self.registry)
        self._auth = Counter("splitnet_stage_auth_refusals", "Connections or messages refused for their key (CURVE handshake or message authentication)",
                             names, registry=self.registry).labels(**self.labels)
        self._replays = Counter("splitnet_stage_replay_requests", "Decode steps refused because this stage holds no cache for them (the client replays the request from its log)",
                                names, registry=self.registry).labels(**self.labels)
        info = Gauge("splitnet_stage_info", "Which model and blocks this stage serves (value 1)", [*names, "model", "blocks"], registry=self.registry)
        info.labels(model=identity.model, blocks=f"{identity.start_block}:{identity.end_block}", **self.labels).set(1)
        self._worker: Any = None
        self.registry.register(_WorkerCounters(self.labels, self._snapshot))
        self._last_tick = time.monotonic()
        self._stopping = False
        self._server, self._thread = _serve(self._wsgi_app(), host, port)
        bound_host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else host
        self.url = f"http://{bound_host}:{self._server.server_port}"

    # ---------------------------------------------------------------- hooks (worker threads) --
    def observe_batch(self, batch_size: int, forward_s: float, tokens: int, bytes_in: int) -> None:
        """One forward of ``batch_size`` requests took ``forward_s``, computed ``tokens``, and its
        inputs crossed the wire as ``bytes_in``."""
        self._batch.observe(batch_size)
        self._forward.observe(forward_s)
        self._tokens.inc(tokens)
        self._bytes_in.inc(bytes_in)

    def observe_refusal(self, code: str) -> None:
        """The worker answered a message with a typed error of ``code``."""
        self._refusals.labels(code=code, **self.labels).inc()
        if code == "auth":
            self._auth.inc()
        elif code == "unknown_request":
            self._replays.inc()

    def handshake_refused(self, event_frames: list) -> bool:
        """Count a monitor event that is a refused CURVE handshake; True when it was one."""
        if is_auth_failure(event_frames):
            self._auth.inc()
            return True
        return False

    def tick(self) -> None:
        """The I/O loop turned (health sees a stalled loop)."""
        self._last_tick = time.monotonic()

    def bind_worker(self, worker: Any) -> None:
        """Read queue depth and counters from ``worker`` at scrape time."""
        self._worker = worker

    def close(self) -> None:
        self._stopping = True
        self._server.shutdown()
        self._server.server_close()

    # ---------------------------------------------------------------- scrape side -------------
    def _snapshot(self) -> dict[str, Any]:
        w = self._worker
        if w is None:
            return {}
        snap = dict(w.stats)
        snap["queue_depth"] = w.work.qsize()
        snap["cached_requests"] = len(w.caches.caches)
        return snap

    def health(self) -> tuple[bool, dict[str, Any]]:
        stalled_s = time.monotonic() - self._last_tick
        loading = self._worker is None
        ok = not self._stopping and not loading and stalled_s < STALL_S
        status = "ok" if ok else ("loading" if loading else ("stopping" if self._stopping else "stalled"))
        snap = self._snapshot()
        body = {
            "status": status,
            "stage_index": self.identity.stage_index,
            "model": self.identity.model,
            "blocks": [self.identity.start_block, self.identity.end_block],
            "io_loop_seconds_ago": round(stalled_s, 3),
            "queue_depth": snap.get("queue_depth"),
            "cached_requests": snap.get("cached_requests"),
        }
        return ok, body

    def _wsgi_app(self) -> Callable:
        from prometheus_client import make_wsgi_app

        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)
            if path == "/health":
                ok, body = self.health()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
                return [json.dumps(body).encode()]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics or /health\n"]

        return app


def _serve(app: Callable, host: str, port: int) -> tuple[Any, threading.Thread]:
    """prometheus-client's threaded WSGI server for ``app`` on ``host:port``, in a daemon thread."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not logged
            pass

    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=QuietHandler)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}); pick a free --metrics-port, or 0 for any") from e
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="splitnet-metrics", daemon=True)
    thread.start()
    return server, thread


def stage_metrics(identity: StageIdentity, bind: str, port: int | None) -> StageMetrics | NullStageMetrics:
    """The metrics of a stage bound at ``bind`` (its ZeroMQ endpoint): served on that host's
    ``port`` (None: off)."""
    if port is None:
        return NullStageMetrics()
    host = "127.0.0.1"
    if bind.startswith("tcp://"):
        host = bind[len("tcp://"):].rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        if host == "*":
            host = "0.0.0.0"
    return StageMetrics(identity, host, port)
