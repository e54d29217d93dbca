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
from splitnet.runtime.stage_fork import ForkedStage, fork_available, fork_stage
from splitnet.wire import decode_message, make_socket
from splitnet.wire.sockets import SocketConfig


@dataclass
class StageProcess:
    index: int
    blocks: tuple[int, int]
    endpoint: str
    pid: int
    popen: "subprocess.Popen | ForkedStage" = field(repr=False)


class LocalPipeline:
    """Stage processes started by :func:`launch_pipeline`; a context manager that stops them."""

    def __init__(self, model: str, stages: list[StageProcess], spec: "_LaunchSpec | None" = None, codecs: Sequence[str] = ()):
        self.model = model
        self.stages = stages
        self._spec = spec
        self._codecs = list(codecs)
        self._procs = [s.popen for s in stages]  # every process ever started, for shutdown
        self._finalizer = weakref.finalize(self, _terminate, self._procs)

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

    def respawn_stage(self, index: int) -> str:
        """Start a fresh process for stage ``index`` (same blocks, new port) and return its
        endpoint; the old process, if still alive, is killed. Used as a recovery hook:
        ``splitnet.connect(..., recovery=pipe.respawn_stage)``."""
        if self._spec is None:
            raise ConfigError("this pipeline was not started by launch_pipeline; cannot respawn stages")
        old = self.stages[index]
        if old.popen.poll() is None:
            old.popen.kill()
            old.popen.wait(timeout=10)
        codec = self._codecs[index] if index < len(self._codecs) else ""
        new = _spawn_stages(self._spec, [(index, old.blocks, codec)])[0]
        self._procs.append(new.popen)
        self.stages[index] = new
        return new.endpoint

    def start_stage(self, index: int, blocks: tuple[int, int], *, bind: str = "", codec: str = "") -> StageProcess:
        """Start one more ``serve-stage`` process for ``blocks`` (a warm standby, a re-planned
        stage, or ``bind``: a restart on a known endpoint) and wait for its READY; it is stopped
        with the pipeline but not put in ``stages`` (the caller decides when it serves)."""
        if self._spec is None:
            raise ConfigError("this pipeline was not started by launch_pipeline; cannot start stages")
        new = _spawn_stages(self._spec, [(index, tuple(blocks), codec)], binds={index: bind} if bind else None)[0]
        self._procs.append(new.popen)
        return new

    def codec_of(self, index: int) -> str:
        """The codec stage ``index`` was started with ("" for none)."""
        return self._codecs[index] if index < len(self._codecs) else ""

    def restart_stage_in_place(self, index: int) -> str:
        """Kill stage ``index`` and start a fresh process for its blocks on the same endpoint
        (as a supervisor restarting it would); returns the endpoint."""
        old = self.stages[index]
        if old.popen.poll() is None:
            old.popen.kill()
            old.popen.wait(timeout=10)
        codec = self._codecs[index] if index < len(self._codecs) else ""
        self.stages[index] = self.start_stage(index, old.blocks, bind=old.endpoint, codec=codec)
        return old.endpoint

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "LocalPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _terminate(procs: "list[subprocess.Popen | ForkedStage]", grace_s: float = 5.0) -> None:
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


@dataclass(frozen=True)
class _LaunchSpec:
    model: str
    host: str
    torch_threads: int
    codec_files: tuple[str, ...]
    extra_args: tuple[str, ...]
    env: dict
    ready_timeout_s: float
    stage_cpus: tuple[str, ...] = ()  # per stage index: cores to pin it to ("" or missing: not pinned)
    start: str = "exec"  # "fork": from the preloaded fork server (stage_fork); "exec": a fresh interpreter


#: How ``launch_pipeline`` may start stage processes.
START_METHODS = ("auto", "fork", "exec")


def _start_method(start: str, env: dict, extra_args: Sequence[str]) -> str:
    """``auto``: fork when the platform can, the launch sets no environment of its own (read at
    import, which a fork has done already) and no stage runs on CUDA (fork servers and CUDA
    drivers are not tested together here); otherwise exec."""
    if start not in START_METHODS:
        raise ConfigError(f"start must be one of {', '.join(START_METHODS)}, got {start!r}")
    if start == "fork" and not fork_available():
        raise ConfigError("start='fork' needs os.fork (a POSIX system); use start='exec'")
    if start != "auto":
        return start
    args = list(extra_args)
    at = args.index("--device") + 1 if "--device" in args else len(args)
    on_cuda = at < len(args) and args[at].startswith("cuda")
    return "fork" if fork_available() and not env and not on_cuda else "exec"


