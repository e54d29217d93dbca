"""Retiring a replaced stage process on this host: stopped at once, killed a little later.

A replacement's first work is the replay (its refill and the resumed step), which comes within
milliseconds of the recovery hook handing out its endpoint. A stage process killed at that moment
tears its CUDA context down while the replay runs, and on a GPU the two share, the teardown slows
the replay's forwards: in the chaos campaign on one H200 (``docs/recovery.md``, session 20), the
replacement's refill forward of gpt2-124m took 21-31 ms beside a fresh kill of the old process,
against 6-12 ms when the old process had died earlier or was killed 3 s later.

:func:`retire` therefore stops the old process with SIGSTOP (it can take and send nothing more,
at no cost to the GPU) and kills it ``after_s`` later, off the caller's thread. On another host
the old process is that host's business; this is for stage processes started here.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading

log = logging.getLogger("splitnet.runtime")

RETIRE_AFTER_S = 3.0  # a replay of a few hundred positions is done well within this, at real sizes
KILL_WAIT_S = 10.0  # how long the reaper waits for a killed process to be gone


def retire(popen: subprocess.Popen, after_s: float = RETIRE_AFTER_S) -> threading.Thread | None:
    """Stop ``popen`` now and kill it ``after_s`` seconds later (0: kill now, and wait for it).
    Returns the thread that kills and reaps it, None when it was already gone or killed here."""
    if popen.poll() is not None:
        return None
    if after_s <= 0:
        _kill(popen)
        return None
    try:
        popen.send_signal(signal.SIGSTOP)
    except ProcessLookupError:
        return None
    timer = threading.Timer(after_s, _kill, (popen,))
    timer.name, timer.daemon = f"splitnet-retire-{popen.pid}", True
    timer.start()
    return timer


def _kill(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        popen.kill()  # SIGKILL ends a stopped process too
    try:
        popen.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning("stage process %d did not exit within %.0f s of SIGKILL", popen.pid, KILL_WAIT_S)


__all__ = ["KILL_WAIT_S", "RETIRE_AFTER_S", "retire"]
