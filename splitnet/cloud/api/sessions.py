"""A small pool of SDK sessions: each serves one request at a time (a Session is not thread-safe).

Sessions open lazily, up to ``size``; a request waits at most ``acquire_timeout_s`` for a free
one (then :class:`PoolBusy`). A session that failed with anything but the caller's own mistake
(a ``ConfigError``) is closed and replaced by a fresh connection on its next use, so a stage that
restarted does not leave a broken session behind."""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from splitnet.errors import ConfigError


class PoolBusy(Exception):
    """No session became free within the pool's acquire timeout."""


class SessionPool:
    def __init__(self, open_session: Callable[[], Any], size: int, acquire_timeout_s: float, first: Any = None):
        self._open = open_session
        self.size = size
        self.acquire_timeout_s = acquire_timeout_s
        self._free: queue.Queue[Any] = queue.Queue()
        self._busy = 0
        self._lock = threading.Lock()
        self._closed = False
        self._free.put(first)  # None: opened on first use
        for _ in range(size - 1):
            self._free.put(None)

    @property
    def busy(self) -> int:
        return self._busy

    @contextmanager
    def session(self) -> Iterator[Any]:
        """A session for this thread's exclusive use (blocking, bounded by the acquire timeout)."""
        try:
            s = self._free.get(timeout=self.acquire_timeout_s)
        except queue.Empty:
            raise PoolBusy(f"all {self.size} pipeline sessions stayed busy for {self.acquire_timeout_s:.0f} s; retry later or start the API with more --sessions") from None
        with self._lock:
            self._busy += 1
        keep = True
        try:
            if s is None:
                s = self._open()
            yield s
        except ConfigError:
            raise
        except BaseException:
            keep = False
            raise
        finally:
            with self._lock:
                self._busy -= 1
            if s is not None and (not keep or self._closed):
                _close(s)
                s = None
            self._free.put(s)

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                s = self._free.get_nowait()
            except queue.Empty:
                return
            if s is not None:
                _close(s)


def _close(s: Any) -> None:
    try:
        s.close()
    except Exception:  # noqa: BLE001 - closing a broken session is best effort
        pass
