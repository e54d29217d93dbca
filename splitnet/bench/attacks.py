"""Attacks on live stages, for ``splitnet bench hostile`` and the hostile-peer tests.

A :class:`HostileLab` runs a real two-stage MiniLM pipeline (two ``serve-stage`` processes on
127.0.0.1) over one transport: ``curvezmq`` (a keypair per stage, an allow-list with the victim
client and an allowed *insider*) or ``plaintext`` (``--insecure``: no keys, the reference that
shows what each attack does when nothing stops it). Every attack is a function
``attack(lab) -> dict`` with at least ``refused`` (the attack had no effect beyond a typed error
or a closed connection); the bench adds ``stage_alive`` and ``legit_client_ok`` (a client of the
victim's key still gets the right embedding afterwards).

Each attack reproduces a finding of the security review (docs/security.md has the list).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from splitnet.bench.tap import host_port
from splitnet.wire import Message, SocketConfig, decode_message, encode_message, make_socket

_SENTENCE = ["a hostile peer must not change this embedding"]
_MAX_INPUT_MIB = 64


class _Stage:
    """One ``serve-stage`` process; its log goes to a file (a full pipe would stall it)."""

    def __init__(self, blocks: str, extra: list[str], port: int, log_dir: Path, name: str):
        self.blocks, self.extra, self.log_path = blocks, extra, log_dir / f"{name}.log"
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "splitnet.runtime.cli_serve", "--model", "minilm", "--blocks", self.blocks,
               "--bind", f"tcp://127.0.0.1:{self.port}", "--torch-threads", "1", "--parent-pid", str(os.getpid()),
               "--max-input-mib", str(_MAX_INPUT_MIB), *self.extra]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("READY") or time.monotonic() > deadline:
            self.proc.kill()
            raise RuntimeError(f"stage {self.blocks} did not start: {line!r}; log: {self.log_path.read_text()[-2000:]}")
        self.endpoint = line.split()[1]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mib(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return float("nan")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class HostileLab:
    """Two MiniLM stage processes over ``transport`` and the keys of a victim, an insider and an outsider."""

    def __init__(self, transport: str):
        if transport not in ("curvezmq", "plaintext"):
            raise ValueError(f"transport must be 'curvezmq' or 'plaintext', got {transport!r}")
        from splitnet.wire.security import generate_keypair

        self.transport = transport
        self.dir = Path(tempfile.mkdtemp(prefix=f"splitnet-hostile-{transport}-"))
        self.keyed = transport == "curvezmq"
        if self.keyed:
            for name in ("stage0", "stage1", "outsider"):
                generate_keypair(self.dir, name)
            generate_keypair(self.dir / "allow", "victim")
            generate_keypair(self.dir / "allow", "insider")
            (self.dir / "stages1").mkdir()
            (self.dir / "stages1" / "stage0.key").write_bytes((self.dir / "stage0.key").read_bytes())
            allow = ["--keys-dir", str(self.dir / "allow")]
            extra0 = ["--server-key", str(self.dir / "stage0.key_secret"), *allow]
            extra1 = ["--server-key", str(self.dir / "stage1.key_secret"), *allow, "--stage-keys-dir", str(self.dir / "stages1")]
        else:
            extra0 = extra1 = ["--insecure"]
        self.stages = [_Stage("0:3", extra0, 0, self.dir, "stage0"), _Stage("3:6", extra1, 0, self.dir, "stage1")]
        self.ctx = zmq.Context()
        self._sessions: list[Any] = []
        try:
            for s in self.stages:
                s.start()
            self.endpoints = [s.endpoint for s in self.stages]
            first = self.session("victim")
            self.reference = self._embed(first)
            self.tokenizer = first.tokenizer
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- clients -----------------
    def key(self, name: str) -> str:
        for d in (self.dir, self.dir / "allow"):
            if (d / f"{name}.key_secret").exists():
                return str(d / f"{name}.key_secret")
        raise KeyError(name)

    def server_keys(self) -> str:
        return f"{self.dir / 'stage0.key'},{self.dir / 'stage1.key'}"

    def client_config(self, who: str = "victim", server_keys: str | None = None, **kw: Any):
        from splitnet.edge.config import ClientConfig

        keys = {"client_key": self.key(who), "server_key": server_keys or self.server_keys()} if self.keyed else {}
        return ClientConfig(connect_timeout_s=10, timeout_s=15, heartbeat_interval_s=0.5, heartbeat_liveness=6, **keys, **kw)

    def session(self, who: str = "victim", endpoints: list[str] | None = None, **kw: Any):
        import splitnet.edge.sdk as sdk

        s = sdk.connect(endpoints or self.endpoints, config=self.client_config(who, **kw))
        self._sessions.append(s)
        return s

    def _embed(self, session: Any) -> np.ndarray:
        out = session.infer({"text": _SENTENCE})
        return np.asarray(next(iter(out.values())), dtype=np.float32)

    def legit_client_ok(self) -> bool:
        """A new session of the victim's key gets the reference embedding."""
        try:
            s = self.session("victim")
            try:
                return bool(np.allclose(self._embed(s), self.reference, atol=1e-5))
            finally:
                s.close()
                self._sessions.remove(s)
        except Exception:  # noqa: BLE001 - any failure is the answer
            return False

    def stages_alive(self) -> bool:
        return all(s.alive() for s in self.stages)

    def raw_socket(self, stage: int = 0, who: str = "insider", routing_id: bytes | None = None, server_key: bytes | None = None) -> zmq.Socket:
        """A DEALER to stage ``stage`` holding ``who``'s key (keyed labs): an attacker's own socket."""
        from splitnet.wire.security import CurveConfig, load_keypair, load_public_key

        security = None
        if self.keyed:
            peer = server_key or load_public_key(str(self.dir / f"stage{stage}.key"))
            security = CurveConfig(load_keypair(self.key(who)), server_key=peer, allow_self=False)
        s = make_socket(self.ctx, zmq.DEALER, SocketConfig(security=security, send_timeout_ms=5000, immediate=False))
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.connect(self.endpoints[stage])
        return s

    def stage_info(self, stage: int) -> dict:
        """The stage's ``info`` (its counters), asked over a fresh connection of the victim's key."""
        s = self.raw_socket(stage, "victim")
        try:
            return _ask(s, Message(kind="info", req="info"), "info_reply").meta
        finally:
            s.close(linger=0)

    def restart_stage(self, stage: int) -> None:
        """Kill a stage and start it again on the same port with the same key."""
        st = self.stages[stage]
        st.stop()
        st.start()

    def close(self) -> None:
        for s in self._sessions:
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
        for st in self.stages:
            st.stop()
        self.ctx.destroy(linger=0)
        from splitnet.wire.security import stop_authenticator

        stop_authenticator(self.ctx)


