"""Start `splitnet api` as a real process for integration tests, and find free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    """A free port below Linux's ephemeral range (a client reconnecting to a port in that range
    can be handed a TCP self-connection by the kernel, which then holds the port)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-30000")


def start_api(args: list[str], timeout_s: float = 90.0, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`splitnet api ARGS --port P` until its /health answers: (process, base URL)."""
    port = free_port()
    cmd = [sys.executable, "-m", "splitnet.cli", "api", *args, "--port", str(port)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"splitnet api exited with {p.returncode}: {p.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                return p, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    p.kill()
    raise RuntimeError(f"splitnet api did not answer /health within {timeout_s} s: {p.stderr.read()}")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
