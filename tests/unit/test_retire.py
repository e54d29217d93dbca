"""splitnet.runtime.retire: a replaced stage process is stopped at once and killed later."""

from __future__ import annotations

import subprocess
import sys
import time

from splitnet.runtime.retire import retire


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]  # the field after the command name


def _sleeper() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    deadline = time.monotonic() + 10
    while _state(p.pid) not in ("S", "R") and time.monotonic() < deadline:
        time.sleep(0.01)
    return p


def test_a_retired_process_is_stopped_at_once_and_killed_after_the_delay():
    p = _sleeper()
    killer = retire(p, after_s=0.5)
    assert killer is not None
    assert _state(p.pid) == "T"  # stopped: it takes and sends nothing more
    assert p.poll() is None  # not killed yet: its teardown waits
    killer.join(10)
    assert p.poll() is not None and p.returncode < 0


def test_no_delay_kills_and_reaps_now_and_a_dead_process_is_left_alone():
    p = _sleeper()
    assert retire(p, after_s=0) is None
    assert p.returncode is not None
    assert retire(p) is None  # already gone: nothing to stop
