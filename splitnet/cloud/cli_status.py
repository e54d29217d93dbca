"""``splitnet status ENDPOINT...``: is each stage alive, what does it serve, how loaded is it.

Each stage is asked over its control protocol (the ``info`` message the SDK's handshake sends;
answered by the stage's I/O thread even while a long forward runs), with the same keys as
``connect()`` (CURVE by default; plaintext without ``--client-key``). Stages are probed one
by one and independently: a dead or refusing stage is reported and the others still are.
Two answers ``--sample-s`` apart give the busy fraction (compute time over wall time); the
second one's round trip is the RTT.

Exit code: 0 when every stage answered, 1 when any did not, 2 for a usage mistake. Docker and
Kubernetes health checks run it against their own stage: ``splitnet status tcp://127.0.0.1:5555``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from splitnet.errors import ConfigError, SplitnetError


@dataclass
class StageStatus:
    endpoint: str
    live: bool = False
    error: str = ""
    model: str = ""
    kind: str = ""
    fingerprint: str = ""
    blocks: list[int] = field(default_factory=list)
    num_blocks: int | None = None
    stage_index: int | None = None
    pid: int | None = None
    codec_out: str = ""
    queue_depth: int | None = None
    cached_requests: int | None = None
    busy_fraction: float | None = None
    forwards: int | None = None
    errors: int | None = None
    rtt_ms: float | None = None
    metrics_url: str = ""


def _ask_info(sock: Any, watch: Any, timeout_s: float) -> tuple[dict, float]:
    """Send ``info`` until answered (a send before the connection is up is dropped); the reply's
    meta and the round-trip of the answered send (ms)."""
    import zmq

    from splitnet.errors import error_from_code
    from splitnet.wire import DEFAULT_LIMITS, Message, decode_message, encode_message

    deadline = time.monotonic() + timeout_s
    next_send, sent_at, n = 0.0, 0.0, 0
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"no answer within {timeout_s:g} s")
        if now >= next_send:
            try:
                sock.send_multipart(encode_message(Message(kind="info", req=f"status-{n}")), flags=zmq.NOBLOCK)
                sent_at = time.perf_counter()
                n += 1
            except zmq.Again:
                pass  # not connected yet
            next_send = now + 0.2
        watch.check()
        if sock.poll(int(max(1, min(0.05, deadline - now) * 1000))):
            msg = decode_message(sock.recv_multipart(copy=False), DEFAULT_LIMITS)
            if msg.kind == "info_reply":
                return dict(msg.meta), (time.perf_counter() - sent_at) * 1e3
            if msg.kind == "error":
                raise error_from_code(str(msg.meta.get("code")), str(msg.meta.get("msg")))


def probe_stage(endpoint: str, socket_config: Any, peer_key: bytes | None, timeout_s: float, sample_s: float) -> StageStatus:
    """The status of the stage at ``endpoint`` (never raises for a dead or refusing stage)."""
    import zmq

    from splitnet.wire import make_socket
    from splitnet.wire.security import HandshakeWatch, set_peer_key

    st = StageStatus(endpoint)
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, socket_config)
    watch = HandshakeWatch(secure=socket_config.security is not None)
    try:
        if peer_key is not None:
            set_peer_key(sock, peer_key)
        watch.add(sock, endpoint)
        sock.connect(endpoint)
        first, _ = _ask_info(sock, watch, timeout_s)
        t_first = time.perf_counter()
        time.sleep(sample_s)
        info, rtt = _ask_info(sock, watch, timeout_s)
        elapsed = time.perf_counter() - t_first
        st.live, st.rtt_ms = True, round(rtt, 3)
        st.model, st.kind, st.fingerprint = str(info.get("model", "")), str(info.get("kind", "")), str(info.get("fingerprint", ""))
        st.blocks = list(info.get("blocks") or [])
        st.num_blocks, st.stage_index, st.pid = info.get("num_blocks"), info.get("stage_index"), info.get("pid")
        st.codec_out, st.metrics_url = str(info.get("codec_out", "")), str(info.get("metrics_url", ""))
        st.queue_depth, st.cached_requests = info.get("queue_depth"), info.get("cached_requests")
        stats, stats0 = info.get("stats") or {}, first.get("stats") or {}
        st.forwards, st.errors = stats.get("forwards"), stats.get("errors")
        if isinstance(stats.get("busy_s"), (int, float)) and isinstance(stats0.get("busy_s"), (int, float)) and elapsed > 0:
            st.busy_fraction = round(min(1.0, max(0.0, (stats["busy_s"] - stats0["busy_s"]) / elapsed)), 3)
    except (SplitnetError, TimeoutError, zmq.ZMQError) as e:
        st.error = f"{type(e).__name__}: {e}" if not isinstance(e, TimeoutError) else str(e)
    finally:
        watch.close()
        sock.close(linger=0)
    return st


def probe(endpoints: list[str], client_config: Any, timeout_s: float = 3.0, sample_s: float = 0.5) -> list[StageStatus]:
    """Status of every stage in ``endpoints`` with ``client_config``'s keys (one by one)."""
    from splitnet.wire import SocketConfig
    from splitnet.wire.security import client_curve_config, load_server_keys

    keys: list[bytes | None] = [None] * len(endpoints)
    socket_config = SocketConfig()
    if client_config.client_key:
        socket_config = SocketConfig(security=client_curve_config(client_config.client_key, client_config.server_key, transport=client_config.transport))
        given = list(load_server_keys(client_config.server_key))
        if len(given) not in (1, len(endpoints)):
            raise ConfigError(f"{len(given)} stage public keys for {len(endpoints)} endpoints: give one key for all, or one per endpoint in order")
        keys = given * len(endpoints) if len(given) == 1 else given
    return [probe_stage(ep, socket_config, k, timeout_s, sample_s) for ep, k in zip(endpoints, keys)]


