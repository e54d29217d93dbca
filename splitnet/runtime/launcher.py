"""Start a pipeline of stage processes on one host and wait for each READY handshake."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import zmq

from splitnet.errors import ConfigError, StageUnavailable
from splitnet.wire import decode_message, make_socket
from splitnet.wire.sockets import SocketConfig


@dataclass
class StageProcess:
    index: int
    blocks: tuple[int, int]
    endpoint: str
    pid: int
    popen: subprocess.Popen = field(repr=False)


class LocalPipeline:
    """Stage processes started by :func:`launch_pipeline`; a context manager that stops them."""

    def __init__(self, model: str, stages: list[StageProcess]):
        self.model = model
        self.stages = stages
        self._finalizer = weakref.finalize(self, _terminate, [s.popen for s in stages])

    @property
    def endpoints(self) -> list[str]:
        return [s.endpoint for s in self.stages]

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.stages]

    def kill_stage(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill one stage process (for fault tests)."""
        p = self.stages[index].popen
        p.send_signal(sig)
        p.wait(timeout=10)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LocalPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _terminate(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def even_cuts(num_blocks: int, num_stages: int) -> list[int]:
    """Block indices where stages 1..N-1 start, splitting blocks as evenly as possible."""
    if not 1 <= num_stages <= num_blocks:
        raise ConfigError(f"cannot cut {num_blocks} blocks into {num_stages} stages")
    return [round(i * num_blocks / num_stages) for i in range(1, num_stages)]


def launch_pipeline(
    model: str,
    cuts: Sequence[int] | None = None,
    *,
    num_stages: int = 3,
    host: str = "127.0.0.1",
    codecs: Sequence[str] | None = None,
    codec_files: Sequence[str] = (),
    ready_timeout_s: float = 120.0,
    torch_threads: int = 1,
    extra_args: Sequence[str] = (),
    env: dict | None = None,
) -> LocalPipeline:
    """Start one process per stage of ``model`` cut before each block index in ``cuts``.

    Args:
        model: built-in name or Hugging Face directory.
        cuts: block indices where a new stage starts (e.g. [2, 4] for 6 blocks -> 0:2, 2:4, 4:6);
            default: ``num_stages`` even slices.
        host: address every stage binds (a free port is chosen per stage).
        codecs: codec for each cut (len(cuts) entries; "" = raw).
        codec_files: saved codecs every stage may decode with.
        ready_timeout_s: how long to wait for all READY handshakes.
    """
    from splitnet.model.weights import read_config
    from splitnet.model.loading import architecture_for, resolve_model_dir

    model_dir = resolve_model_dir(model)  # also materialises a built-in before the stages race for it
    L = architecture_for(read_config(model_dir)).num_blocks
    cuts = list(cuts) if cuts is not None else even_cuts(L, num_stages)
    bounds = [0, *cuts, L]
    if sorted(set(bounds)) != bounds:
        raise ConfigError(f"cuts {cuts} must be strictly increasing inside 1..{L - 1}")
    codecs = list(codecs) if codecs is not None else [""] * len(cuts)
    if len(codecs) != len(cuts):
        raise ConfigError(f"{len(codecs)} codecs given for {len(cuts)} cuts")
    ctx = zmq.Context.instance()
    ready = make_socket(ctx, zmq.ROUTER, SocketConfig(), server=True)
    ready_port = ready.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
    procs: list[subprocess.Popen] = []
    try:
        for i in range(len(bounds) - 1):
            cmd = [
                sys.executable, "-m", "splitnet.runtime.cli_serve",
                "--model", str(model),
                "--blocks", f"{bounds[i]}:{bounds[i + 1]}",
                "--bind", f"tcp://{host}:0",
                "--stage-index", str(i),
                "--ready-endpoint", f"tcp://127.0.0.1:{ready_port}",
                "--parent-pid", str(os.getpid()),
                "--torch-threads", str(torch_threads),
                *(["--codec-out", codecs[i]] if i < len(codecs) and codecs[i] else []),
                *[a for f in codec_files for a in ("--codec-file", f)],
                *extra_args,
            ]
            procs.append(subprocess.Popen(cmd, env={**os.environ, **(env or {})}))
        infos: dict[int, dict] = {}
        deadline = time.monotonic() + ready_timeout_s
        while len(infos) < len(procs):
            for i, p in enumerate(procs):
                if p.poll() is not None and i not in infos:
                    raise StageUnavailable(f"stage {i} (blocks {bounds[i]}:{bounds[i + 1]}) exited with code {p.returncode} before READY; see its log above")
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageUnavailable(f"stages {sorted(set(range(len(procs))) - set(infos))} sent no READY within {ready_timeout_s} s")
            if ready.poll(min(200, int(left * 1000))):
                frames = ready.recv_multipart()
                msg = decode_message(frames[1:])
                if msg.kind == "info_reply" and msg.meta.get("ready"):
                    infos[int(msg.meta["stage_index"])] = dict(msg.meta)
    except BaseException:
        _terminate(procs)
        raise
    finally:
        ready.close(linger=0)
    stages = [
        StageProcess(index=i, blocks=(bounds[i], bounds[i + 1]), endpoint=infos[i]["endpoint"], pid=infos[i]["pid"], popen=procs[i])
        for i in range(len(procs))
    ]
    return LocalPipeline(str(model), stages)