def _ask(sock: zmq.Socket, msg: Message, want: str, timeout_s: float = 5.0) -> Message:
    sock.send_multipart(encode_message(msg))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            got = decode_message(sock.recv_multipart())
            if got.kind in (want, "error"):
                return got
    raise TimeoutError(f"no {want} within {timeout_s} s")


def _drain(sock: zmq.Socket, seconds: float) -> list[Message]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            try:
                out.append(decode_message(sock.recv_multipart()))
            except Exception:  # noqa: BLE001 - an attacker's view: anything counts
                out.append(Message(kind="error"))
    return out


def _forward(lab: HostileLab, req: str, route_keys: list[str] | None = None, reply_to: str | None = None) -> Message:
    """A valid forward of the bench sentence's token ids to stage 0, routed through stage 1."""
    from splitnet.edge.sdk import _has_parameter

    numpy_flag = {"numpy": True} if _has_parameter(lab.tokenizer, "numpy") else {}
    tensors = {k: np.asarray(v) for k, v in lab.tokenizer(_SENTENCE, max_length=32, **numpy_flag).items()}
    meta: dict[str, Any] = {"route": lab.endpoints[1:], "reply_to": reply_to or "peer:" + os.urandom(16).hex(), "cache": False}
    if route_keys is not None:
        meta["route_keys"] = route_keys
    return Message(kind="forward", req=req, tensors=tensors, meta=meta)


# ---------------------------------------------------------------------- the attacks ---------------
def _record_victim_session(lab: HostileLab) -> list[bytes]:
    """What a victim session sends stage 0 (connect, one request, close), recorded on path."""
    from splitnet.bench.tap import Tap

    tap = Tap(host_port(lab.endpoints[0]))
    try:
        s = lab.session("victim", endpoints=[tap.endpoint, lab.endpoints[1]])
        lab._embed(s)
        s.close()
        lab._sessions.remove(s)
        time.sleep(0.2)
        return tap.recorded(0)
    finally:
        tap.close()


