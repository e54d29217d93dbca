"""From a plan to served stages to a client, on this host: what a cloud node and a client do.

    python examples/serve_from_plan.py [--workdir DIR]

1. ``splitnet plan``: MiniLM on the loopback fleet (three devices on 127.0.0.1, each with an
   ``endpoint``), written to DIR/plan.yaml;
2. ``splitnet serve --plan DIR/plan.yaml --device NAME`` for every device the plan uses, as a node
   would run it (supervised stage processes bound to the plan's ports; plaintext on loopback);
3. ``splitnet.connect(plan)``: the client reads the endpoints from the same plan and embeds.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.planner.plan import load_plan

FLEET = {
    "name": "loopback-example",
    "devices": [
        {"name": "host0", "compute_speed_rel": 1.0, "memory_gib": 4, "can_host_first_stage": True, "endpoint": "tcp://127.0.0.1:25601"},
        {"name": "host1", "compute_speed_rel": 1.0, "memory_gib": 4, "endpoint": "tcp://127.0.0.1:25602"},
    ],
    # for throughput the planner splits MiniLM over both hosts (each runs half the blocks)
    "links": [{"src": "host0", "dst": "host1", "bandwidth_mbit_s": 1000, "rtt_ms": 0.2}],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None, help="where the fleet and plan are written (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="splitnet-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    fleet, plan_path = work / "fleet.yaml", work / "plan.yaml"
    fleet.write_text(yaml.safe_dump(FLEET, sort_keys=False))
    cli = [sys.executable, "-m", "splitnet.cli"]
    subprocess.run([*cli, "plan", "--model", "minilm", "--devices", str(fleet), "--objective", "throughput",
                    "--out", str(plan_path)], check=True, stdout=subprocess.DEVNULL)
    plan = load_plan(plan_path)
    print(f"plan: {[(s.device, list(s.blocks), s.endpoint) for s in plan.stages]}")
    servers = []
    try:
        for device in sorted({s.device for s in plan.stages}):
            p = subprocess.Popen([*cli, "serve", "--plan", str(plan_path), "--device", device, "--host", "127.0.0.1",
                                  "--insecure", "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
            servers.append(p)
            print(f"{device}: {p.stdout.readline().strip()}")
        # the stages bind once their weights are loaded: connect waits up to connect_timeout_s
        with splitnet.connect(plan_path, config=ClientConfig(timeout_s=60, connect_timeout_s=120)) as session:
            emb = session.infer({"text": ["served from a plan"]})["embedding"]
            print(f"embedding {emb.shape}, norm {float((emb ** 2).sum()) ** 0.5:.3f}; stages "
                  f"{[(s['blocks'], s['pid']) for s in session.stages]}")
    finally:
        for p in servers:
            p.send_signal(signal.SIGTERM)
        for p in servers:
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
