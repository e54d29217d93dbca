"""Start stage processes by forking a server that has imported torch, transformers and the stage
worker once (a zygote, as Android starts apps and as multiprocessing's forkserver does), instead of
a fresh interpreter per stage.

A fresh ``python -m splitnet.runtime.cli_serve`` spends seconds importing torch and transformers
before it loads a block (about 5 CPU-seconds on one core, and tens of seconds of wall time when
a dozen stages start at once on a small host); a fork of the preloaded server starts at the model
build. :func:`splitnet.runtime.launcher.launch_pipeline` starts local stages, warm standbys and
replacements this way on Linux (``start="auto"``); ``start="exec"`` keeps one interpreter per stage.

What a forked stage shares with an exec'd one: the command line (the same ``cli_serve`` argument
parser runs in the child), the environment (the child's ``os.environ`` is replaced by the one the
caller would have given ``Popen``), stdout and stderr (the caller's), signals (it is an ordinary
process: SIGKILL, SIGSTOP, SIGTERM reach it by pid) and its exit code (the server reaps it and
reports the code). What it does not: environment variables read while torch, transformers or
splitnet are *imported* (``OMP_NUM_THREADS``, ``SPLITNET_TRACE_CLOCK``...) keep the values of the
moment the server started, so a launch with an ``env`` of its own uses exec; and the stage is the
server's child, not the caller's (``os.waitpid`` on it fails; use :class:`ForkedStage`).

Why not ``multiprocessing``'s forkserver: every child re-imports the caller's ``__main__`` module,
so a user's script without an ``if __name__ == "__main__":`` guard would start stages from inside
each stage. The server here is ``python -m splitnet.runtime.stage_fork``; requests and replies are
JSON lines on two pipes between this process and its own child, nothing pickled.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from splitnet.errors import StageUnavailable

#: Modules the server imports once, before any fork: the cost a stage would pay at start.
PRELOAD = ("numpy", "torch", "transformers", "zmq", "msgpack", "splitnet.runtime.cli_serve", "splitnet.runtime.worker",
           "splitnet.model.loading", "splitnet.model.builtin")

#: How long a fork request may take before the server is deemed broken (it forks in milliseconds;
#: its first request waits for the imports).
START_TIMEOUT_S = 300.0


def fork_available() -> bool:
    """Whether this platform can fork (POSIX)."""
    return hasattr(os, "fork") and sys.platform != "win32"


class ForkedStage:
    """A stage process forked by the server, with the part of :class:`subprocess.Popen` the
    launcher uses (``pid``, ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``,
    ``returncode``). The exit code is the server's report; if the server itself is gone, a
    vanished process reads as exit code -1."""

    def __init__(self, server: "_Server", pid: int):
        self._server = server
        self.pid = pid

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        return self._server.exit_code(self.pid)

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"stage pid {self.pid}", timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Server:
    """This process's end of the fork server: one request pipe, one reply pipe, a reader thread."""

    def __init__(self) -> None:
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        self.popen = subprocess.Popen([sys.executable, "-m", "splitnet.runtime.stage_fork", str(req_r), str(rep_w)],
                                      pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL)
        os.close(req_r)
        os.close(rep_w)
        self._cond = threading.Condition()
        self._started: dict[int, int] = {}  # request id -> pid
        self._exits: dict[int, int] = {}  # pid -> exit code
        self._gone = False
        self._next_id = 0
        self._write_lock = threading.Lock()
        threading.Thread(target=self._read_replies, name="splitnet-stage-fork-replies", daemon=True).start()

    def _read_replies(self) -> None:
        with os.fdopen(self._rep_r, "r", encoding="utf-8") as f:
            for line in f:
                reply = json.loads(line)
                with self._cond:
                    if "started" in reply:
                        self._started[int(reply["started"])] = int(reply["pid"])
                    elif "exited" in reply:
                        self._exits[int(reply["exited"])] = int(reply["code"])
                    self._cond.notify_all()
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def fork(self, argv: Sequence[str], environ: dict[str, str]) -> int:
        with self._cond:
            if self._gone:
                raise _ServerGone(f"the stage fork server (pid {self.popen.pid}) has exited with code {self.popen.poll()}; no stage can start from it")
            rid = self._next_id
            self._next_id += 1
        line = json.dumps({"id": rid, "argv": list(argv), "env": dict(environ)}) + "\n"
        with self._write_lock:
            try:
                os.write(self._req_w, line.encode("utf-8"))
            except BrokenPipeError:  # killed a moment ago: its reader has not seen the end of its pipe yet
                raise _ServerGone(f"the stage fork server (pid {self.popen.pid}) has exited; no stage can start from it") from None
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._started or self._gone, START_TIMEOUT_S):
                raise StageUnavailable(f"the stage fork server (pid {self.popen.pid}) forked nothing within {START_TIMEOUT_S:.0f} s")
            if rid not in self._started:
                raise _ServerGone(f"the stage fork server (pid {self.popen.pid}) exited before it forked the stage")
            return self._started.pop(rid)

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            if not self._gone:
                return None
        try:  # the server is gone: nobody reaps it; alive or not is all that can be known
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return -1
        except PermissionError:
            return None

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._gone, timeout)
        code = self.exit_code(pid)
        if code is None and self._gone:  # nobody reports exits now: poll for the process to vanish
            deadline = None if timeout is None else time.monotonic() + timeout
            while code is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.05)
                code = self.exit_code(pid)
        return code


