"""The link emulator: a TCP relay that adds delay, jitter and loss the kernel cannot add here.

This kernel has no ``netem`` qdisc, so rate is shaped by ``tc tbf`` on the veth pairs and the rest
is added in user space: the relay listens in the *sending* host's namespace, forwards every
connection to the target across the (rate-shaped) veth link and holds each chunk of the byte
stream, in each direction, until ``delay_ms`` plus a jitter sample (uniform in +-``jitter_ms``)
after it arrived. A TCP stream cannot reorder, so a chunk never leaves before the one ahead of it.

Loss is modelled by its effect on TCP, since the relay sees a reliable byte stream: every
``mss_bytes`` segment of a chunk is lost with probability ``loss_pct``/100 and each lost segment
delays the chunk (and, by ordering, everything behind it) by one retransmission,
``loss_penalty_ms`` (default: one round trip of the emulated link, ``2 * delay_ms``, at least
``min_rto_ms`` = 5 ms). This is fast-retransmit recovery; it does not model cwnd halving.

A target that refuses the relay's connection gets the client's connection reset (as a closed
port answers), not closed in order. A run-time switch (:class:`LinkSwitch`) cuts the link or partitions one direction, for fault
campaigns: ``cut`` stops both directions, ``partition up`` the bytes from the listening side to
the target (client -> stage), ``partition down`` the way back, ``heal`` restores both. A stopped
direction delivers nothing, on every connection of the relay, new ones included, until healed;
what was sent meanwhile stays in the relay and the kernel's socket buffers and is delivered
after the heal, in order, as TCP retransmits across a network partition that ends before the
connection times out (a byte stream cannot lose bytes in the middle and stay a stream). With
``--control stdin`` the relay reads one command per line (``cut``, ``partition up``,
``partition down``, ``heal``) and answers each with ``OK <state>`` on stdout once it applies.

Run as ``python -m splitnet.lab.relay --listen HOST:PORT --target HOST:PORT [--delay-ms ...]``;
it prints ``RELAY host:port`` once listening (port 0 picks one). :func:`start_relay` and
:class:`RelayProcess` start one from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class Impairment:
    """What the relay adds to each direction of a link.

    Attributes:
        delay_ms: one-way delay added to every chunk.
        jitter_ms: half-width of the uniform jitter added to the delay.
        loss_pct: probability (percent) that an ``mss_bytes`` segment is lost and retransmitted.
        loss_penalty_ms: extra delay per lost segment; None: ``max(2 * delay_ms, min_rto_ms)``.
        mss_bytes: segment size used to count segments per chunk.
        min_rto_ms: lower bound of the default loss penalty.
        seed: random seed (reproducible jitter and loss).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    loss_penalty_ms: float | None = None
    mss_bytes: int = 1448
    min_rto_ms: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.jitter_ms > self.delay_ms + 1e-9:
            raise ConfigError(f"relay delay_ms ({self.delay_ms}) and jitter_ms ({self.jitter_ms}) must be >= 0, jitter <= delay")
        if not 0 <= self.loss_pct < 100:
            raise ConfigError(f"relay loss_pct must be in [0, 100), got {self.loss_pct}")
        if self.mss_bytes <= 0:
            raise ConfigError("relay mss_bytes must be positive")

    @property
    def penalty_ms(self) -> float:
        return self.loss_penalty_ms if self.loss_penalty_ms is not None else max(2 * self.delay_ms, self.min_rto_ms)

    @property
    def is_null(self) -> bool:
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.loss_pct == 0


_CHUNK = 256 * 1024
DIRECTIONS = ("up", "down")  # up: listening side -> target (client -> stage); down: the way back


class LinkSwitch:
    """Which directions of a relay's link carry bytes now (all of its connections). Used from
    the relay's event loop; :meth:`apply` takes a control command."""

    def __init__(self) -> None:
        self._open = {d: asyncio.Event() for d in DIRECTIONS}
        for ev in self._open.values():
            ev.set()

    @property
    def state(self) -> str:
        closed = [d for d in DIRECTIONS if not self._open[d].is_set()]
        return "cut" if len(closed) == 2 else f"partition {closed[0]}" if closed else "open"

    def apply(self, command: str) -> str:
        """``cut`` | ``partition up`` | ``partition down`` | ``heal``; returns the new state.
        Raises ConfigError for anything else."""
        words = command.split()
        if words == ["cut"]:
            stop = set(DIRECTIONS)
        elif len(words) == 2 and words[0] == "partition" and words[1] in DIRECTIONS:
            stop = {words[1]}
        elif words == ["heal"]:
            stop = set()
        else:
            raise ConfigError(f"relay control: unknown command {command!r}; known: cut, partition up, partition down, heal")
        for d in DIRECTIONS:
            (self._open[d].clear if d in stop else self._open[d].set)()
        return self.state

    async def wait_open(self, direction: str) -> None:
        await self._open[direction].wait()


