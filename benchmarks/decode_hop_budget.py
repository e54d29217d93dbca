"""Where one sequence's decode step goes: inside the stages (compute, and held = received by the
I/O thread to sent on) and outside them (the hops and the client), for 1..S stage processes.

    python benchmarks/decode_hop_budget.py shape:llama-3.2-1b --stages 1,2 --device cuda --dtype bfloat16

For each stage count: ms/token (median of the decode steps of ``--repeats`` generations), the sum over
stages of compute_ms and held_ms per step (from the stages' traces), what is left (hops + client), the
ping round trip to each stage (the I/O threads alone), and the client's own time per step.
Research code, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra", default="", help="extra serve-stage arguments, space-separated")
    p.add_argument("--reply-via", default="connection", choices=["connection", "bind"], help="how results come back (ClientConfig.reply_via)")
    p.add_argument("--out", default="")
    args = p.parse_args()

    import splitnet
    from splitnet.bench.environment import environment
    from splitnet.bench.shapes import is_shape, shape_dir
    from splitnet.edge.config import ClientConfig
    from splitnet.runtime.launcher import launch_pipeline

    os.environ["SPLITNET_TRACE_CLOCK"] = "1"  # the stages stamp received / sent on in CLOCK_MONOTONIC
    model = str(shape_dir(args.model, device=args.device, dtype=args.dtype)) if is_shape(args.model) else args.model
    extra = ["--device", args.device, "--dtype", args.dtype, *args.extra.split()]
    rows = []
    for n in [int(x) for x in args.stages.split(",")]:
        with launch_pipeline(model, num_stages=n, extra_args=extra, ready_timeout_s=600) as pipe, \
                splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=600, reply_via=args.reply_via)) as s:
            prompt = list(range(1, 65))
            s.generate(prompt, 8)
            per_tok, stage_ms, client_ms = [], [], []
            events: list = []
            stop = _observe(s, events)
            for _ in range(args.repeats):
                t_cpu = time.process_time()
                r = s.generate(prompt, args.tokens)
                client_ms.append((time.process_time() - t_cpu) * 1e3 / args.tokens)
                per_tok.append((r.latency_ms - r.ttft_ms) / max(1, args.tokens - 1))
                stage_ms.append(r.stats.get("decode_stage_ms", {}))
            stop()
            pings = [s.ping() for _ in range(20)]
        hops = _hops(events, n)
        steps = {st: acc for st, acc in stage_ms[-1].items()}
        mean = {st: {k: round(v / max(1, acc["steps"]), 3) for k, v in acc.items() if k != "steps"} for st, acc in steps.items()}
        compute = sum(m["compute_ms"] for m in mean.values())
        held = sum(m.get("held_ms", 0.0) for m in mean.values())
        ms = statistics.median(per_tok)
        rows.append({
            "stages": n, "ms_per_token": round(ms, 3), "compute_ms_sum": round(compute, 3), "held_ms_sum": round(held, 3),
            "in_stage_not_compute_ms": round(held - compute, 3), "outside_stages_ms": round(ms - held, 3),
            "hops": n + 1, "client_cpu_ms_per_token": round(statistics.median(client_ms), 3),
            "ping_rtt_ms_median": [round(statistics.median(q[i] for q in pings), 3) for i in range(n)],
            "hop_ms_median": hops,
            "per_stage": mean,
        })
        print(json.dumps(rows[-1]), flush=True)
    doc = {"suite": "decode-hop-budget", "environment": environment(), "config": vars(args), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


def _observe(session, events: list):
    """Record every send and receive on the session's links (``StageLinks.observe`` where the
    session has it; otherwise by wrapping the links' send and deliver); returns a stop function."""
    links = session.links
    if hasattr(links, "observe"):
        return links.observe(events.append)
    import types

    import msgpack

    from splitnet.wire import decode_message
    from splitnet.wire.limits import DEFAULT_LIMITS

    ev = types.SimpleNamespace
    orig_send, orig_deliver = links.send_frames, links._deliver

    def send_frames(i, frames):
        ok = orig_send(i, frames)
        h = msgpack.unpackb(bytes(frames[0]))
        events.append(ev(direction="send", kind=h.get("kind"), req=h.get("req"), seq=h.get("seq"), t_s=time.monotonic(), trace=()))
        return ok

    def deliver(stage, body):
        t = time.monotonic()
        try:
            msg = decode_message(body, DEFAULT_LIMITS)
            events.append(ev(direction="recv", kind=msg.kind, req=msg.req, seq=msg.seq, t_s=t, trace=tuple(msg.meta.get("trace") or ())))
        except Exception:  # noqa: BLE001 - the session's own delivery reports it
            pass
        return orig_deliver(stage, body)

    links.send_frames, links._deliver = send_frames, deliver

    def stop():
        links.send_frames, links._deliver = orig_send, orig_deliver

    return stop


def _hops(events: list, n: int) -> dict:
    """Median ms of each leg of a decode step from the clocks: client send -> stage 0 received,
    stage i sent on -> stage i+1 received, last stage sent -> client received, client received ->
    its next send (the client's own time), and each stage's held time."""
    sends = {(e.req, e.seq): e.t_s for e in events if e.direction == "send" and e.kind == "forward"}
    legs: dict[str, list[float]] = {}
    last_recv = None
    for e in events:
        if e.direction == "send" and e.kind == "forward" and last_recv is not None:
            legs.setdefault("client_turnaround", []).append((e.t_s - last_recv) * 1e3)
            last_recv = None
        if e.direction != "recv" or e.kind != "result":
            continue
        clocks = [t.get("clock_s") for t in (e.trace or []) if isinstance(t, dict)]
        t0 = sends.get((e.req, e.seq))
        if t0 is None or len(clocks) != n or any(c is None for c in clocks):
            continue
        legs.setdefault("client_to_stage0", []).append((clocks[0][0] - t0) * 1e3)
        for i in range(n):
            legs.setdefault(f"stage{i}_held", []).append((clocks[i][1] - clocks[i][0]) * 1e3)
            if i + 1 < n:
                legs.setdefault(f"stage{i}_to_stage{i + 1}", []).append((clocks[i + 1][0] - clocks[i][1]) * 1e3)
        legs.setdefault(f"stage{n - 1}_to_client", []).append((e.t_s - clocks[-1][1]) * 1e3)
        last_recv = e.t_s
    return {k: round(statistics.median(v), 3) for k, v in legs.items() if v}


if __name__ == "__main__":
    main()