def _replay_and_count(lab: HostileLab, chunks: list[bytes]) -> dict:
    """Replay ``chunks`` on a new connection to stage 0; refused when its forward count did not move."""
    from splitnet.bench.tap import replay

    before = lab.stage_info(0)["stats"]["forwards"]
    back = replay(lab.endpoints[0], chunks)
    time.sleep(0.5)
    after = lab.stage_info(0)["stats"]["forwards"]
    return {"refused": after == before, "forwards_before": before, "forwards_after": after, "replayed_bytes": sum(map(len, chunks)), "bytes_back": back}


def replay_new_connection(lab: HostileLab) -> dict:
    """Record a victim session's bytes on path, replay them on a new connection to the stage."""
    return _replay_and_count(lab, _record_victim_session(lab))


def replay_after_restart(lab: HostileLab) -> dict:
    """The same recording, replayed after the stage restarted (same key, same port)."""
    chunks = _record_victim_session(lab)
    lab.restart_stage(0)
    return _replay_and_count(lab, chunks)


def zero_frame_envelope(lab: HostileLab) -> dict:
    """An allowed peer sends an empty message (no header, no frames): a typed error, nothing else."""
    s = lab.raw_socket(0, "insider")
    try:
        s.send(b"")
        got = _drain(s, 1.5)
    finally:
        s.close(linger=0)
    codes = [m.meta.get("code") for m in got if m.kind == "error"]
    return {"refused": bool(codes) and all(c in ("protocol", "limit") for c in codes), "answers": codes}


