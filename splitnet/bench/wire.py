"""Wire overhead: round-trip time and 4 MiB throughput, splitnet framing vs raw pyzmq.

Both run in the same way in the same run: an echo process on 127.0.0.1 with a ROUTER socket,
a client DEALER. The splitnet side builds every message with ``encode_message`` (msgpack
header + zero-copy tensor frames) and the server validates each with ``decode_message``
before answering; the raw side sends the same bytes as plain frames and echoes them untouched.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import zmq

SERVER = r"""
import sys, zmq
from splitnet.wire import Message, decode_message, encode_message, make_socket, SocketConfig
mode, port_file = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
s = make_socket(ctx, zmq.ROUTER, SocketConfig(), server=True) if mode == "splitnet" else ctx.socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
open(port_file, "w").write(str(port))
ack_raw = [b"ok"]
ack = encode_message(Message(kind="ack"))
while True:
    if not s.poll(30000):
        break
    frames = s.recv_multipart(copy=False)
    ident, body = frames[0], frames[1:]
    if len(body) == 1 and body[0].bytes == b"quit":
        break
    if mode == "splitnet":
        msg = decode_message(body)
        if msg.meta.get("echo"):
            s.send_multipart([ident, *encode_message(Message(kind="result", tensors=msg.tensors))], copy=False)
        else:
            s.send_multipart([ident, *ack], copy=False)
    else:
        if len(body) == 2 and len(body[1]) > 1024:
            s.send_multipart([ident, *ack_raw], copy=False)
        else:
            s.send_multipart([ident, *body], copy=False)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtt-iters", type=int, default=1000, help="round trips per RTT measurement")
    p.add_argument("--tput-messages", type=int, default=150, help="4 MiB messages per throughput measurement")
    p.add_argument("--window", type=int, default=4, help="messages in flight during the throughput run")
    p.add_argument("--repeats", type=int, default=9, help="alternating repeats of each measurement (median kept)")


def _start(mode: str, tmpdir: str) -> tuple[subprocess.Popen, str]:
    import os

    port_file = os.path.join(tmpdir, f"{mode}.port")
    p = subprocess.Popen([sys.executable, "-c", SERVER, mode, port_file])
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file) or not open(port_file).read():
        if time.monotonic() > deadline or p.poll() is not None:
            p.kill()
            raise RuntimeError(f"{mode} echo server did not start")
        time.sleep(0.05)
    return p, f"tcp://127.0.0.1:{open(port_file).read()}"


def _recv(sock: zmq.Socket) -> list:
    if not sock.poll(10000):
        raise TimeoutError("echo server silent for 10 s")
    return sock.recv_multipart(copy=False)


def _rtt(sock: zmq.Socket, mode: str, iters: int) -> float:
    from splitnet.wire import Message, decode_message, encode_message

    payload = np.zeros(16, dtype=np.float32)  # 64 bytes of tensor data
    raw_header = encode_message(Message(kind="forward", tensors={"x": payload}, meta={"echo": 1}))[0]
    samples = []
    for i in range(iters + 200):
        t0 = time.perf_counter()
        if mode == "splitnet":
            sock.send_multipart(encode_message(Message(kind="forward", req="r", seq=i, tensors={"x": payload}, meta={"echo": 1})), copy=False)
            decode_message(_recv(sock))
        else:
            sock.send_multipart([raw_header, payload.tobytes()])
            _recv(sock)
        if i >= 200:  # warm-up
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def _throughput(sock: zmq.Socket, mode: str, n: int, window: int) -> float:
    from splitnet.wire import Message, decode_message, encode_message

    big = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MiB
    raw_header = encode_message(Message(kind="forward", tensors={"x": big}))[0]
    in_flight = sent = 0
    t0 = time.perf_counter()
    while sent < n or in_flight:
        while sent < n and in_flight < window:
            if mode == "splitnet":
                sock.send_multipart(encode_message(Message(kind="forward", req="t", seq=sent, tensors={"x": big})), copy=False)
            else:
                sock.send_multipart([raw_header, big], copy=False)
            sent += 1
            in_flight += 1
        frames = _recv(sock)
        if mode == "splitnet":
            decode_message(frames)
        in_flight -= 1
    elapsed = time.perf_counter() - t0
    return n * big.nbytes / elapsed / 1e9


def run(args: argparse.Namespace) -> dict:
    import tempfile

    ctx = zmq.Context.instance()
    results: dict[str, dict[str, list[float]]] = {"splitnet": {"rtt": [], "tput": []}, "raw": {"rtt": [], "tput": []}}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {m: _start(m, tmp) for m in ("raw", "splitnet")}
        socks = {}
        try:
            for m, (_, ep) in servers.items():
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(ep)
                socks[m] = s
            for _ in range(args.repeats):
                for m in ("raw", "splitnet"):  # alternate so drift hits both alike
                    results[m]["rtt"].append(_rtt(socks[m], m, args.rtt_iters))
                    results[m]["tput"].append(_throughput(socks[m], m, args.tput_messages, args.window))
        finally:
            for m, s in socks.items():
                s.send_multipart([b"quit"])
                s.close()
            for p, _ in servers.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
    rtt = statistics.median(results["splitnet"]["rtt"])
    raw_rtt = statistics.median(results["raw"]["rtt"])
    tput = statistics.median(results["splitnet"]["tput"])
    raw_tput = statistics.median(results["raw"]["tput"])
    return {
        "config": {"rtt_payload_bytes": 64, "tensor_bytes": 4 * 1024 * 1024, "rtt_iters": args.rtt_iters, "tput_messages": args.tput_messages, "window": args.window, "repeats": args.repeats, "transport": "tcp://127.0.0.1"},
        "units": {"rtt_us": "microseconds, median round trip", "throughput_gbps": "GB/s (1e9 bytes/s) of tensor payload"},
        "rtt_us": round(rtt, 1),
        "raw_rtt_us": round(raw_rtt, 1),
        "added_rtt_us": round(rtt - raw_rtt, 1),
        "throughput_gbps": round(tput, 3),
        "raw_throughput_gbps": round(raw_tput, 3),
        "throughput_fraction_of_raw": round(tput / raw_tput, 3),
        "samples": results,
        "goals": {"added_rtt_us_max": 100, "throughput_fraction_min": 0.8},
        "goals_met": {"rtt": rtt - raw_rtt <= 100, "throughput": tput / raw_tput >= 0.8},
    }


def summarize(doc: dict) -> str:
    return (
        f"round trip (64 B): splitnet {doc['rtt_us']} us vs raw pyzmq {doc['raw_rtt_us']} us (+{doc['added_rtt_us']} us)\n"
        f"4 MiB throughput:  splitnet {doc['throughput_gbps']} GB/s vs raw {doc['raw_throughput_gbps']} GB/s "
        f"({doc['throughput_fraction_of_raw'] * 100:.0f} %)"
    )