def chain_problem(stages: list[StageStatus]) -> str:
    """Why the live stages, in the order given, do not form one pipeline ("" when they do)."""
    if not stages or not all(s.live for s in stages) or len(stages) < 2:
        return ""
    if len({s.fingerprint for s in stages}) != 1:
        return "the stages serve different models"
    expected = 0
    for s in stages:
        if not s.blocks or s.blocks[0] != expected:
            return f"{s.endpoint} serves blocks {s.blocks[0]}:{s.blocks[1]}, the pipeline needs it to start at block {expected}" if s.blocks else "a stage reports no blocks"
        expected = s.blocks[1]
    if expected != stages[0].num_blocks:
        return f"the stages cover blocks 0:{expected} of {stages[0].num_blocks}"
    return ""


def _table(stages: list[StageStatus]) -> str:
    def fmt(v: Any, spec: str = "") -> str:
        return "-" if v is None or v == "" else format(v, spec)

    rows = [("endpoint", "live", "model", "blocks", "queue", "busy", "rtt_ms", "pid", "error")]
    for s in stages:
        blocks = f"{s.blocks[0]}:{s.blocks[1]}" if len(s.blocks) == 2 else "-"
        busy = f"{s.busy_fraction:.0%}" if s.busy_fraction is not None else "-"
        rows.append((s.endpoint, "yes" if s.live else "NO", fmt(s.model), blocks, fmt(s.queue_depth), busy, fmt(s.rtt_ms, ".2f"), fmt(s.pid), s.error))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + ("  " + r[-1] if r[-1] else "") for r in rows)


def run(args: argparse.Namespace) -> int:
    from splitnet.cloud.api.client_options import client_config

    try:
        if args.timeout_s <= 0 or args.sample_s < 0:
            raise ConfigError("--timeout-s must be positive and --sample-s >= 0")
        endpoints = [e.strip() for arg in args.endpoints for e in arg.split(",") if e.strip()]
        bad = [e for e in endpoints if not e.startswith(("tcp://", "ipc://"))]
        if bad:
            raise ConfigError(f"stage endpoints look like tcp://HOST:PORT, got {bad}")
        stages = probe(endpoints, client_config(args), args.timeout_s, args.sample_s)
    except SplitnetError as e:
        print(f"splitnet status: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    live = all(s.live for s in stages)
    problem = chain_problem(stages)
    if args.json:
        print(json.dumps({"live": live, "pipeline_problem": problem, "stages": [asdict(s) for s in stages]}, indent=1))
    else:
        print(_table(stages))
        if problem:
            print(f"note: as one pipeline in this order: {problem}")
    return 0 if live else 1


def register(sub: argparse._SubParsersAction) -> None:
    from splitnet.cloud.api.client_options import add_client_arguments

    p = sub.add_parser("status", help="ping stages: liveness, model, blocks, load and RTT of each (exit 0 when all are live)")
    p.add_argument("endpoints", nargs="+", help="stage endpoints (tcp://HOST:PORT), separate or comma-separated")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--timeout-s", type=float, default=3.0, help="longest wait for each stage's answer")
    p.add_argument("--sample-s", type=float, default=0.5, help="time between the two answers the busy fraction is measured over (0: no wait)")
    add_client_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splitnet")
    register(p.add_subparsers())
    args = p.parse_args(["status", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
