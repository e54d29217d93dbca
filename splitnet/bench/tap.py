"""An on-path attacker for the hostile-peer bench: a TCP relay between a client and a stage that
records what the client sends and can write bytes of its own into the stage -> client stream.

It runs in a thread of the bench process; every socket operation has a timeout, and
:meth:`Tap.close` ends every connection it relays.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

_CHUNK = 1 << 16


@dataclass
class _Conn:
    client: socket.socket
    stage: socket.socket
    to_stage: list[bytes] = field(default_factory=list)  # what the client sent, chunk by chunk
    from_stage_bytes: int = 0
    write_lock: threading.Lock = field(default_factory=threading.Lock)  # writes towards the client


class Tap:
    """Listen on 127.0.0.1 (``self.endpoint``) and relay every connection to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], timeout_s: float = 30.0):
        self.target = target
        self.timeout_s = timeout_s
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self._lsock.settimeout(0.2)
        self.endpoint = f"tcp://127.0.0.1:{self._lsock.getsockname()[1]}"
        self.conns: list[_Conn] = []
        self._inject: bytes = b""
        self._inject_after = 0
        self._forge: Callable[[bytes], bytes | None] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="tap-accept")]
        self._threads[0].start()

    def inject_to_client(self, data: bytes, after_bytes: int) -> None:
        """Write ``data`` into the stage -> client stream of the next connection once the stage has
        sent ``after_bytes`` on it (after the handshake, between two real frames)."""
        with self._lock:
            self._inject, self._inject_after = data, after_bytes

    def inject_on_upstream(self, forge: "Callable[[bytes], bytes | None]") -> None:
        """On every connection, show each client -> stage chunk to ``forge`` before relaying it;
        bytes it returns are written into the stage -> client stream first (an on-path attacker
        answering a request it just saw, ahead of the stage). Called once per chunk until it
        returns bytes."""
        with self._lock:
            self._forge = forge

    def inject_now(self, data: bytes, index: int = -1) -> None:
        """Write ``data`` into the stage -> client stream of connection ``index`` now (call it while
        that connection is idle, so the bytes land between two real frames)."""
        conn = self.conns[index]
        with conn.write_lock:
            conn.client.sendall(data)

    def recorded(self, index: int = 0) -> list[bytes]:
        """The chunks client ``index`` sent to the stage, in order."""
        return list(self.conns[index].to_stage)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._lsock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                s = socket.create_connection(self.target, timeout=self.timeout_s)
            except OSError:
                c.close()
                continue
            conn = _Conn(c, s)
            with self._lock:
                self.conns.append(conn)
                inject, after = self._inject, self._inject_after
                self._inject = b""
            for args in ((conn, c, s, True, b"", 0), (conn, s, c, False, inject, after)):
                t = threading.Thread(target=self._pump, args=args, daemon=True, name="tap-pump")
                t.start()
                self._threads.append(t)

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, upstream: bool, inject: bytes, after: int) -> None:
        src.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(_CHUNK)
                except socket.timeout:
                    continue
                if not data:
                    break
                if upstream:
                    conn.to_stage.append(data)
                    forge = self._forge
                    forged = forge(data) if forge is not None else None
                    if forged:
                        self._forge = None
                        with conn.write_lock:
                            conn.client.sendall(forged)
                else:
                    conn.from_stage_bytes += len(data)
                if upstream:
                    dst.sendall(data)
                else:
                    with conn.write_lock:
                        dst.sendall(data)
                if inject and not upstream and conn.from_stage_bytes >= after:
                    dst.sendall(inject)
                    inject = b""
        except OSError:
            pass
        finally:
            for sk in (src, dst):
                try:
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._lsock.close()
        for conn in self.conns:
            conn.client.close()
            conn.stage.close()


def host_port(endpoint: str) -> tuple[str, int]:
    """("127.0.0.1", 5555) of "tcp://127.0.0.1:5555"."""
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    return host, int(port)


def replay(endpoint: str, chunks: list[bytes], listen_s: float = 1.5) -> int:
    """Open a new TCP connection to ``endpoint`` and send ``chunks`` byte for byte; return how many
    bytes came back within ``listen_s`` (the stage's answer to a replayed session)."""
    got = 0
    with socket.create_connection(host_port(endpoint), timeout=5) as s:
        s.settimeout(0.1)
        for c in chunks:
            try:
                s.sendall(c)
            except OSError:
                break
            try:
                got += len(s.recv(_CHUNK))
            except (socket.timeout, OSError):
                pass
        deadline = listen_s
        while deadline > 0:
            try:
                data = s.recv(_CHUNK)
                if not data:
                    break
                got += len(data)
            except socket.timeout:
                deadline -= 0.1
            except OSError:
                break
    return got
