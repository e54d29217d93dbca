"""Hardening: fuzz the frame decoder and a live stage worker, RSS growth, CURVE overhead.

Figures (one JSON document):

- ``inputs_tried``: decoder inputs (mutated valid messages, random msgpack, random bytes, frame
  count/size mismatches) plus messages sent to a real ``serve-stage`` process (minilm block 0)
  through its ROUTER, some mutated past the decoder into the request handler and compute thread;
- ``typed_errors``: inputs answered with a :class:`SplitnetError` (decoder) or an ``error``
  message (worker); ``crashes``: any other exception from the decoder, plus a worker that died or
  stopped answering pings (must be 0); ``worker_alive_after``: a ping after the fuzzing;
- ``rss_growth_pct``: the worker's RSS after ``--rss-requests`` valid requests vs after warm-up;
- ``curve_overhead_pct``: 1 - (keyed throughput / plaintext throughput) for 4 MiB tensors between
  two contexts on loopback (splitnet framing, ROUTER/DEALER, as between two stages), for the
  keyed transport (libzmq's CurveZMQ, the default with keys).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

from splitnet.errors import SplitnetError
from splitnet.wire import Message, SocketConfig, decode_message, encode_message, make_socket
from splitnet.wire.limits import WireLimits

_FUZZ_LIMITS = WireLimits(max_header_bytes=16 * 1024, max_tensors=16, max_tensor_bytes=4 * 1024 * 1024, max_message_bytes=16 * 1024 * 1024)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small counts (about a minute)")
    p.add_argument("--decoder-inputs", type=int, default=None, help="decoder fuzz inputs (default 100000; quick 5000)")
    p.add_argument("--worker-inputs", type=int, default=None, help="messages fuzzed into a live worker (default 20000; quick 1000)")
    p.add_argument("--rss-requests", type=int, default=None, help="valid requests for RSS growth (default 10000; quick 1000)")
    p.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------- input generation ---------
def _valid(rng: random.Random, reply_to: str = "tcp://127.0.0.1:1", req: str | None = None) -> list[bytes]:
    n = rng.randint(1, 8)
    ids = np.array([[rng.randint(0, 30000) for _ in range(n)]], dtype=np.int64)
    msg = Message(kind="forward", req=req or f"r{rng.randint(0, 9)}", seq=rng.randint(0, 3),
                  tensors={"input_ids": ids, "attention_mask": np.ones_like(ids)},
                  meta={"reply_to": reply_to, "route": [], "cache": False})
    return [bytes(f) for f in encode_message(msg)]


def _random_obj(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([None, True, -1, 2**63 - 1, -(2**63), 1.5e308, "", "x" * rng.randint(0, 50), b"\x00\xff", 0, 2**40])
    if r < 0.65:
        return [_random_obj(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["v", "kind", "req", "seq", "epoch", "tensors", "meta", "name", "dtype", "shape", "nbytes", "reply_to", "route", "pos", "cache"]
    return {rng.choice(keys): _random_obj(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def _mutate_header(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    h = msgpack.unpackb(frames[0], raw=False)
    choice = rng.randrange(10)
    if choice == 0:
        h[rng.choice(list(h))] = _random_obj(rng)
    elif choice == 1 and h["tensors"]:
        d = rng.choice(h["tensors"])
        d[rng.choice(["name", "dtype", "shape", "nbytes"])] = _random_obj(rng)
    elif choice == 2 and h["tensors"]:
        d = rng.choice(h["tensors"])
        d["shape"] = [rng.choice([0, 1, 7, 2**31, 2**62, -1]) for _ in range(rng.randint(0, 10))]
    elif choice == 3:
        h["meta"][rng.choice(["reply_to", "route", "pos", "cache", "all_logits", "codecs", "trace", "want_result", "reply_key", "route_keys"])] = _random_obj(rng)
    elif choice == 4:
        h["tensors"] = h["tensors"] * rng.randint(0, 20)
    elif choice == 5:
        h["kind"] = rng.choice(["ping", "info", "release", "result", "pong", "error", "ack", "bogus", "forward"])
    elif choice == 6 and h["tensors"]:
        d = rng.choice(h["tensors"])
        d["dtype"] = rng.choice(["f32", "f16", "bf16", "i8", "u8", "i64", "f64", "c64", "object", "bool"])
    elif choice == 7:
        h["meta"]["route"] = ["tcp://127.0.0.1:1"] * rng.randint(0, 100)
    elif choice == 8:
        h["v"] = rng.choice([0, 2, "1", None, 1])
    else:
        h["meta"]["pos"] = rng.choice([-1, 0, 10**6, "0", None])
    raw = msgpack.packb(h, use_bin_type=True)
    return [raw, *frames[1:]]


def _mutate_bytes(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    i = rng.randrange(len(frames))
    b = bytearray(frames[i])
    choice = rng.randrange(6)
    if choice == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        b = b[: rng.randint(0, len(b))]
    elif choice == 2:
        b += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    elif choice == 3:
        frames.pop(i)
        return frames or [b""]
    elif choice == 4:
        frames.append(bytes(rng.randint(0, 64)))
        return frames
    else:
        b = bytearray(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 256))))
    frames[i] = bytes(b)
    return frames


def fuzz_input(rng: random.Random, reply_to: str = "tcp://127.0.0.1:1") -> list[bytes]:
    """One hostile message (a list of frames)."""
    r = rng.random()
    if r < 0.4:
        return _mutate_header(rng, _valid(rng, reply_to))
    if r < 0.75:
        return _mutate_bytes(rng, _valid(rng, reply_to))
    if r < 0.9:
        return [msgpack.packb(_random_obj(rng), use_bin_type=True), *[bytes(rng.randint(0, 16)) for _ in range(rng.randint(0, 3))]]
    return [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 128))) for _ in range(rng.randint(1, 3))]


def fuzz_decoder(n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    counts = {"inputs": 0, "ok": 0, "typed_errors": 0, "crashes": 0, "crash_examples": []}
    for _ in range(n):
        frames = fuzz_input(rng)
        counts["inputs"] += 1
        try:
            decode_message(frames, _FUZZ_LIMITS)
            counts["ok"] += 1
        except SplitnetError:
            counts["typed_errors"] += 1
        except Exception as e:  # a crash: the decoder let an untyped exception through
            counts["crashes"] += 1
            if len(counts["crash_examples"]) < 5:
                counts["crash_examples"].append(f"{type(e).__name__}: {e}")
    return counts


# ---------------------------------------------------------------------- live worker --------------
class _Worker:
    def __init__(self) -> None:
        cmd = [sys.executable, "-m", "splitnet.runtime.cli_serve", "--model", "minilm", "--blocks", "0:1",
               "--bind", "tcp://127.0.0.1:0", "--torch-threads", "1", "--parent-pid", str(os.getpid()), "--max-requests", "64", "--insecure"]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            self.p.kill()
            raise RuntimeError(f"worker did not start: {line!r}")
        self.endpoint = line.split()[1]

    def rss_kib(self) -> int:
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def close(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def _ping(ctrl: zmq.Socket, timeout_ms: int = 3000) -> bool:
    ctrl.send_multipart(encode_message(Message(kind="ping", req="alive")))
    deadline = time.monotonic() + timeout_ms / 1e3
    while time.monotonic() < deadline:
        if ctrl.poll(100):
            frames = ctrl.recv_multipart()
            try:
                if decode_message(frames).kind == "pong":
                    return True
            except SplitnetError:
                pass
    return False


def _client_sockets(w: _Worker) -> tuple[zmq.Socket, zmq.Socket, str]:
    """A control DEALER connected to the worker, and a result ROUTER the worker can reply to."""
    ctx = zmq.Context.instance()
    ctrl = make_socket(ctx, zmq.DEALER, SocketConfig())
    ctrl.connect(w.endpoint)
    results = make_socket(ctx, zmq.ROUTER, SocketConfig(), server=True)
    port = results.bind_to_random_port("tcp://127.0.0.1")
    return ctrl, results, f"tcp://127.0.0.1:{port}"


def fuzz_worker(w: _Worker, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed + 1)
    ctrl, results, reply_to = _client_sockets(w)
    poller = zmq.Poller()
    poller.register(ctrl, zmq.POLLIN)
    poller.register(results, zmq.POLLIN)
    counts = {"inputs": 0, "typed_errors": 0, "results": 0, "no_reply": 0, "crashes": 0}
    _ping(ctrl)
    for i in range(n):
        frames = fuzz_input(rng, reply_to)
        ctrl.send_multipart(frames)
        counts["inputs"] += 1
        got = False
        for sock, _ in poller.poll(300):
            body = sock.recv_multipart()
            body = body[1:] if sock is results else body
            got = True
            try:
                m = decode_message(body)
                counts["typed_errors" if m.kind == "error" else "results"] += 1
            except SplitnetError:
                counts["crashes"] += 1  # the worker must always answer in protocol
        if not got:
            counts["no_reply"] += 1  # e.g. release, or want_result false: check the worker still serves
            if not _ping(ctrl):
                counts["crashes"] += 1
                break
        if i % 2000 == 0 and w.p.poll() is not None:
            counts["crashes"] += 1
            break
    while poller.poll(200):  # drain late replies
        for sock, _ in poller.poll(0):
            sock.recv_multipart()
    counts["worker_alive_after"] = w.p.poll() is None and _ping(ctrl)
    ctrl.close(linger=0)
    results.close(linger=0)
    return counts


def rss_growth(w: _Worker, n: int, warmup: int = 500) -> dict:
    rng = random.Random(7)
    ctrl, results, reply_to = _client_sockets(w)
    _ping(ctrl)
    request_ids = itertools.count()

    def burst(k: int) -> int:
        ok = 0
        for i in range(k):
            # request ids of its own: the fuzz before it sent r0..r9 at other epochs, and a stage
            # refuses a request's older epoch (StaleEpoch), which is not what this measures
            ctrl.send_multipart(_valid(rng, reply_to, req=f"rss-{next(request_ids)}"))
            if results.poll(10_000):
                ok += decode_message(results.recv_multipart()[1:]).kind == "result"
        return ok

    burst(warmup)
    before = w.rss_kib()
    t0 = time.perf_counter()
    ok = burst(n)
    dt = time.perf_counter() - t0
    after = w.rss_kib()
    ctrl.close(linger=0)
    results.close(linger=0)
    return {"requests": n, "ok": ok, "rss_kib_before": before, "rss_kib_after": after,
            "rss_growth_pct": round((after - before) / before * 100, 3), "requests_per_s": round(n / dt, 1)}


# ---------------------------------------------------------------------- CURVE overhead -----------
def loopback_throughput(tensor_bytes: int, keyed: bool, n: int) -> float:
    """MiB/s of ``n`` forward messages of one ``tensor_bytes`` tensor, ROUTER <- DEALER between two
    contexts on loopback (two I/O threads, as two processes), each decoded by the receiver as a
    stage would; ``keyed``: over CurveZMQ (authenticated and decrypted), else plaintext."""
    from splitnet.wire.security import CurveConfig, KeyPair, stop_authenticator

    srv, cli = KeyPair(*zmq.curve_keypair()), KeyPair(*zmq.curve_keypair())
    arr = np.random.default_rng(0).random(tensor_bytes // 4, dtype=np.float32)
    frames = encode_message(Message(kind="forward", tensors={"hidden": arr}))
    c_srv, c_cli = zmq.Context(), zmq.Context()
    scfg = SocketConfig(security=CurveConfig(srv, allow_keys=(cli.public,)) if keyed else None)
    ccfg = SocketConfig(security=CurveConfig(cli, server_key=srv.public, allow_self=False) if keyed else None)
    r = make_socket(c_srv, zmq.ROUTER, scfg, server=True)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    q = make_socket(c_cli, zmq.DEALER, ccfg)
    q.connect(f"tcp://127.0.0.1:{port}")
    q.send_multipart(frames, copy=False)
    r.recv_multipart()
    th = threading.Thread(target=lambda: [q.send_multipart(frames, copy=False) for _ in range(n)])
    t0 = time.perf_counter()
    th.start()
    for _ in range(n):
        got = decode_message(r.recv_multipart(copy=False)[1:])
    dt = time.perf_counter() - t0
    th.join()
    q.close(linger=0)
    r.close(linger=0)
    stop_authenticator(c_srv)
    c_srv.term()
    c_cli.term()
    if got.tensors["hidden"].nbytes != arr.nbytes:
        raise RuntimeError(f"throughput run received {got.tensors['hidden'].nbytes} bytes per tensor, sent {arr.nbytes}")
    return n * tensor_bytes / 2**20 / dt


def curve_overhead(n: int = 60, rounds: int = 3) -> dict:
    """Throughput of 4 MiB tensors (:func:`loopback_throughput`) in plaintext and over CurveZMQ,
    rounds interleaved so that machine load hits both alike."""

    def once(transport: str | None) -> float:
        return loopback_throughput(4 * 2**20, transport is not None, n)

    runs: dict[str, list[float]] = {"plain": [], "curvezmq": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(once(None if name == "plain" else name))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    p = med["plain"]
    return {"plain_mib_s": round(p, 1), "curvezmq_mib_s": round(med["curvezmq"], 1),
            "curvezmq_overhead_pct": round((1 - med["curvezmq"] / p) * 100, 2),
            "runs_mib_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "default_transport": "curvezmq", "tensor_mib": 4, "messages_per_round": n, "rounds": rounds}


def run(args: argparse.Namespace) -> dict:
    quick = args.quick
    n_dec = args.decoder_inputs if args.decoder_inputs is not None else (5000 if quick else 100_000)
    n_wrk = args.worker_inputs if args.worker_inputs is not None else (1000 if quick else 20_000)
    n_rss = args.rss_requests if args.rss_requests is not None else (1000 if quick else 10_000)
    t0 = time.perf_counter()
    dec = fuzz_decoder(n_dec, args.seed)
    w = _Worker()
    try:
        wrk = fuzz_worker(w, n_wrk, args.seed)
        rss = rss_growth(w, n_rss)
        alive = w.p.poll() is None
    finally:
        w.close()
    cur = curve_overhead(n=20 if quick else 60)
    crashes = dec["crashes"] + wrk["crashes"]
    return {
        "config": {"quick": quick, "decoder_inputs": n_dec, "worker_inputs": n_wrk, "rss_requests": n_rss, "seed": args.seed,
                   "worker": "serve-stage minilm blocks 0:1, torch 1 thread", "fuzz_limits": _FUZZ_LIMITS.__dict__},
        "inputs_tried": dec["inputs"] + wrk["inputs"],
        "typed_errors": dec["typed_errors"] + wrk["typed_errors"],
        "crashes": crashes,
        "worker_alive_after": bool(wrk["worker_alive_after"] and alive),
        "rss_growth_pct": rss["rss_growth_pct"],
        "curve_overhead_pct": cur["curvezmq_overhead_pct"],  # keyed links as splitnet runs them by default
        "decoder": dec,
        "worker": wrk,
        "rss": rss,
        "curve": cur,
        "baseline": {"plaintext_mib_s": cur["plain_mib_s"]},
        "goals": {"crashes_zero": crashes == 0, "inputs_ge_100k": dec["inputs"] + wrk["inputs"] >= 100_000,
                  "rss_growth_le_5": rss["rss_growth_pct"] <= 5},
        # speed of the keyed transport is reported, not a bar (security first); the old 50 % bar
        # was met only by splitnet's own sealed transport, removed for failing live attacks
        "reported": {"curve_overhead_pct": cur["curvezmq_overhead_pct"]},
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "exit_code": 0 if crashes == 0 else 1,
    }


def summarize(doc: dict) -> str:
    return (f"hardening: inputs_tried={doc['inputs_tried']} typed_errors={doc['typed_errors']} crashes={doc['crashes']} "
            f"worker_alive_after={doc['worker_alive_after']} rss_growth_pct={doc['rss_growth_pct']} "
            f"curve_overhead_pct={doc['curve_overhead_pct']} goals={doc['goals']}")
