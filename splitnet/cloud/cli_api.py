"""``splitnet api``: serve a pipeline as an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    splitnet api --endpoints tcp://cloud:5555,tcp://cloud:5556 --api-keys-file keys.txt \\
        --client-key keys/api/api.key_secret --server-key keys/stage.key --host 0.0.0.0 --port 8000

Before serving it checks the port, connects to every stage (their handshake says the model,
blocks and context), loads the tokenizer and chat template: a mistake ends here with one line,
not at the first request. See docs/api.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from splitnet.errors import ConfigError, SplitnetError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from splitnet.cloud.api.client_options import add_client_arguments

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--plan", help="plan file (YAML/JSON) whose stages carry endpoints")
    src.add_argument("--endpoints", help="stage endpoints in pipeline order, comma-separated (tcp://host:port,...)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs API keys or --no-auth)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", action="append", default=[], help="a bearer key clients must send (repeatable; env SPLITNET_API_KEY)")
    p.add_argument("--api-keys-file", default=os.environ.get("SPLITNET_API_KEYS_FILE", ""), help="file of bearer keys, one a line, mode 0600 (env SPLITNET_API_KEYS_FILE)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys on a non-loopback --host (anyone who reaches the port may use the pipeline)")
    p.add_argument("--served-model-name", default="", help="model id clients send and /v1/models lists (default: the stages' model name)")
    p.add_argument("--model-dir", default="", help="directory with the model's config.json, tokenizer and chat template (default: the stages' model, when it exists here)")
    p.add_argument("--sessions", type=int, default=4, help="pipeline sessions kept open (requests served at once; the stages batch them)")
    p.add_argument("--step-timeout-s", type=float, default=60.0, help="longest wait for one pipeline step")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="longest one request may run")
    p.add_argument("--acquire-timeout-s", type=float, default=30.0, help="longest wait for a free session before answering 503")
    p.add_argument("--default-max-tokens", type=int, default=256, help="new tokens of a chat completion that names no max_tokens")
    p.add_argument("--metrics-need-key", action="store_true", help="/metrics asks for an API key too (default: /metrics and /health are open)")
    add_client_arguments(p)
    p.add_argument("--log-level", default="WARNING")


def _loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("localhost", "::1")


def _check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be 1-65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (is another `splitnet api` running? pick another --port)") from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pool = None
    try:
        from splitnet.cloud.api.auth import APIKeys, read_keys_file
        from splitnet.cloud.api.client_options import client_config
        from splitnet.cloud.api.config import APIConfig

        keys_given = list(args.api_key) + ([os.environ["SPLITNET_API_KEY"]] if os.environ.get("SPLITNET_API_KEY") else [])
        if args.api_keys_file:
            keys_given += read_keys_file(args.api_keys_file)
        keys = APIKeys(keys_given)
        if not keys.enabled and not _loopback(args.host) and not args.no_auth:
            raise ConfigError(f"refusing to serve {args.host}:{args.port} without API keys: pass --api-key KEY or --api-keys-file FILE, "
                              "or --no-auth to let anyone who reaches the port use the pipeline")
        config = APIConfig(served_model_name=args.served_model_name, sessions=args.sessions, acquire_timeout_s=args.acquire_timeout_s,
                           step_timeout_s=args.step_timeout_s, request_timeout_s=args.request_timeout_s, default_max_tokens=args.default_max_tokens,
                           metrics_need_key=args.metrics_need_key)
        _check_port(args.host, args.port)
        client = client_config(args, timeout_s=args.step_timeout_s)
        pool, facts = open_pipeline(args.plan or [e.strip() for e in args.endpoints.split(",") if e.strip()], client, config, args.model_dir)
        import uvicorn

        from splitnet.cloud.api.app import create_app

        from splitnet.cloud.cli_status import probe

        app = create_app(facts, pool, config, keys, stage_probe=lambda: probe(list(facts.endpoints), client, timeout_s=2.0, sample_s=0.0))
        print(f"splitnet api: serving {facts.served_name} ({facts.kind}, {facts.num_stages} stages) at http://{args.host}:{args.port}/v1"
              f"{'' if keys.enabled else ' without API keys'}", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                               timeout_graceful_shutdown=5, access_log=False))
        server.run()
        return 0 if server.started else 2
    except SplitnetError as e:
        print(f"splitnet api: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if pool is not None:
            pool.close()


def open_pipeline(stages, client, config, model_dir: str = ""):
    """Connect a first session (the pipeline's checks happen here), read what it serves, and
    make the pool that further sessions open into."""
    from splitnet.cloud.api.pipeline import read_facts
    from splitnet.cloud.api.sessions import SessionPool
    from splitnet.edge.sdk import connect

    first = connect(stages, config=client)
    try:
        facts = read_facts(first, config.served_model_name, model_dir)
    except BaseException:
        first.close()
        raise

    def open_session():
        return connect(stages, config=client, tokenizer=facts.tokenizer)

    return SessionPool(open_session, config.sessions, config.acquire_timeout_s, first=first), facts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("api", help="serve a pipeline as an OpenAI-compatible HTTP API (completions, chat, embeddings, /metrics)")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.cloud.cli_api")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