def _spawn_stages(spec: _LaunchSpec, stages: list[tuple[int, tuple[int, int], str]], binds: dict[int, str] | None = None) -> list[StageProcess]:
    """Start one process per (index, blocks, codec) and wait for every READY handshake
    (``binds``: an endpoint per index to bind instead of a free port)."""
    ctx = zmq.Context.instance()
    ready = make_socket(ctx, zmq.ROUTER, SocketConfig(), server=True)
    ready_port = ready.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
    procs: dict[int, subprocess.Popen | ForkedStage] = {}
    try:
        for i, (a, b), codec in stages:
            args = [
                "--model", spec.model,
                "--blocks", f"{a}:{b}",
                "--bind", (binds or {}).get(i) or f"tcp://{spec.host}:0",
                "--stage-index", str(i),
                "--ready-endpoint", f"tcp://127.0.0.1:{ready_port}",
                "--parent-pid", str(os.getpid()),
                "--torch-threads", str(spec.torch_threads),
                *(["--cpus", spec.stage_cpus[i]] if i < len(spec.stage_cpus) and spec.stage_cpus[i] else []),
                *(["--codec-out", codec] if codec else []),
                *[x for f in spec.codec_files for x in ("--codec-file", f)],
                *spec.extra_args,
            ]
            if "--server-key" not in spec.extra_args:
                args.append("--insecure")  # local stages without keys: plaintext, stated explicitly
            environ = {**os.environ, **spec.env}
            if spec.start == "fork":
                procs[i] = fork_stage(args, environ)
            else:
                procs[i] = subprocess.Popen([sys.executable, "-m", "splitnet.runtime.cli_serve", *args], env=environ)
        infos: dict[int, dict] = {}
        deadline = time.monotonic() + spec.ready_timeout_s
        while len(infos) < len(procs):
            for i, p in procs.items():
                if p.poll() is not None and i not in infos:
                    raise StageUnavailable(f"stage {i} exited with code {p.returncode} before READY; see its log above")
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageUnavailable(f"stages {sorted(set(procs) - set(infos))} sent no READY within {spec.ready_timeout_s} s")
            if ready.poll(min(200, int(left * 1000))):
                frames = ready.recv_multipart()
                msg = decode_message(frames[1:])
                if msg.kind == "info_reply" and msg.meta.get("ready"):
                    infos[int(msg.meta["stage_index"])] = dict(msg.meta)
    except BaseException:
        _terminate(list(procs.values()))
        raise
    finally:
        ready.close(linger=0)
    return [
        StageProcess(index=i, blocks=tuple(blocks), endpoint=infos[i]["endpoint"], pid=infos[i]["pid"], popen=procs[i])
        for i, blocks, _ in stages
    ]


def disjoint_cpus(num_stages: int, cores_per_stage: int) -> list[str]:
    """``num_stages`` disjoint sets of ``cores_per_stage`` cores this process may use, as
    ``--cpus`` strings (a ConfigError when there are not enough)."""
    cores = sorted(os.sched_getaffinity(0))
    if num_stages * cores_per_stage > len(cores):
        raise ConfigError(f"{num_stages} stages x {cores_per_stage} cores need {num_stages * cores_per_stage} cores; this process may use {len(cores)}")
    return [",".join(str(c) for c in cores[i * cores_per_stage : (i + 1) * cores_per_stage]) for i in range(num_stages)]


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
    stage_cpus: Sequence[str] = (),
    start: str = "auto",
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
        stage_cpus: per stage, the cores to pin it to (``"0-3"``; see :func:`disjoint_cpus`).
        start: how stage processes (and later standbys and respawns) start: ``"fork"`` from a
            server that has imported torch and transformers once (see
            :mod:`splitnet.runtime.stage_fork`), ``"exec"`` a fresh interpreter each, ``"auto"``
            fork where it is safe (no ``env`` of the launch's own, no CUDA stage).
    """
    from splitnet.model.weights import read_config
    from splitnet.model.loading import architecture_for, resolve_model_dir

    method = _start_method(start, dict(env or {}), extra_args)  # before any work
    model_dir = resolve_model_dir(model)  # also materialises a built-in before the stages race for it
    L = architecture_for(read_config(model_dir)).num_blocks
    cuts = list(cuts) if cuts is not None else even_cuts(L, num_stages)
    bounds = [0, *cuts, L]
    if sorted(set(bounds)) != bounds:
        raise ConfigError(f"cuts {cuts} must be strictly increasing inside 1..{L - 1}")
    codecs = list(codecs) if codecs is not None else [""] * len(cuts)
    if len(codecs) != len(cuts):
        raise ConfigError(f"{len(codecs)} codecs given for {len(cuts)} cuts")
    from splitnet.runtime.preflight import check_codec_spec

    for i, c in enumerate(codecs):
        check_codec_spec(c, f"codec of cut {i}")  # in this process, before any stage starts
    spec = _LaunchSpec(str(model), host, torch_threads, tuple(codec_files), tuple(extra_args), dict(env or {}), ready_timeout_s, tuple(stage_cpus), method)
    blocks = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    stages = _spawn_stages(spec, [(i, b, codecs[i] if i < len(codecs) else "") for i, b in enumerate(blocks)])
    return LocalPipeline(str(model), stages, spec, codecs)
