"""Test hosts as network namespaces joined by shaped veth links.

``with lab_topology(["edge-a", "edge-b", "cloud"], links={("edge-a", "cloud"): LinkSpec(rate_mbit=20,
delay_ms=10)}) as lab:`` creates one namespace per host, a veth pair for every pair of hosts (full
mesh), an address per host (``lab.addr(host)``, 10.213.0.N, on the host's loopback with a /32
route to every other host over their direct link), shapes each link's rate with ``tc tbf`` on
both ends and, for delay/jitter/loss, starts :mod:`splitnet.lab.relay` in the sending host when
a service is exposed over that link (:meth:`Lab.expose`). Everything it created is removed on
exit, on failure, and at interpreter exit; ``splitnet lab down`` removes a lab left by a killed
process (state files under ``/run/splitnet-lab``).

Only addresses inside the lab's own namespaces are used; the host's interfaces are never touched.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from splitnet.errors import ConfigError, SplitnetError, StageUnavailable

STATE_DIR = Path("/run/splitnet-lab")
SUBNET = "10.213"


def read_line(proc: subprocess.Popen, accept, timeout_s: float) -> str:
    """The first line ``proc`` prints on stdout that ``accept(line)`` takes, within ``timeout_s``.

    Raises TimeoutError on silence and EOFError (with the tail of stderr) if the process exits."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer within {timeout_s} s")
            if sel.select(min(left, 1.0)):
                line = proc.stdout.readline()
                if accept(line):
                    return line
                if not line and proc.poll() is not None:
                    err = proc.stderr.read()[-3000:] if proc.stderr else ""
                    raise EOFError(err)
    finally:
        sel.close()


class LabError(SplitnetError):
    """Building or using a lab failed (not root, no ``ip``/``tc``, a command failed)."""

    code = "lab"


@dataclass(frozen=True)
class LinkSpec:
    """One link between two hosts.

    Attributes:
        rate_mbit: rate in each direction, shaped in the kernel by ``tc tbf`` (0: unshaped).
        delay_ms: one-way delay added by the relay.
        jitter_ms: +- uniform jitter added by the relay.
        loss_pct: segment loss (percent), modelled by the relay as retransmission delay.
        burst_kbyte: tbf bucket size (0: 10 ms worth of rate, at least 16 KiB).
    """

    rate_mbit: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    burst_kbyte: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_mbit < 0 or self.delay_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss_pct < 100:
            raise ConfigError(f"invalid link {self}: rates, delays and loss must be >= 0 (loss < 100)")
        if self.jitter_ms > self.delay_ms:
            raise ConfigError(f"link jitter_ms {self.jitter_ms} exceeds delay_ms {self.delay_ms}")

    @property
    def impaired(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct)

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        """``rate=20,delay=10,jitter=2,loss=0.5`` (units: Mbit/s, ms, ms, percent)."""
        names = {"rate": "rate_mbit", "delay": "delay_ms", "jitter": "jitter_ms", "loss": "loss_pct", "burst": "burst_kbyte"}
        kw = {}
        for part in filter(None, text.split(",")):
            k, _, v = part.partition("=")
            if k not in names:
                raise ConfigError(f"unknown link option {k!r}; known: {sorted(names)}")
            try:
                kw[names[k]] = float(v)
            except ValueError as e:
                raise ConfigError(f"link option {k} needs a number, got {v!r}") from e
        return cls(**kw)


