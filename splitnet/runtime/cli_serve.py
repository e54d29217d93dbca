"""``splitnet serve-stage``: run one stage worker in this process (for multi-machine use)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from splitnet.runtime.config import StageWorkerConfig


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=False, help="built-in name (minilm, tiny-gpt2, ...) or Hugging Face directory")
    p.add_argument("--blocks", help="blocks this stage serves as START:END (END exclusive), e.g. 0:2")
    p.add_argument("--plan", help="plan file (YAML/JSON); with --stage picks model, blocks, endpoint and codec")
    p.add_argument("--stage", type=int, default=None, help="stage index within --plan")
    p.add_argument("--bind", default=None, help="endpoint to bind, e.g. tcp://0.0.0.0:5555 (port 0: any free port)")
    p.add_argument("--stage-index", type=int, default=0, help="position in the pipeline (for reports)")
    p.add_argument("--codec-out", default="", help="codec for the outgoing cut: stateless name (fp16, int8) or saved codec file")
    p.add_argument("--codec-file", action="append", default=[], help="saved codec this stage may decode with (repeatable)")
    p.add_argument("--ready-endpoint", default="", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-requests", type=int, default=256, help="most concurrent KV caches")
    p.add_argument("--max-cache-mib", type=int, default=4096, help="KV cache memory limit (MiB)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weight/activation dtype")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument("--server-key", default=os.environ.get("SPLITNET_SERVER_KEY", ""), help="this stage's CURVE keypair (NAME.key_secret from `splitnet keys gen`; env SPLITNET_SERVER_KEY)")
    p.add_argument("--keys-dir", default=os.environ.get("SPLITNET_KEYS_DIR", ""), help="allow-list: directory of client public keys *.key (env SPLITNET_KEYS_DIR)")
    p.add_argument("--stage-keys-dir", default=os.environ.get("SPLITNET_STAGE_KEYS_DIR", ""),
                   help="public keys *.key of the upstream stages: they may connect and forward work on behalf of clients (env SPLITNET_STAGE_KEYS_DIR)")
    p.add_argument("--transport", default=os.environ.get("SPLITNET_TRANSPORT", "curvezmq"),
                   help="keyed transport: 'curvezmq' (libzmq CURVE handshake + ZAP allow-list; the only one); env SPLITNET_TRANSPORT")
    p.add_argument("--max-input-mib", type=int, default=128, help="largest input tensor (and message) this stage accepts, MiB; also ZMQ_MAXMSGSIZE")
    p.add_argument("--insecure", action="store_true", help="serve plaintext without authentication (warns; needed for a non-loopback bind without --server-key)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most requests one forward combines (1: no batching)")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="most positions one forward combines over its requests (padding included)")
    p.add_argument("--max-padding", type=float, default=0.5,
                   help="requests with different numbers of new tokens share a forward while its padding is at most this fraction of its real tokens (0: equal lengths only)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="wait up to this long for the rest of a batch: the first stage for the next steps of requests keeping their rhythm (never longer than its last forward), a later stage for the rest of the upstream batch")
    p.add_argument("--sent-log-mib", type=int, default=512,
                   help="memory for the hidden states this stage sent on per request, to refill a lost next stage's replacement without a full replay (0: none)")
    p.add_argument("--merge-chunk-tokens", type=int, default=64, help="run a request's consecutive queued prompt chunks as one forward of up to this many tokens (1: never merge)")
    p.add_argument("--shared-device", action="store_true", help="every stage of the pipeline runs on this stage's device (one GPU): the first stage waits the whole --batch-wait-ms for the requests it expects")
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, run decode steps eagerly instead of replaying captured graphs")
    p.add_argument("--cpus", default="", help="CPU cores to pin this stage to, e.g. 0-3 or 0,2,4 (torch threads default to their number)")
    p.add_argument("--max-request-cache-mib", type=int, default=0, help="KV cache memory limit per request (MiB; 0: same as --max-cache-mib)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics and /health over HTTP on this port of the bind host (0: any free port; off by default)")


def config_from_args(args: argparse.Namespace) -> StageWorkerConfig:
    from splitnet.errors import ConfigError

    model, blocks, bind, codec_out = args.model, args.blocks, args.bind, args.codec_out
    stage_index = args.stage_index
    codec_files = list(args.codec_file)
    if args.plan:
        from splitnet.runtime.plan_io import stage_from_plan

        s = stage_from_plan(args.plan, args.stage)
        model = model or s.model
        blocks = blocks or f"{s.start_block}:{s.end_block}"
        bind = bind or s.bind or "tcp://0.0.0.0:0"
        codec_out = codec_out or s.codec_out
        codec_files += list(s.codec_files)
        stage_index = args.stage
    if not model or not blocks:
        raise ConfigError("serve-stage needs --model and --blocks START:END (or --plan and --stage)")
    try:
        start, end = (int(x) for x in blocks.split(":"))
    except ValueError:
        raise ConfigError(f"--blocks must look like START:END (e.g. 0:2), got {blocks!r}") from None
    return StageWorkerConfig(
        model=model,
        start_block=start,
        end_block=end,
        bind=bind or "tcp://127.0.0.1:0",
        stage_index=stage_index,
        ready_endpoint=args.ready_endpoint,
        codec_out=codec_out,
        codec_files=tuple(codec_files),
        max_requests=args.max_requests,
        max_cache_bytes=args.max_cache_mib * 1024 * 1024,
        parent_pid=args.parent_pid,
        torch_threads=args.torch_threads,
        device=args.device,
        dtype=args.dtype,
        max_input_bytes=args.max_input_mib * 1024 * 1024,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_padding=args.max_padding,
        batch_wait_ms=args.batch_wait_ms,
        merge_chunk_tokens=args.merge_chunk_tokens,
        sent_log_bytes=args.sent_log_mib * 1024 * 1024,
        shared_device=args.shared_device,
        cuda_graphs=not args.no_cuda_graphs,
        cpus=parse_cpus(args.cpus),
        metrics_port=getattr(args, "metrics_port", None),
    )


def preflight(config: StageWorkerConfig) -> None:
    """What can be checked before the weights load: codecs by name, the port, the model's blocks."""
    from splitnet.runtime.preflight import check_blocks_in_model, check_codec_spec, check_port_free

    check_codec_spec(config.codec_out, "--codec-out")
    for f in config.codec_files:
        check_codec_spec(f, "--codec-file")
    check_port_free(config.bind, f"stage {config.stage_index}")
    check_blocks_in_model(config.model, config.start_block, config.end_block, f"stage {config.stage_index}")


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0-3,6"`` -> (0, 1, 2, 3, 6); checked against the cores this process may use."""
    from splitnet.errors import ConfigError

    if not text:
        return ()
    cpus: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as e:
        raise ConfigError(f"--cpus must look like 0-3 or 0,2,4, got {text!r}") from e
    allowed = os.sched_getaffinity(0)
    if not cpus or not set(cpus) <= allowed:
        raise ConfigError(f"--cpus {text!r} names cores outside those this machine lets the process use ({_ranges(sorted(allowed))})")
    return tuple(sorted(set(cpus)))


def _ranges(cores: list[int]) -> str:
    out, start = [], None
    for i, c in enumerate(cores):
        start = c if start is None else start
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(out)


def run(args: argparse.Namespace) -> int:
    from splitnet.errors import SplitnetError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from splitnet.wire.security import check_transport, stage_socket_config

        config = config_from_args(args)
        preflight(config)  # before the worker (torch, transformers) is even imported
        from splitnet.runtime.worker import serve_forever

        sock_cfg = stage_socket_config(args.server_key, args.keys_dir, args.insecure, config.bind, config.send_timeout_ms, check_transport(args.transport),
                                       stage_keys_dir=args.stage_keys_dir, max_message_bytes=config.max_input_bytes)
        serve_forever(config, socket_config=sock_cfg, max_request_cache_bytes=args.max_request_cache_mib * 1024 * 1024 or None)
    except SplitnetError as e:
        print(f"splitnet serve-stage: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    # The worker has closed its sockets and joined its compute thread. Leave without running C++
    # static destructors: torch's and libzmq's background threads can abort an orderly interpreter
    # exit ("terminate called without an active exception"), turning a clean stop into SIGABRT.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-stage", help="serve one stage of a model over ZeroMQ")
    add_stage_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.runtime.cli_serve")
    add_stage_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
