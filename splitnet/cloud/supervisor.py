"""Keep a set of stage processes running: restart a crashed one with bounded exponential backoff,
and kill (then restart) a hung one: a stage whose heartbeat (``info`` on its control socket)
gets no answer, or shows work queued and no forward done, for ``HangPolicy.hang_timeout_s``
(``splitnet serve --hang-timeout-s``). Keyed (CURVE) stages are asked as their own keypair."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from splitnet.errors import ConfigError

log = logging.getLogger("splitnet.cloud")
USER_ERROR_EXIT = 2  # what `splitnet serve-stage` returns for a SplitnetError raised before serving


@dataclass(frozen=True)
class RestartPolicy:
    """How a crashed stage is restarted.

    Attributes:
        max_restarts: restarts allowed per stage within ``window_s`` before giving up.
        window_s: the sliding window for ``max_restarts``.
        backoff_initial_s: delay before the first restart; doubles per restart in the window.
        backoff_max_s: cap of that delay.
    """

    max_restarts: int = 5
    window_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("RestartPolicy needs max_restarts >= 0, window_s > 0 and 0 < backoff_initial_s <= backoff_max_s")


@dataclass(frozen=True)
class HangPolicy:
    """When a running stage counts as hung (it is then killed and restarted like a crash).

    Attributes:
        check_interval_s: how often each stage's ``info`` is asked.
        hang_timeout_s: no answer, or work queued and no forward done, for this long: hung.
        startup_timeout_s: how long a new process may take to answer its first ``info``.
        probe_timeout_s: how long one ``info`` may take.
    """

    check_interval_s: float = 2.0
    hang_timeout_s: float = 30.0
    startup_timeout_s: float = 300.0
    probe_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        if min(self.check_interval_s, self.hang_timeout_s, self.startup_timeout_s, self.probe_timeout_s) <= 0:
            raise ConfigError("HangPolicy needs positive check_interval_s, hang_timeout_s, startup_timeout_s and probe_timeout_s")


@dataclass
class _Heartbeat:
    """What the hang check knows of one process."""

    answered: bool = False  # it answered info once since it started
    next_check: float = 0.0
    last_answer: float = 0.0
    forwards: int | None = None
    moved_at: float = 0.0  # last time it answered with no work queued, or with more forwards done


def _probe_security(cmd: list[str]) -> tuple[bool, object | None]:
    """How to ask a ``serve-stage`` command's stage for ``info``: (askable, socket security).
    Plaintext with ``--insecure``; with ``--server-key`` (or ``SPLITNET_SERVER_KEY``, which the
    child inherits) as the stage's own keypair, which every stage allows to connect (the key
    file is on this node: the supervisor started the stage with it); otherwise not askable."""
    import os

    if "--insecure" in cmd:
        return True, None
    key = cmd[cmd.index("--server-key") + 1] if "--server-key" in cmd[:-1] else os.environ.get("SPLITNET_SERVER_KEY", "")
    if not key:
        return False, None
    from splitnet.wire.security import DEFAULT_TRANSPORT, CurveConfig, load_keypair

    transport = cmd[cmd.index("--transport") + 1] if "--transport" in cmd[:-1] else os.environ.get("SPLITNET_TRANSPORT", DEFAULT_TRANSPORT)
    return True, CurveConfig(keypair=load_keypair(key), transport=transport)


def info_probe(cmd: list[str], timeout_s: float) -> dict | None:
    """A stage's ``info`` (None: no answer within ``timeout_s``), asked in plaintext for an
    ``--insecure`` stage and over CURVE, authenticated as the stage's own keypair, for a keyed
    one; for a command that is not a ``serve-stage`` with ``--bind`` (or a keyed one whose key
    this process cannot read), nothing to ask: returns {}."""
    if "--bind" not in cmd[:-1]:
        return {}
    try:
        askable, security = _probe_security(cmd)
    except Exception as e:  # noqa: BLE001 - an unreadable key: the stage itself will refuse to start, and say why
        log.warning("cannot probe %s: %s", cmd[cmd.index("--bind") + 1], e)
        return {}
    if not askable:
        return {}
    bind = cmd[cmd.index("--bind") + 1]
    endpoint = bind.replace("://0.0.0.0:", "://127.0.0.1:").replace("://*:", "://127.0.0.1:")
    import zmq

    from splitnet.wire import SocketConfig, make_socket
    from splitnet.cloud.cli_status import _ask_info
    from splitnet.wire.security import HandshakeWatch

    sock = make_socket(zmq.Context.instance(), zmq.DEALER, SocketConfig(security=security))
    watch = HandshakeWatch(secure=security is not None)
    try:
        watch.add(sock, endpoint)
        sock.connect(endpoint)
        info, _ = _ask_info(sock, watch, timeout_s)
        return info
    except Exception:  # noqa: BLE001 - any failure to answer is "no answer"
        return None
    finally:
        watch.close()
        sock.close(linger=0)


@dataclass
class SupervisedProcess:
    name: str
    cmd: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0
    failed: bool = False
    refused: bool = False  # exited with USER_ERROR_EXIT: a configuration mistake, not a crash
    heartbeat: _Heartbeat = field(default_factory=_Heartbeat)
    hung_kills: int = 0


class Supervisor:
    """Start every command, restart the ones that exit, stop them all on :meth:`stop`."""

    def __init__(self, commands: dict[str, list[str]], policy: RestartPolicy | None = None, hang: HangPolicy | None = None,
                 probe: Callable[[list[str], float], dict | None] = info_probe):
        if not commands:
            raise ConfigError("nothing to supervise")
        self.policy = policy or RestartPolicy()
        self.hang = hang or HangPolicy()
        self._probe = probe  # probe(cmd, timeout_s) -> info, None (no answer) or {} (nothing to ask)
        self.children = [SupervisedProcess(name, cmd) for name, cmd in commands.items()]

    def start(self) -> None:
        for c in self.children:
            self._spawn(c)

    def _spawn(self, c: SupervisedProcess) -> None:
        c.proc = subprocess.Popen(c.cmd)
        now = time.monotonic()
        c.heartbeat = _Heartbeat(next_check=now + self.hang.check_interval_s, last_answer=now, moved_at=now)
        log.info("started %s (pid %d)", c.name, c.proc.pid)

    def _check_hung(self, c: SupervisedProcess, now: float) -> None:
        """Kill ``c`` when its heartbeat shows it hung (the exit is then restarted as a crash)."""
        hb = c.heartbeat
        if now < hb.next_check:
            return
        info = self._probe(c.cmd, self.hang.probe_timeout_s)
        now = time.monotonic()
        hb.next_check = now + self.hang.check_interval_s
        if info == {}:
            return  # nothing to ask this process
        why = ""
        if info is None:
            limit = self.hang.hang_timeout_s if hb.answered else self.hang.startup_timeout_s
            if now - hb.last_answer > limit:
                why = f"answered no info for {now - hb.last_answer:.1f} s"
        else:
            forwards = (info.get("stats") or {}).get("forwards")
            queued = info.get("queue_depth") or 0
            if not queued or forwards != hb.forwards:
                hb.moved_at = now
            hb.answered, hb.last_answer, hb.forwards = True, now, forwards
            if now - hb.moved_at > self.hang.hang_timeout_s:
                why = f"has {queued} steps queued and finished none for {now - hb.moved_at:.1f} s"
        if why:
            log.error("%s (pid %d) %s: hung; killing it to restart", c.name, c.proc.pid, why)
            c.hung_kills += 1
            c.proc.kill()
            c.proc.wait(timeout=10)

    def poll(self) -> bool:
        """Restart children that exited; return False once every child has failed for good."""
        now = time.monotonic()
        for c in self.children:
            if c.failed or c.proc is None:
                continue
            code = c.proc.poll()
            if code is None and c.next_start == 0.0:
                self._check_hung(c, now)
                code = c.proc.poll()
            if code is None:
                continue
            if c.next_start == 0.0 and code == USER_ERROR_EXIT:
                # serve-stage exits 2 for a configuration mistake (port taken, bad codec, blocks):
                # a restart would fail the same way, so say it once instead of looping
                log.error("%s refused to start (exit code %d, its error is above); not restarting", c.name, code)
                c.failed = c.refused = True
                continue
            if c.next_start == 0.0:
                c.restarts = [t for t in c.restarts if now - t < self.policy.window_s]
                if len(c.restarts) >= self.policy.max_restarts:
                    log.error("%s exited with %s and was restarted %d times in %.0f s; giving up", c.name, code, len(c.restarts), self.policy.window_s)
                    c.failed = True
                    continue
                delay = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** len(c.restarts))
                log.warning("%s exited with %s; restarting in %.1f s", c.name, code, delay)
                c.next_start = now + delay
            elif now >= c.next_start:
                c.restarts.append(now)
                c.next_start = 0.0
                self._spawn(c)
        return not all(c.failed for c in self.children)

    def stop(self, grace_s: float = 10.0) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + grace_s
        for c in self.children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(timeout=5)
