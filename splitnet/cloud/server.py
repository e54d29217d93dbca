"""``splitnet serve``: serve every stage a plan places on one device, as supervised processes.

A cloud node runs ``splitnet serve --plan plan.yaml --device cloud --server-key ... --keys-dir ...``;
each of its stages becomes its own ``serve-stage`` process bound to the port in the plan's
endpoint, and a stage that crashes is restarted on the same endpoint (clients replay their
requests into it, see :mod:`splitnet.edge.sdk`). Many edge clients share these stages.

The plan is read by the one validated reader (:func:`splitnet.planner.plan.as_plan`); endpoints
missing from the plan come from ``--devices FLEET`` (each device's ``endpoint``). Everything that
can be wrong is checked before a process starts: the device, endpoints, codec names, free ports and
the model's block count. A stage whose device runs onnxruntime is not served by a process: it is
exported to ONNX for the edge device, and the client's ``connect(...)`` call and a client config
file are written next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from splitnet.errors import ConfigError, SplitnetError


def _plan_for_device(plan_path: str, device: str, fleet_path: str | None):
    from splitnet.planner.plan import load_plan
    from splitnet.runtime.plan_io import fill_endpoints

    plan = load_plan(plan_path)
    if fleet_path:
        plan = fill_endpoints(plan, fleet_path)
    mine = [s for s in plan.stages if s.device == device]
    if not mine:
        known = sorted({s.device for s in plan.stages})
        raise ConfigError(f"the plan places no stage on device {device!r}; its devices are {known}")
    return plan, mine


def stage_commands(plan_path: str, device: str, host: str, passthrough: list[str], fleet_path: str | None = None,
                   check: bool = True) -> dict[str, list[str]]:
    """One ``serve-stage`` command line per stage of ``plan_path`` placed on ``device``, except a
    first stage on onnxruntime, which runs in the client (see :func:`export_edge_stages`).

    With ``check``, codecs, ports and the model's block count are verified first (ConfigError)."""
    from splitnet.runtime.plan_io import missing_endpoint_message, stage_launches

    plan, mine = _plan_for_device(plan_path, device, fleet_path)
    launches = {s.index: s for s in stage_launches(plan)}
    cmds = {}
    for s in mine:
        if s.runtime == "onnxruntime" and s.index == 0:
            continue  # runs inside the client (OnnxStage): exported by export_edge_stages
        endpoint = s.endpoint or ""
        if not endpoint.startswith("tcp://"):
            raise ConfigError(missing_endpoint_message(plan, s.index, plan_path))
        port = endpoint.rsplit(":", 1)[-1]
        bind = f"tcp://{host}:{port}"
        if check:
            from splitnet.runtime.preflight import check_codec_spec, check_port_free

            launch = launches[s.index]
            check_codec_spec(launch.codec_out, f"plan stage {s.index} codec")
            for f in launch.codec_files:
                check_codec_spec(f, f"plan stage {s.index} codec file")
            check_port_free(bind, f"plan stage {s.index}")
        cmds[f"stage {s.index} ({s.start}:{s.end})"] = [
            sys.executable, "-m", "splitnet.runtime.cli_serve", "--plan", plan_path, "--stage", str(s.index),
            "--bind", bind, *passthrough,
        ]
    if check and cmds:
        from splitnet.runtime.preflight import model_block_count
        from splitnet.planner.plan import check_plan_fits_model

        check_plan_fits_model(plan, model_block_count(plan.model))
    return cmds


