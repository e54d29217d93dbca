"""Hostile peers: every attack of the security review against live stages, per transport.

For each transport (``curvezmq``, the keyed default; ``plaintext``, ``--insecure``, as the
reference that shows what each attack does when nothing stops it) a fresh two-stage MiniLM
pipeline runs every attack in :mod:`splitnet.bench.attacks`, and each row reports:

- ``refused``: the attack had no effect (nothing executed, leaked or kept; at most a typed error
  or a closed connection);
- ``stage_alive``: both stage processes still run;
- ``legit_client_ok``: a new session of the victim's key gets the reference embedding after it;
- ``seconds``: how long the attack ran.

Also: the keyed transport's throughput next to plaintext (16 KiB and 4 MiB tensors, between two
contexts on loopback) and its handshake cost (connect + first answer, vs plaintext).
Goals: every attack refused, stage alive and client fine on every keyed transport; the
transport-independent attacks refused on plaintext too; the default transport has a handshake.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

import numpy as np
import zmq

from splitnet.bench.hardening import loopback_throughput
from splitnet.wire import SocketConfig, make_socket

_TRANSPORT_INDEPENDENT = ("zero_frame_envelope", "oversized_messages", "many_frames", "idle_connection_flood", "crash_descriptor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller floods and messages (the test suite's sizes)")
    p.add_argument("--transports", default="curvezmq,plaintext", help="comma-separated: curvezmq, plaintext")
    p.add_argument("--attacks", default="", help="comma-separated subset of the attacks (default: all)")
    p.add_argument("--no-overhead", action="store_true", help="skip the throughput and handshake figures")


def attack_sizes(quick: bool) -> dict[str, dict]:
    """Keyword arguments of the attacks that scale: the review's sizes, or the test suite's."""
    if quick:
        return {"cache_flush": {"n": 200}, "oversized_messages": {"mib": 96, "count": 3}, "many_frames": {"frames": 100_000},
                "idle_connection_flood": {"n": 200}}
    return {"cache_flush": {"n": 4200}, "oversized_messages": {"mib": 900, "count": 3}, "many_frames": {"frames": 500_000},
            "idle_connection_flood": {"n": 1000}}


def run_attack(lab: Any, name: str, sizes: dict[str, dict]) -> dict:
    """One attack against ``lab``, then the three verdicts; a stage it killed is restarted after."""
    from splitnet.bench.attacks import ATTACKS

    t0 = time.monotonic()
    try:
        row = dict(ATTACKS[name](lab, **sizes.get(name, {})))
    except Exception as e:  # noqa: BLE001 - an attack that breaks the bench is a finding, not a crash
        row = {"refused": False, "error": f"{type(e).__name__}: {e}"[:300]}
    row["seconds"] = round(time.monotonic() - t0, 2)
    row["stage_alive"] = lab.stages_alive()
    row["legit_client_ok"] = lab.legit_client_ok() if row["stage_alive"] else False
    for i, st in enumerate(lab.stages):
        if not st.alive():
            st.start()  # so the next attack meets a serving pipeline
            row.setdefault("restarted_stages", []).append(i)
    return row


def _handshake_ms(keyed: bool, n: int = 30) -> float:
    """Median ms from connect to the first answer (handshake included), ROUTER echo on loopback."""
    from splitnet.wire.security import CurveConfig, KeyPair, stop_authenticator

    srv, cli = KeyPair(*zmq.curve_keypair()), KeyPair(*zmq.curve_keypair())
    ctx = zmq.Context()
    r = make_socket(ctx, zmq.ROUTER, SocketConfig(security=CurveConfig(srv, allow_keys=(cli.public,)) if keyed else None), server=True)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if r.poll(20):
                r.send_multipart(r.recv_multipart())

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    times = []
    for _ in range(n):
        q = make_socket(ctx, zmq.DEALER, SocketConfig(security=CurveConfig(cli, server_key=srv.public, allow_self=False) if keyed else None, immediate=False))
        t0 = time.perf_counter()
        q.connect(f"tcp://127.0.0.1:{port}")
        q.send(b"x")
        if q.poll(5000):
            q.recv()
            times.append((time.perf_counter() - t0) * 1e3)
        q.close(linger=0)
    stop.set()
    th.join(timeout=2)
    r.close(linger=0)
    stop_authenticator(ctx)
    ctx.term()
    return float(np.median(times)) if times else float("nan")


def overhead(quick: bool) -> dict:
    out: dict[str, Any] = {}
    for label, size, n in (("16kib", 16 * 1024, 2000 if quick else 10_000), ("4mib", 4 * 2**20, 20 if quick else 60)):
        plain, curve = [], []
        for _ in range(1 if quick else 3):  # interleaved rounds: machine load hits both alike
            plain.append(loopback_throughput(size, False, n))
            curve.append(loopback_throughput(size, True, n))
        p, c = float(np.median(plain)), float(np.median(curve))
        out[label] = {"plaintext_mib_s": round(p, 1), "curvezmq_mib_s": round(c, 1), "curvezmq_overhead_pct": round((1 - c / p) * 100, 1), "messages": n}
    out["handshake_ms"] = {"plaintext": round(_handshake_ms(False), 3), "curvezmq": round(_handshake_ms(True), 3)}
    return out


def run(args: argparse.Namespace) -> dict:
    from splitnet.bench.attacks import ATTACKS, HostileLab
    from splitnet.wire.security import DEFAULT_TRANSPORT, TRANSPORTS

    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    names = [a.strip() for a in args.attacks.split(",") if a.strip()] or list(ATTACKS)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"splitnet bench hostile: unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    sizes = attack_sizes(args.quick)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for transport in transports:
        lab = HostileLab(transport)
        try:
            results[transport] = {}
            for name in names:
                row = run_attack(lab, name, sizes)
                results[transport][name] = row
                print(f"hostile {transport:9s} {name:24s} refused={row['refused']} stage_alive={row['stage_alive']} "
                      f"legit_client_ok={row['legit_client_ok']} {row['seconds']} s", file=sys.stderr, flush=True)
        finally:
            lab.close()
    keyed = [t for t in transports if t in TRANSPORTS]

    def all_ok(rows: dict, only: tuple[str, ...] | None = None) -> bool:
        return all(r["refused"] and r["stage_alive"] and r["legit_client_ok"] for n, r in rows.items() if only is None or n in only)

    goals = {
        "every_attack_refused_on_keyed_transports": bool(keyed) and all(all_ok(results[t]) for t in keyed),
        "transport_independent_refused_on_plaintext": "plaintext" not in results or all_ok(results["plaintext"], _TRANSPORT_INDEPENDENT),
        "default_transport_has_handshake": DEFAULT_TRANSPORT == "curvezmq",
    }
    doc = {
        "config": {"quick": args.quick, "transports": transports, "attacks": names, "sizes": sizes,
                   "pipeline": "minilm, 2 serve-stage processes on 127.0.0.1 (blocks 0:3, 3:6), a keypair per stage",
                   "keyed_transports": list(TRANSPORTS), "insecure_reference": "plaintext"},
        "default_transport": DEFAULT_TRANSPORT,
        "results": results,
        "overhead": None if args.no_overhead else overhead(args.quick),
        "baseline": "plaintext (--insecure): the same attacks and the same throughput without keys",
        "goals": goals,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    doc["exit_code"] = 0 if all(goals.values()) else 1
    return doc


def summarize(doc: dict) -> str:
    lines = [f"hostile: default_transport={doc['default_transport']} goals={doc['goals']}"]
    for t, rows in doc["results"].items():
        bad = [n for n, r in rows.items() if not (r["refused"] and r["stage_alive"] and r["legit_client_ok"])]
        lines.append(f"  {t}: {len(rows) - len(bad)}/{len(rows)} attacks refused with the stage alive and the client fine; not: {bad}")
    if doc.get("overhead"):
        lines.append(f"  overhead: {doc['overhead']}")
    return "\n".join(lines)

