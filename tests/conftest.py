"""Shared fixtures: leftover-process cleanup and short timeouts."""

from __future__ import annotations

import os
import signal

import psutil_free
import pytest


@pytest.fixture
def kill_leftovers():
    """Kill any child process a test left behind (stage workers started by launchers)."""
    before = set(psutil_free.children(os.getpid()))
    yield
    for pid in set(psutil_free.children(os.getpid())) - before:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