def export_edge_stages(plan_path: str, device: str, out_dir: str, fleet_path: str | None = None,
                       client_key: str = "", server_keys: str = "") -> dict | None:
    """Export the onnxruntime stage ``plan_path`` places on ``device`` and write the client config.

    Returns the client config (also written to ``OUT_DIR/DEVICE.client.json``), or None when the
    device runs no onnxruntime stage."""
    plan, mine = _plan_for_device(plan_path, device, fleet_path)
    edge = [s for s in mine if s.runtime == "onnxruntime" and s.index == 0]
    if not edge:
        return None  # a later onnxruntime stage is served by a serve-stage process (torch) like any other
    s = edge[0]
    rest = plan.stages[1:]
    missing = [r.index for r in rest if not r.endpoint]
    if missing:
        from splitnet.runtime.plan_io import missing_endpoint_message

        raise ConfigError(missing_endpoint_message(plan, missing[0], plan_path))
    from splitnet.model import load_model
    from splitnet.model.onnx_export import export_stage_onnx
    from splitnet.runtime.plan_io import stage_launches
    from splitnet.runtime.preflight import check_blocks_in_model

    check_blocks_in_model(plan.model, s.start, s.end, f"plan stage {s.index}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{device}.stage{s.index}.onnx"
    export_stage_onnx(load_model(plan.model, blocks=range(s.start, s.end)), s.start, s.end, onnx_path)
    codec = stage_launches(plan)[0].codec_out
    config = {
        "endpoints": [r.endpoint for r in rest],
        "local_stage": str(onnx_path),
        "local_codec": codec,
        "client_key": client_key,
        "server_key": server_keys,
        "model": plan.model,
        "blocks": [s.start, s.end],
    }
    (out / f"{device}.client.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def connect_snippet(config: dict) -> str:
    """The Python a client on the edge device runs for ``config`` (from :func:`export_edge_stages`)."""
    keys = ""
    if config.get("client_key"):
        keys = f", client_key={config['client_key']!r}, server_key={config['server_key']!r}"
    codec = f", local_codec={config['local_codec']!r}" if config.get("local_codec") else ""
    return "\n".join([
        "import splitnet",
        "from splitnet.edge.config import ClientConfig",
        "from splitnet.edge.onnx_stage import OnnxStage  # onnxruntime + numpy: pip install 'splitnet[edge]'",
        f"with splitnet.connect({config['endpoints']!r}, local_stage=OnnxStage({config['local_stage']!r}){codec},",
        f"                      config=ClientConfig(timeout_s=60{keys})) as session:",
        "    ...  # session.infer({'text': [...]}) or session.generate(prompt, n)",
    ])


def run(args: argparse.Namespace) -> int:
    from splitnet.cloud.supervisor import HangPolicy, RestartPolicy, Supervisor

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
        hang = HangPolicy(hang_timeout_s=args.hang_timeout_s)
        client = export_edge_stages(args.plan, args.device, args.export_dir, args.devices, args.client_key, args.client_server_key)
        cmds = stage_commands(args.plan, args.device, args.host, passthrough, args.devices)
        if client is None and not cmds:
            raise ConfigError(f"device {args.device} has no stage to serve or export")
        sup = Supervisor(cmds, RestartPolicy(max_restarts=args.max_restarts), hang) if cmds else None
    except SplitnetError as e:
        print(f"splitnet serve: {e}", file=sys.stderr)
        return 2
    if client is not None:
        print(f"exported the onnxruntime stage for {args.device}: {client['local_stage']} "
              f"(client config {Path(args.export_dir) / (args.device + '.client.json')}); on {args.device}, run:", flush=True)
        print(connect_snippet(client), flush=True)
    if sup is None:
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sup.start()
    print(f"serving {len(sup.children)} stage(s) of {args.plan} for device {args.device}", flush=True)
    try:
        while not stop.wait(0.5):
            if not sup.poll():
                refused = all(c.refused for c in sup.children)
                print(f"splitnet serve: every stage {'refused to start' if refused else 'failed'}; giving up "
                      "(see the stage errors above)", file=sys.stderr)
                return 2 if refused else 1
    finally:
        sup.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve every stage a plan places on one device (supervised); export its onnxruntime stage")
    p.add_argument("--plan", required=True, help="plan file (YAML/JSON) from `splitnet plan --out`")
    p.add_argument("--device", required=True, help="device name in the plan whose stages this node serves")
    p.add_argument("--devices", default=None, help="fleet YAML: stage endpoints missing from the plan come from its devices' `endpoint`")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (the port comes from the plan)")
    p.add_argument("--server-key", default="", help="CURVE secret key file of this node")
    p.add_argument("--keys-dir", default="", help="directory of allowed client public keys")
    p.add_argument("--insecure", action="store_true", help="serve plaintext (warned)")
    p.add_argument("--stage-keys-dir", default="", help="directory of the upstream stages' public keys (see serve-stage --stage-keys-dir)")
    p.add_argument("--transport", choices=("curvezmq",), default=os.environ.get("SPLITNET_TRANSPORT", "curvezmq"), help="keyed transport (see serve-stage --transport)")
    p.add_argument("--torch-device", dest="device_torch", default="", help="torch device for the stages (cpu, cuda)")
    p.add_argument("--dtype", default="", help="float32, float16 or bfloat16")
    p.add_argument("--max-restarts", type=int, default=5, help="restarts per stage within 5 minutes before giving up")
    p.add_argument("--hang-timeout-s", type=float, default=30.0,
                   help="a stage that answers no info, or has work queued and finishes none, for this long is killed and restarted")
    p.add_argument("--export-dir", default=".", help="where an onnxruntime stage of --device and its client config are written")
    p.add_argument("--client-key", default="", help="for the written client config: the client's secret key file")
    p.add_argument("--client-server-key", default="", help="for the written client config: the served stages' public keys, comma-separated")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)