class _Pipe:
    """One direction of one connection: read chunks, release each at its due time, in order."""

    def __init__(self, imp: Impairment, rng: random.Random, switch: LinkSwitch | None = None, direction: str = "up"):
        self.imp = imp
        self.rng = rng
        self.switch = switch
        self.direction = direction
        self.last_due = 0.0
        self.stats = {"chunks": 0, "bytes": 0, "lost_segments": 0}

    def due(self, nbytes: int) -> float:
        imp = self.imp
        extra = imp.delay_ms + (self.rng.uniform(-imp.jitter_ms, imp.jitter_ms) if imp.jitter_ms else 0.0)
        if imp.loss_pct:
            segs = -(-nbytes // imp.mss_bytes)
            lost = sum(1 for _ in range(segs) if self.rng.random() * 100 < imp.loss_pct)
            self.stats["lost_segments"] += lost
            extra += lost * imp.penalty_ms
        due = max(time.monotonic() + extra / 1e3, self.last_due)  # a byte stream keeps its order
        self.last_due = due
        return due

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue(maxsize=64)  # back-pressure: at most 64 chunks in flight

        async def pump_in() -> None:
            try:
                while True:
                    data = await reader.read(_CHUNK)
                    if not data:
                        break
                    await q.put((self.due(len(data)), data))
            finally:
                await q.put(None)

        async def pump_out() -> None:
            while True:
                item = await q.get()
                if item is None:
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the emulated delay itself, not synchronisation
                if self.switch is not None:
                    await self.switch.wait_open(self.direction)  # cut or partitioned: held until healed
                writer.write(data)
                await writer.drain()
                self.stats["chunks"] += 1
                self.stats["bytes"] += len(data)
            if writer.can_write_eof():
                writer.write_eof()

        await asyncio.gather(pump_in(), pump_out())


async def _serve(listen: tuple[str, int], target: tuple[str, int], imp: Impairment, ready, control: str = "") -> None:
    rng = random.Random(imp.seed)
    switch = LinkSwitch()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.wait_for(asyncio.open_connection(*target), timeout=10)
        except (OSError, asyncio.TimeoutError):
            _reset(c_writer)  # the target refuses: so does the emulated link (a reset, as a closed port answers)
            return
        for w in (c_writer, t_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(
                _Pipe(imp, random.Random(rng.random()), switch, "up").run(c_reader, t_writer),
                _Pipe(imp, random.Random(rng.random()), switch, "down").run(t_reader, c_writer),
            )
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the relay is stopping (SIGTERM): its connections close with it, quietly
        finally:
            for w in (c_writer, t_writer):
                w.close()

    server = await asyncio.start_server(handle, listen[0], listen[1])
    host, port = server.sockets[0].getsockname()[:2]
    ready(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if control == "stdin":
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def commands() -> None:
            while True:
                line = await reader.readline()
                if not line:
                    stop.set()  # the controller is gone: so is the link
                    return
                try:
                    print(f"OK {switch.apply(line.decode().strip())}", flush=True)
                except ConfigError as e:
                    print(f"ERR {e}", flush=True)

        loop.create_task(commands())
    async with server:
        await stop.wait()
        # stop now: connections held by a cut switch would otherwise keep wait_closed() (and so
        # the process, until its controller's kill) waiting for peers that will never speak
        server.close()
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()


class RelayProcess:
    """A relay process in front of one endpoint, with its link switch under control.

    ``RelayProcess.start("127.0.0.1", "tcp://127.0.0.1:5555", Impairment(delay_ms=200))``;
    :attr:`endpoint` is where to connect instead; :meth:`cut`, :meth:`partition`,
    :meth:`heal` flip the switch and return once the relay applied it; :meth:`close` stops it.
    """

    def __init__(self, popen: Any, endpoint: str, target: str):
        self.popen = popen
        self.endpoint = endpoint
        self.target = target
        self.state = "open"

    @classmethod
    def start(cls, listen_host: str, target: str, imp: Impairment | None = None, *, timeout_s: float = 30.0,
              prefix: tuple[str, ...] = ()) -> "RelayProcess":
        """Start one (``prefix``: e.g. ``ip netns exec NS``); RuntimeError when it does not
        report ``RELAY`` within ``timeout_s``."""
        import subprocess

        imp = imp or Impairment()
        cmd = [*prefix, sys.executable, "-m", "splitnet.lab.relay", "--listen", f"{listen_host}:0", "--target", target,
               "--delay-ms", str(imp.delay_ms), "--jitter-ms", str(imp.jitter_ms), "--loss-pct", str(imp.loss_pct),
               "--seed", str(imp.seed), "--control", "stdin"]
        if imp.loss_penalty_ms is not None:
            cmd += ["--loss-penalty-ms", str(imp.loss_penalty_ms)]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _read_line(p, timeout_s)
        if not line.startswith("RELAY"):
            p.kill()
            p.wait(timeout=5)
            raise RuntimeError(f"the link emulator in front of {target} did not start: {line!r}")
        return cls(p, "tcp://" + line.split()[1], target)

    def control(self, command: str, timeout_s: float = 5.0) -> str:
        """Send one control command; return the state the relay reports. RuntimeError when it
        does not answer within ``timeout_s`` or refuses the command."""
        if self.popen.poll() is not None:
            raise RuntimeError(f"the relay in front of {self.target} has exited (code {self.popen.returncode})")
        self.popen.stdin.write(command + "\n")
        self.popen.stdin.flush()
        line = _read_line(self.popen, timeout_s)
        if not line.startswith("OK "):
            raise RuntimeError(f"the relay in front of {self.target} did not apply {command!r}: {line!r}")
        self.state = line[3:].strip()
        return self.state

    def cut(self) -> str:
        return self.control("cut")

    def partition(self, direction: str) -> str:
        """Stop one direction: ``"up"`` (towards the target) or ``"down"`` (back from it)."""
        return self.control(f"partition {direction}")

    def heal(self) -> str:
        return self.control("heal")

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except Exception:  # noqa: BLE001 - a relay that ignores SIGTERM is killed
                self.popen.kill()
                self.popen.wait(timeout=5)
        for f in (self.popen.stdin, self.popen.stdout):
            if f is not None:
                f.close()


def _read_line(p: Any, timeout_s: float) -> str:
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        return p.stdout.readline() if sel.select(timeout_s) else ""


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP reset (SO_LINGER 0) instead of an orderly FIN: what a
    client connecting to a closed port sees, which a peer must not take for a handshake refusal."""
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()


def start_relay(listen_host: str, target: str, delay_ms: float, timeout_s: float = 30.0) -> tuple[Any, str]:
    """Start a relay process on this host in front of ``target`` (``tcp://host:port``) that adds
    ``delay_ms`` each way; return it and the endpoint to use instead. Raises RuntimeError when it
    does not report ``RELAY`` within ``timeout_s``."""
    import selectors
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "splitnet.lab.relay", "--listen", f"{listen_host}:0",
                          "--target", target, "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, text=True)
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        line = p.stdout.readline() if sel.select(timeout_s) else ""
    if not line.startswith("RELAY"):
        p.kill()
        raise RuntimeError(f"the link emulator in front of {target} did not start: {line!r}")
    return p, "tcp://" + line.split()[1]


def _hostport(s: str) -> tuple[str, int]:
    s = s.removeprefix("tcp://")
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {s!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.lab.relay", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0: any)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    p.add_argument("--loss-penalty-ms", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", choices=("", "stdin"), default="", help="stdin: read cut / partition up|down / heal, one per line")
    a = p.parse_args(argv)
    imp = Impairment(a.delay_ms, a.jitter_ms, a.loss_pct, a.loss_penalty_ms, seed=a.seed)

    def ready(host: str, port: int) -> None:
        print(f"RELAY {host}:{port}", flush=True)

    asyncio.run(_serve(_hostport(a.listen), _hostport(a.target), imp, ready, a.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
