"""The link emulator's run-time switch (``splitnet.lab.relay``): a cut stops both directions, a
partition one, and a heal delivers what was held, in order; real relay process, real TCP
sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import threading

import pytest

from splitnet.errors import ConfigError
from splitnet.lab.relay import Impairment, LinkSwitch, RelayProcess

pytestmark = pytest.mark.timeout(60)


class Echo:
    """A TCP server on a random port that echoes what each connection sends, and keeps a copy."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.srv.getsockname()[1]}"
        self.received = bytearray()
        self.got = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        with conn:
            while data := conn.recv(65536):
                self.received += data
                self.got.set()
                conn.sendall(data)


def _connect(endpoint: str) -> socket.socket:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _recv_exactly(s: socket.socket, n: int, timeout_s: float) -> bytes:
    s.settimeout(timeout_s)
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


@pytest.fixture
def relayed():
    echo = Echo()
    relay = RelayProcess.start("127.0.0.1", echo.endpoint, Impairment())
    try:
        yield echo, relay
    finally:
        relay.close()


def test_cut_holds_both_directions_and_heal_delivers_in_order(relayed):
    echo, relay = relayed
    s = _connect(relay.endpoint)
    s.sendall(b"before")
    assert _recv_exactly(s, 6, 5) == b"before"
    assert relay.cut() == "cut"
    s.sendall(b"during")
    assert not echo.got.wait(0.5) or bytes(echo.received) == b"before", "bytes crossed a cut link"
    with pytest.raises(socket.timeout):
        _recv_exactly(s, 1, 0.5)
    assert relay.heal() == "open"
    assert _recv_exactly(s, 6, 5) == b"during"
    assert bytes(echo.received) == b"beforeduring"
    s.close()


def test_partition_up_stops_only_the_way_to_the_target(relayed):
    echo, relay = relayed
    s = _connect(relay.endpoint)
    s.sendall(b"a")
    assert _recv_exactly(s, 1, 5) == b"a"
    assert relay.partition("up") == "partition up"
    s.sendall(b"b")
    with pytest.raises(socket.timeout):
        _recv_exactly(s, 1, 0.5)
    assert bytes(echo.received) == b"a"
    relay.heal()
    assert _recv_exactly(s, 1, 5) == b"b"
    s.close()


def test_partition_down_lets_bytes_reach_the_target_but_not_back(relayed):
    echo, relay = relayed
    s = _connect(relay.endpoint)
    assert relay.partition("down") == "partition down"
    echo.got.clear()
    s.sendall(b"x")
    assert echo.got.wait(5) and bytes(echo.received) == b"x", "the way to the target should still carry bytes"
    with pytest.raises(socket.timeout):
        _recv_exactly(s, 1, 0.5)
    relay.heal()
    assert _recv_exactly(s, 1, 5) == b"x"
    s.close()


def test_unknown_command_is_refused_and_the_relay_keeps_serving(relayed):
    _, relay = relayed
    with pytest.raises(RuntimeError, match="did not apply"):
        relay.control("partition sideways")
    assert relay.cut() == "cut" and relay.heal() == "open"


def test_switch_rejects_unknown_commands():
    sw = LinkSwitch()
    with pytest.raises(ConfigError, match="known: cut"):
        sw.apply("drop everything")
    assert sw.apply("partition down") == "partition down"
    assert sw.apply("heal") == "open"


def test_a_target_that_refuses_gets_the_client_connection_reset():
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    relay = RelayProcess.start("127.0.0.1", f"tcp://127.0.0.1:{port}")
    try:
        s = _connect(relay.endpoint)
        s.settimeout(5)
        with pytest.raises(ConnectionResetError):
            s.sendall(b"x")
            s.recv(1)
        s.close()
    finally:
        relay.close()