def check_root() -> str | None:
    """None when a lab can be built here, else the reason why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (run `sudo pytest -m netns`)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


@dataclass
class _Link:
    a: str
    b: str
    spec: LinkSpec
    dev_a: str
    dev_b: str
    addr_a: str
    addr_b: str


@dataclass
class Lab:
    """A built topology. Use through :func:`lab_topology`."""

    name: str
    hosts: list[str]
    ns: dict[str, str]
    links: dict[frozenset, _Link] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    # ------------------------------------------------------------------ queries --------------
    def addr(self, host: str) -> str:
        """The host's address (reachable from every other host of the lab)."""
        return f"{SUBNET}.0.{self.hosts.index(host) + 1}"

    def link(self, a: str, b: str) -> _Link:
        return self.links[frozenset((a, b))]

    def netns_cmd(self, host: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` wrapped to run inside ``host``'s namespace."""
        if host not in self.ns:
            raise ConfigError(f"unknown lab host {host!r}; hosts: {self.hosts}")
        return ["ip", "netns", "exec", self.ns[host], *cmd]

    # ------------------------------------------------------------------ processes ------------
    def run_in(self, host: str, cmd: Sequence[str], *, timeout_s: float = 120, check: bool = True, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in ``host`` to completion and return its result (stdout/stderr as text)."""
        r = subprocess.run(self.netns_cmd(host, cmd), capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})})
        if check and r.returncode != 0:
            raise LabError(f"{host}: `{' '.join(cmd)}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return r

    def spawn(self, host: str, cmd: Sequence[str], *, ready_prefix: str, timeout_s: float = 120, env: Mapping[str, str] | None = None, stdin: bool = False) -> tuple[subprocess.Popen, str]:
        """Start a long-running ``cmd`` in ``host``; wait for a stdout line starting with
        ``ready_prefix`` (a READY handshake) and return (process, that line). The lab stops it.
        ``stdin``: give the process a pipe on stdin (``p.stdin``) to send it commands."""
        p = subprocess.Popen(
            self.netns_cmd(host, cmd), stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.procs.append(p)
        def starts(line: str) -> bool:
            return line.startswith(ready_prefix)

        try:
            line = read_line(p, starts, timeout_s)
        except TimeoutError:
            raise StageUnavailable(f"{host}: `{' '.join(cmd[:6])} ...` printed no {ready_prefix} within {timeout_s} s") from None
        except EOFError as e:
            raise StageUnavailable(f"{host}: `{' '.join(cmd[:6])} ...` exited {p.returncode} before {ready_prefix}: {e}") from None
        return p, line.strip()

    def start_stage(self, host: str, model: str, blocks: tuple[int, int], *, stage_index: int = 0, extra_args: Sequence[str] = (), port: int = 0) -> str:
        """Start ``splitnet serve-stage`` in ``host`` bound to the host's address; return its endpoint."""
        return self.stage_process(host, model, blocks, stage_index=stage_index, extra_args=extra_args, port=port)[1]

    def stage_process(self, host: str, model: str, blocks: tuple[int, int], *, stage_index: int = 0, extra_args: Sequence[str] = (), port: int = 0) -> tuple[subprocess.Popen, str]:
        """Like :meth:`start_stage`, and also return the process (to :meth:`stop` it early)."""
        cmd = [
            sys.executable, "-m", "splitnet.runtime.cli_serve", "--model", model, "--blocks", f"{blocks[0]}:{blocks[1]}",
            "--bind", f"tcp://{self.addr(host)}:{port}", "--stage-index", str(stage_index), "--torch-threads", "1", *extra_args,
        ]
        p, line = self.spawn(host, cmd, ready_prefix="READY")
        return p, line.split()[1]

    def expose(self, endpoint: str, *, src: str, dst: str) -> str:
        """An endpoint that ``src`` uses to reach ``endpoint`` (served in ``dst``) through the link
        src<->dst with its delay/jitter/loss: a relay in ``src`` when the link is impaired, else
        ``endpoint`` itself (rate is shaped in the kernel either way)."""
        return self.relay(endpoint, src=src, dst=dst)[1]

    def relay(self, endpoint: str, *, src: str, dst: str) -> tuple[subprocess.Popen | None, str]:
        """Like :meth:`expose`, and also return the relay process (None when none was needed), so
        that a caller who changes the link (:meth:`set_link`) can :meth:`stop` the old relay."""
        if src == dst:
            return None, endpoint
        spec = self.link(src, dst).spec
        if not spec.impaired:
            return None, endpoint
        cmd = [
            sys.executable, "-m", "splitnet.lab.relay", "--listen", f"{self.addr(src)}:0", "--target", endpoint,
            "--delay-ms", str(spec.delay_ms), "--jitter-ms", str(spec.jitter_ms), "--loss-pct", str(spec.loss_pct),
            "--seed", str(len(self.procs)),
        ]
        p, line = self.spawn(src, cmd, ready_prefix="RELAY", timeout_s=30)
        return p, "tcp://" + line.split()[1]

    def set_link(self, a: str, b: str, spec: LinkSpec) -> None:
        """Reshape the link a<->b in place (tbf replaced on both ends; no rate: tbf removed). Relays
        already started keep their old delay: stop them and expose again."""
        ln = self.link(a, b)
        for h, dev in ((ln.a, ln.dev_a), (ln.b, ln.dev_b)):
            if spec.rate_mbit > 0:
                _tbf(self.ns[h], dev, spec)
            else:
                _sh("ip", "netns", "exec", self.ns[h], "tc", "qdisc", "del", "dev", dev, "root", check=False)
        ln.spec = spec

    def stop(self, procs: Sequence[subprocess.Popen | None]) -> None:
        """Stop some of the processes this lab started (SIGTERM, then SIGKILL after 5 s)."""
        mine = [p for p in procs if p is not None and p in self.procs]
        for p in mine:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in mine:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()
            self.procs.remove(p)

    def pipeline(self, model: str, placement: Sequence[tuple[str, tuple[int, int]]], *, client_host: str, extra_args: Sequence[str] = ()) -> list[str]:
        """Start one stage per ``(host, blocks)`` and return the endpoints a client in
        ``client_host`` passes to ``splitnet.connect`` (stage i reached over the link from
        stage i-1's host). The reply link (last stage -> client) is shaped by tbf only."""
        raw = [self.start_stage(h, model, b, stage_index=i, extra_args=extra_args) for i, (h, b) in enumerate(placement)]
        senders = [client_host] + [h for h, _ in placement[:-1]]
        return [self.expose(ep, src=s, dst=h) for ep, s, (h, _) in zip(raw, senders, placement)]

    def stop_processes(self) -> None:
        self.stop(list(self.procs))

    def close(self) -> None:
        self.stop_processes()
        destroy(self.name)


# ---------------------------------------------------------------------- build / destroy ----------
def _tbf(ns: str, dev: str, spec: LinkSpec) -> None:
    if spec.rate_mbit <= 0:
        return
    rate_bytes_s = spec.rate_mbit * 1e6 / 8
    burst = int(spec.burst_kbyte * 1024) if spec.burst_kbyte else max(16 * 1024, int(rate_bytes_s * 0.01))
    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
        "rate", f"{spec.rate_mbit}mbit", "burst", str(burst), "latency", "200ms")


def build(name: str, hosts: Sequence[str], links: Mapping[tuple[str, str], LinkSpec] | None = None) -> Lab:
    """Create the namespaces and links of a lab called ``name`` (see the module docstring)."""
    reason = check_root()
    if reason:
        raise LabError(reason)
    if len(set(hosts)) != len(hosts) or not 1 <= len(hosts) <= 200:
        raise ConfigError(f"lab hosts must be 1..200 distinct names, got {hosts}")
    if not name.isalnum() or len(name) > 6:
        raise ConfigError(f"lab name {name!r} must be 1..6 letters/digits (it prefixes interface names)")
    links = dict(links or {})
    for a, b in links:
        if a not in hosts or b not in hosts or a == b:
            raise ConfigError(f"link {a}<->{b} names unknown hosts; hosts: {list(hosts)}")
    lab = Lab(name=name, hosts=list(hosts), ns={h: f"sn-{name}-{i}" for i, h in enumerate(hosts)})
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = STATE_DIR / f"{name}.json"
    state.write_text(json.dumps({"name": name, "hosts": lab.hosts, "ns": lab.ns, "pid": os.getpid()}))
    try:
        for h in hosts:
            ns = lab.ns[h]
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{lab.addr(h)}/32", "dev", "lo")
        for k, (i, j) in enumerate(itertools.combinations(range(len(hosts)), 2)):
            a, b = hosts[i], hosts[j]
            spec = links.get((a, b)) or links.get((b, a)) or LinkSpec()
            dev_a, dev_b = f"sn{name}{k}a", f"sn{name}{k}b"
            sub = f"{SUBNET}.{1 + k // 64}.{(k % 64) * 4}"
            base = sub.rsplit(".", 1)[0]
            last = int(sub.rsplit(".", 1)[1])
            addr_a, addr_b = f"{base}.{last + 1}", f"{base}.{last + 2}"
            _sh("ip", "link", "add", dev_a, "netns", lab.ns[a], "type", "veth", "peer", "name", dev_b, "netns", lab.ns[b])
            for h, dev, addr, peer_host, peer_addr in ((a, dev_a, addr_a, b, addr_b), (b, dev_b, addr_b, a, addr_a)):
                ns = lab.ns[h]
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                _sh("ip", "-n", ns, "route", "add", f"{lab.addr(peer_host)}/32", "via", peer_addr, "src", lab.addr(h))
                _tbf(ns, dev, spec)
            lab.links[frozenset((a, b))] = _Link(a, b, spec, dev_a, dev_b, addr_a, addr_b)
        state.write_text(json.dumps({"name": name, "hosts": lab.hosts, "ns": lab.ns, "pid": os.getpid(),
                                     "links": [{"a": ln.a, "b": ln.b, **asdict(ln.spec)} for ln in lab.links.values()]}))
    except BaseException:
        destroy(name)
        raise
    return lab


def destroy(name: str) -> list[str]:
    """Kill processes inside lab ``name``'s namespaces, delete them, forget the lab. Idempotent."""
    state = STATE_DIR / f"{name}.json"
    prefix = f"sn-{name}-"
    names = set()
    if state.exists():
        with contextlib.suppress(ValueError, KeyError):
            names |= set(json.loads(state.read_text())["ns"].values())
    r = _sh("ip", "netns", "list", check=False)
    names |= {line.split()[0] for line in r.stdout.splitlines() if line.startswith(prefix)}
    for ns in sorted(names):
        pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:  # only processes living in this lab's own namespace
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _sh("ip", "netns", "del", ns, check=False)
    state.unlink(missing_ok=True)
    return sorted(names)


def list_labs() -> list[dict]:
    if not STATE_DIR.is_dir():
        return []
    out = []
    for f in sorted(STATE_DIR.glob("*.json")):
        with contextlib.suppress(ValueError):
            out.append(json.loads(f.read_text()))
    return out


@contextlib.contextmanager
def lab_topology(hosts: Sequence[str] = ("edge-a", "edge-b", "cloud"), links: Mapping[tuple[str, str], LinkSpec] | None = None, *, name: str | None = None) -> Iterator[Lab]:
    """Build a lab, yield it, and tear it down (processes, namespaces, veths) however the block ends."""
    name = name or uuid.uuid4().hex[:6]
    lab = build(name, hosts, links)
    fin = weakref.finalize(lab, destroy, name)  # also at interpreter exit
    try:
        yield lab
    finally:
        lab.stop_processes()
        fin()