class _ServerGone(StageUnavailable):
    """The fork server died (killed with the caller's other children, say) before it forked."""


_server_lock = threading.Lock()
_server: _Server | None = None


def _current_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server._gone or _server.popen.poll() is not None:
            _server = _Server()
        return _server


def fork_stage(argv: Sequence[str], environ: dict[str, str]) -> ForkedStage:
    """Fork a stage process running ``cli_serve`` with ``argv`` in ``environ``. The first call
    starts the server (one interpreter start plus the imports in :data:`PRELOAD`)."""
    for attempt in range(2):
        server = _current_server()
        try:
            return ForkedStage(server, server.fork(argv, environ))
        except _ServerGone:
            # killed a moment ago (a cleanup that kills every child of the caller does it), so
            # not yet seen as exited: wait for it to end, then start another server, once
            if attempt:
                raise
            try:
                server.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.popen.kill()
                server.popen.wait(timeout=10)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- the server ---------

def _child(argv: list[str], environ: dict[str, str], control_fds: tuple[int, ...]) -> None:
    """In the forked child: become ``python -m splitnet.runtime.cli_serve ARGV``."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in control_fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = ["python -m splitnet.runtime.cli_serve", *argv]
        from splitnet.runtime.cli_serve import main

        code = int(main(argv) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - print it as the interpreter would, then leave
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm(argv: list[str], warmed: set[str]) -> None:
    """Import, in the server and before it forks, what a stage of ``--model`` imports lazily
    (transformers' modeling module of its family: seconds), once per model; the first stage of a
    model pays it here, the next ones not at all. Only imports: no torch op runs in the server,
    so no OpenMP pool exists to be broken by a fork."""
    model = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else ""
    if not model or model in warmed:
        return
    warmed.add(model)
    try:
        from splitnet.runtime.preflight import model_block_count

        model_block_count(model)
    except Exception:  # noqa: BLE001 - the stage itself reports a bad model, with its own message
        pass


def _serve(req_fd: int, rep_fd: int) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears SIGCHLD
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the caller, who stops its stages
    control = (req_fd, rep_fd, wake_r, wake_w)
    buf = b""
    warmed: set[str] = set()

    def reply(obj: dict) -> None:
        os.write(rep_fd, (json.dumps(obj) + "\n").encode("utf-8"))

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            reply({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    while True:
        try:
            ready, _, _ = select.select([req_fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap()
        if req_fd in ready:
            chunk = os.read(req_fd, 1 << 20)
            if not chunk:  # the caller is gone; its stages watch its pid and leave on their own
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                _warm(list(req["argv"]), warmed)
                pid = os.fork()
                if pid == 0:
                    _child(list(req["argv"]), dict(req["env"]), control)
                reply({"started": req["id"], "pid": pid})
        reap()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