def cache_flush(lab: HostileLab, n: int = 1000) -> dict:
    """Many connections with random (unlisted) keys, each sending a message, while a victim session
    holds state: nothing of theirs may be executed, and the victim's session keeps working."""
    victim = lab.session("victim")
    lab._embed(victim)
    before = lab.stage_info(0)["stats"]
    t0 = time.monotonic()
    socks = []
    answered = sent = 0
    for i in range(n):
        if lab.keyed:
            from splitnet.wire.security import CurveConfig, KeyPair, load_public_key

            pub, sec = zmq.curve_keypair()
            cfg = SocketConfig(security=CurveConfig(KeyPair(pub, sec), server_key=load_public_key(str(lab.dir / "stage0.key")), allow_self=False), immediate=False)
        else:
            cfg = SocketConfig(immediate=False)
        s = make_socket(lab.ctx, zmq.DEALER, cfg)
        s.connect(lab.endpoints[0])
        try:
            s.send_multipart(encode_message(_forward(lab, f"flood-{i}")), flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            pass  # the local queue refused it (no pipe yet): nothing left, nothing to count
        socks.append(s)
        if len(socks) >= 100:
            answered += sum(1 for x in socks if x.poll(0))
            for x in socks:
                x.close(linger=0)
            socks = []
    time.sleep(1.0)
    answered += sum(1 for x in socks if x.poll(0))
    for x in socks:
        x.close(linger=0)
    elapsed = time.monotonic() - t0
    # counted before the victim's check, so its own forwards (and any retry of them) are not in it
    after = lab.stage_info(0)["stats"]
    executed = after["forwards"] - before["forwards"]
    victim_ok = bool(np.allclose(lab._embed(victim), lab.reference, atol=1e-5))
    return {"refused": executed == 0 and victim_ok and sent > 0, "connections": n, "sent": sent, "seconds": round(elapsed, 2), "executed": executed, "answered": answered, "victim_session_ok": victim_ok}


def oversized_messages(lab: HostileLab, mib: int = 900, count: int = 3) -> dict:
    """An allowed peer sends ``count`` messages with one ``mib`` MiB frame each; the stage must drop
    them before assembling them (its RSS stays flat)."""
    rss0 = lab.stages[0].rss_mib()
    blob = bytes(mib * 1024 * 1024)
    header = encode_message(Message(kind="ping", req="big"))[0]
    for _ in range(count):
        s = lab.raw_socket(0, "insider")
        try:
            s.send_multipart([header, blob], copy=False)
            time.sleep(0.5)
            _drain(s, 0.5)
        finally:
            s.close(linger=0)
    del blob
    time.sleep(0.5)
    rss1 = lab.stages[0].rss_mib()
    return {"refused": rss1 - rss0 < 64, "rss_mib_before": round(rss0, 1), "rss_mib_after": round(rss1, 1), "frame_mib": mib, "messages": count,
            "stage_frame_cap_mib": _MAX_INPUT_MIB}


def many_frames(lab: HostileLab, frames: int = 500_000) -> dict:
    """An allowed peer sends one message of ``frames`` empty frames; the stage answers a typed error
    and keeps answering pings."""
    s = lab.raw_socket(0, "insider")
    ping = lab.raw_socket(0, "victim")
    try:
        header = encode_message(Message(kind="ping", req="many"))[0]
        s.send_multipart([header, *([b""] * (frames - 1))], copy=False)
        t0 = time.monotonic()
        got = _drain(s, 0.2)
        waited = 0.0
        while not got and waited < 20:
            got = _drain(s, 0.5)
            waited += 0.5
        busy_s = time.monotonic() - t0
        pong = _ask(ping, Message(kind="ping", req="after"), "pong")
    finally:
        s.close(linger=0)
        ping.close(linger=0)
    codes = [m.meta.get("code") for m in got if m.kind == "error"]
    return {"refused": codes == ["limit"] and pong.kind == "pong", "answers": codes, "seconds_to_refuse": round(busy_s, 2), "frames": frames}


def idle_connection_flood(lab: HostileLab, n: int = 1000, handshake_timeout_s: float = 5.0) -> dict:
    """``n`` TCP connections that never speak; the stage keeps serving and closes every one of them
    at its handshake timeout."""
    socks = []
    for _ in range(n):
        c = socket.create_connection(host_port(lab.endpoints[0]), timeout=5)
        c.settimeout(0.05)
        socks.append(c)
    served = lab.legit_client_ok()
    deadline = time.monotonic() + handshake_timeout_s + 5
    open_ = set(range(n))
    while open_ and time.monotonic() < deadline:
        for i in list(open_):
            try:
                data = socks[i].recv(4096)
                if not data:
                    open_.discard(i)  # the stage closed it
            except socket.timeout:
                pass
            except OSError:
                open_.discard(i)
        time.sleep(0.1)
    for c in socks:
        c.close()
    return {"refused": not open_ and served, "connections": n, "still_open_after_s": round(handshake_timeout_s + 5, 1), "still_open": len(open_), "served_during_flood": served}


def crash_descriptor(lab: HostileLab) -> dict:
    """A tensor descriptor of shape [0, 2**62] and 0 bytes (numpy cannot even make it empty)."""
    header = msgpack.packb({"v": 1, "kind": "forward", "req": "crash", "seq": 0, "epoch": 0,
                            "tensors": [{"name": "input_ids", "dtype": "i64", "shape": [0, 2**62], "nbytes": 0}],
                            "meta": {"route": lab.endpoints[1:], "reply_to": "peer:" + os.urandom(16).hex()}}, use_bin_type=True)
    s = lab.raw_socket(0, "insider")
    try:
        s.send_multipart([header, b""])
        got = _drain(s, 1.5)
    finally:
        s.close(linger=0)
    codes = [m.meta.get("code") for m in got if m.kind == "error"]
    time.sleep(0.3)
    return {"refused": bool(codes) and lab.stages_alive(), "answers": codes}


def route_key_poisoning(lab: HostileLab) -> dict:
    """An allowed insider sends a forward naming its own key as stage 1's; a victim's requests that
    follow must still reach stage 1 under stage 1's real key."""
    if not lab.keyed:
        return {"refused": False, "why": "no keys: route keys mean nothing in plaintext", "applicable": False}
    from splitnet.wire.security import load_keypair

    insider_pub = load_keypair(lab.key("insider")).public.decode()
    s = lab.raw_socket(0, "insider")
    try:
        s.send_multipart(encode_message(_forward(lab, "poison", route_keys=[insider_pub], reply_to="peer:" + "ab" * 16)))
        time.sleep(1.0)
    finally:
        s.close(linger=0)
    victim = lab.session("victim")
    ok = bool(np.allclose(lab._embed(victim), lab.reference, atol=1e-5))
    return {"refused": ok, "victim_after_poison_ok": ok}


def routing_id_squatting(lab: HostileLab) -> dict:
    """The worst case: an allowed insider knows a victim's routing id. The victim's connection to the
    last stage drops; the insider connects to it with that id (silently, then answering pings) while
    a result for the victim is on its way. The insider must get no result."""
    victim = lab.session("victim")
    lab._embed(victim)
    links = victim.links
    rid = links._routing_id
    last = len(lab.endpoints) - 1
    links._links[last].sock.disconnect(links._links[last].endpoint)  # the victim's link to the last stage drops
    time.sleep(0.3)
    squatter = lab.raw_socket(last, "insider", routing_id=rid)
    time.sleep(0.5)
    fwd = _forward(lab, "victim-req", reply_to="peer:" + rid.decode())
    if lab.keyed:
        from splitnet.wire.security import load_public_key

        fwd = fwd._replace(meta={**fwd.meta, "route_keys": [load_public_key(str(lab.dir / "stage1.key")).decode()]})
    links._links[0].sock.send_multipart(encode_message(fwd))  # the victim's own request, over its link to stage 0
    got = _drain(squatter, 2.0)
    silent_results = [m for m in got if m.kind == "result"]
    for m in got:  # now answer the stage's pings, as a squatter that talks would
        if m.kind == "ping":
            squatter.send_multipart(encode_message(Message(kind="pong", req=m.req)))
    squatter.send_multipart(encode_message(Message(kind="ping", req="hello")))
    fwd2 = fwd._replace(req="victim-req-2")
    links._links[0].sock.send_multipart(encode_message(fwd2))
    got2 = _drain(squatter, 2.0)
    talking_results = [m for m in got2 if m.kind == "result"]
    squatter.close(linger=0)
    return {"refused": not silent_results and not talking_results, "results_to_silent_squatter": len(silent_results),
            "results_to_talking_squatter": len(talking_results)}


def forged_plaintext_error(lab: HostileLab) -> dict:
    """On path to the first stage, read the id of the request the client just sent and inject a
    plaintext ZMTP error message for it into the stage -> client stream, ahead of any real reply;
    the client must not raise it (nor keep it), and must keep working. Without keys the attacker
    can read the id and the client has no way to tell the forgery from the stage's own error."""
    import re

    from splitnet.bench.tap import Tap

    req_field = re.compile(rb"\xa3req\xb0([0-9a-f]{16})")

    def forge(chunk: bytes) -> bytes | None:
        m = req_field.search(chunk)
        if m is None or b"forward" not in chunk:
            return None
        body = encode_message(Message(kind="error", req=m.group(1).decode(), meta={"status": "error", "code": "auth", "msg": "FORGED by the attacker"}))[0]
        return bytes([0x00, len(body)]) + body if len(body) < 256 else bytes([0x02]) + len(body).to_bytes(8, "big") + body

    tap = Tap(host_port(lab.endpoints[0]))
    forged_seen = False
    ok = False
    try:
        s = lab.session("victim", endpoints=[tap.endpoint, *lab.endpoints[1:]])  # handshake done, session idle
        tap.inject_on_upstream(forge)
        for _ in range(3):
            try:
                ok = bool(np.allclose(lab._embed(s), lab.reference, atol=1e-5)) or ok
            except Exception as e:  # noqa: BLE001
                forged_seen = forged_seen or "FORGED" in str(e)
        forged_seen = forged_seen or any("FORGED" in str(m.meta.get("msg", "")) for m in s._pending.values())
        s.close()
        lab._sessions.remove(s)
    except Exception as e:  # noqa: BLE001
        forged_seen = forged_seen or "FORGED" in str(e)
    finally:
        tap.close()
    return {"refused": not forged_seen, "forged_error_raised_or_kept": forged_seen, "client_ok_through_tap": ok}


def unlisted_key(lab: HostileLab) -> dict:
    """A client whose key is not on the allow-list: AuthError at connect, nothing executed."""
    if not lab.keyed:
        return {"refused": False, "why": "no keys: anyone who reaches the port is served", "applicable": False}
    from splitnet.errors import AuthError

    t0 = time.monotonic()
    try:
        s = lab.session("outsider")
        s.close()
        return {"refused": False}
    except AuthError as e:
        return {"refused": True, "seconds": round(time.monotonic() - t0, 2), "error": str(e)[:160]}


def wrong_server_key(lab: HostileLab) -> dict:
    """A client that trusts the wrong server key (a man in the middle's): the handshake fails."""
    if not lab.keyed:
        return {"refused": False, "why": "no keys: nothing authenticates the stage", "applicable": False}
    from splitnet.errors import AuthError

    try:
        s = lab.session("victim", server_keys=str(lab.dir / "outsider.key"))
        s.close()
        return {"refused": False}
    except AuthError as e:
        return {"refused": True, "error": str(e)[:160]}


ATTACKS: dict[str, Callable[..., dict]] = {
    "replay_new_connection": replay_new_connection,
    "replay_after_restart": replay_after_restart,
    "zero_frame_envelope": zero_frame_envelope,
    "cache_flush": cache_flush,
    "oversized_messages": oversized_messages,
    "many_frames": many_frames,
    "idle_connection_flood": idle_connection_flood,
    "crash_descriptor": crash_descriptor,
    "route_key_poisoning": route_key_poisoning,
    "routing_id_squatting": routing_id_squatting,
    "forged_plaintext_error": forged_plaintext_error,
    "unlisted_key": unlisted_key,
    "wrong_server_key": wrong_server_key,
}
