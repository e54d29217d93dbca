"""Start a `serve-stage` process by hand, as an operator would, for integration tests."""

from __future__ import annotations

import os
import subprocess
import sys


def serve_stage(blocks: str, extra: list[str] = (), model: str = "minilm") -> tuple[subprocess.Popen, str]:
    """A stage serving ``blocks`` of ``model`` on a random 127.0.0.1 port: (process, endpoint).
    Blocks until the READY line (or the process exits, which raises with its stderr)."""
    cmd = [sys.executable, "-m", "splitnet.runtime.cli_serve", "--model", model, "--blocks", blocks,
           "--bind", "tcp://127.0.0.1:0", "--torch-threads", "1", "--parent-pid", str(os.getpid()), *extra]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # READY handshake on stdout (blocks until the stage is up or exits)
    if not line.startswith("READY"):
        p.kill()
        raise RuntimeError(f"stage did not start: {line!r} {p.stderr.read()}")
    return p, line.split()[1]
