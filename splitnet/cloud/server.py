"""``splitnet serve``: serve every stage a plan places on one device, as supervised processes.

A cloud node runs ``splitnet serve --plan plan.yaml --device cloud --server-key ... --keys-dir ...``;
each of its stages becomes its own ``serve-stage`` process bound to the port in the plan's
endpoint, and a stage that crashes is restarted on the same endpoint (clients replay their
requests into it, see :mod:`splitnet.edge.sdk`). Many edge clients share these stages.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from splitnet.errors import ConfigError, SplitnetError


def stage_commands(plan_path: str, device: str, host: str, passthrough: list[str]) -> dict[str, list[str]]:
    """One ``serve-stage`` command line per stage of ``plan_path`` placed on ``device``."""
    from splitnet.runtime.plan_io import plan_document, plan_stages

    doc = plan_document(plan_path)
    stages = plan_stages(doc)
    mine = [(i, s) for i, s in enumerate(stages) if s.get("device") == device]
    if not mine:
        known = sorted({str(s.get("device")) for s in stages})
        raise ConfigError(f"the plan places no stage on device {device!r}; its devices are {known}")
    cmds = {}
    for i, s in mine:
        endpoint = s.get("endpoint") or ""
        if not endpoint.startswith("tcp://"):
            raise ConfigError(f"plan stage {i} has no tcp:// endpoint; set one so clients can find it")
        port = endpoint.rsplit(":", 1)[-1]
        cmds[f"stage {i} ({s['blocks'][0]}:{s['blocks'][1]})"] = [
            sys.executable, "-m", "splitnet.runtime.cli_serve", "--plan", plan_path, "--stage", str(i),
            "--bind", f"tcp://{host}:{port}", *passthrough,
        ]
    return cmds


def run(args: argparse.Namespace) -> int:
    from splitnet.cloud.supervisor import RestartPolicy, Supervisor

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    passthrough = []
    if args.server_key:
        passthrough += ["--server-key", args.server_key]
    if args.keys_dir:
        passthrough += ["--keys-dir", args.keys_dir]
    if args.stage_keys_dir:
        passthrough += ["--stage-keys-dir", args.stage_keys_dir]
    if args.insecure:
        passthrough += ["--insecure"]
    passthrough += ["--transport", args.transport]
    for extra in ("device_torch", "dtype"):
        value = getattr(args, extra)
        if value:
            passthrough += ["--device" if extra == "device_torch" else "--dtype", value]
    try:
        sup = Supervisor(stage_commands(args.plan, args.device, args.host, passthrough), RestartPolicy(max_restarts=args.max_restarts))
    except SplitnetError as e:
        print(f"splitnet serve: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sup.start()
    print(f"serving {len(sup.children)} stage(s) of {args.plan} for device {args.device}", flush=True)
    try:
        while not stop.wait(0.5):
            if not sup.poll():
                print("splitnet serve: every stage failed repeatedly; giving up", file=sys.stderr)
                return 1
    finally:
        sup.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve every stage a plan places on one device (supervised)")
    p.add_argument("--plan", required=True, help="plan file (YAML/JSON) with endpoints")
    p.add_argument("--device", required=True, help="device name in the plan whose stages this node serves")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (the port comes from the plan)")
    p.add_argument("--server-key", default="", help="CURVE secret key file of this node")
    p.add_argument("--keys-dir", default="", help="directory of allowed client public keys")
    p.add_argument("--insecure", action="store_true", help="serve plaintext (warned)")
    p.add_argument("--stage-keys-dir", default="", help="directory of the upstream stages' public keys (see serve-stage --stage-keys-dir)")
    p.add_argument("--transport", choices=("curvezmq",), default=os.environ.get("SPLITNET_TRANSPORT", "curvezmq"), help="keyed transport (see serve-stage --transport)")
    p.add_argument("--torch-device", dest="device_torch", default="", help="torch device for the stages (cpu, cuda)")
    p.add_argument("--dtype", default="", help="float32, float16 or bfloat16")
    p.add_argument("--max-restarts", type=int, default=5, help="restarts per stage within 5 minutes before giving up")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)
