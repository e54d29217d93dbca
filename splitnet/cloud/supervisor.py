"""Keep a set of stage processes running: restart a crashed one with bounded exponential backoff."""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field

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


@dataclass
class SupervisedProcess:
    name: str
    cmd: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0
    failed: bool = False
    refused: bool = False  # exited with USER_ERROR_EXIT: a configuration mistake, not a crash


class Supervisor:
    """Start every command, restart the ones that exit, stop them all on :meth:`stop`."""

    def __init__(self, commands: dict[str, list[str]], policy: RestartPolicy | None = None):
        if not commands:
            raise ConfigError("nothing to supervise")
        self.policy = policy or RestartPolicy()
        self.children = [SupervisedProcess(name, cmd) for name, cmd in commands.items()]

    def start(self) -> None:
        for c in self.children:
            self._spawn(c)

    def _spawn(self, c: SupervisedProcess) -> None:
        c.proc = subprocess.Popen(c.cmd)
        log.info("started %s (pid %d)", c.name, c.proc.pid)

    def poll(self) -> bool:
        """Restart children that exited; return False once every child has failed for good."""
        now = time.monotonic()
        for c in self.children:
            if c.failed or c.proc is None:
                continue
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
