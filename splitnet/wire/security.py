"""CURVE encryption and authentication for every splitnet socket.

Who is who:

- a **stage** binds a ROUTER as a CURVE *server* with its own keypair (``--server-key``) and
  accepts only clients whose public key is in its allow-list directory (``--keys-dir``, one
  ``*.key`` file per client, as written by ``splitnet keys gen``) or equals its own public key
  (so stages of one deployment sharing a keypair can talk to each other);
- a stage connects to the next stage as a CURVE *client* with its own keypair; the next stage's
  public key is ``meta.route_keys[0]`` when the client sent one, else the stage's own public key;
- the **client** connects to stages with its own keypair and the stages' public key, and binds its
  result socket as a CURVE server with the same keypair; the last stage connects back with
  ``meta.reply_key`` (the client's public key, sent with every forward). The result socket only
  accepts the stage keys the client trusts.

Authentication runs through ZAP (pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`, one per
context, one ZAP domain per bound socket). ZeroMQ itself stays silent when a handshake fails, so
:class:`HandshakeWatch` reads the socket monitor's handshake events and turns a failure into an
:class:`~splitnet.errors.AuthError` within a poll interval.
"""

from __future__ import annotations

import itertools
import errno
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from splitnet.errors import AuthError, ConfigError

if TYPE_CHECKING:
    from splitnet.wire.sockets import SocketConfig

log = logging.getLogger("splitnet.security")

INSECURE_WARNING = (
    "running WITHOUT CURVE (--insecure): traffic is plaintext and anyone who can reach this port can "
    "drive the stage; use only on a trusted, isolated network"
)

_Z85_KEY_LEN = 40

#: keyed transports: libzmq's CurveZMQ (handshake with per-connection ephemeral keys, ZAP allow-list)
TRANSPORTS = ("curvezmq",)
DEFAULT_TRANSPORT = "curvezmq"
#: an unauthenticated connection that has not completed its handshake within this is closed
HANDSHAKE_TIMEOUT_MS = 5000
_REMOVED_TRANSPORTS = {
    "sealed": "the 'sealed' transport was removed: it had no handshake (a recorded session replayed on a new "
    "connection was executed) and failed live attacks (docs/security.md); use 'curvezmq' on both ends",
}


def check_transport(transport: str) -> str:
    """``transport`` if it is a keyed transport splitnet offers; ConfigError saying what to use otherwise."""
    if transport in _REMOVED_TRANSPORTS:
        raise ConfigError(_REMOVED_TRANSPORTS[transport])
    if transport not in TRANSPORTS:
        raise ConfigError(f"unknown secure transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
    return transport


# ---------------------------------------------------------------------- keys ---------------------
@dataclass(frozen=True)
class KeyPair:
    """A CURVE keypair as Z85 bytes (40 characters each); ``secret`` may be None for a public key."""

    public: bytes
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.public) != _Z85_KEY_LEN or (self.secret is not None and len(self.secret) != _Z85_KEY_LEN):
            raise ConfigError("a CURVE key must be 40 Z85 characters; regenerate it with `splitnet keys gen`")


_CERT_TEMPLATE = """#   ZeroMQ CURVE {title} Certificate, written by `splitnet keys gen`
#   {advice}

metadata
curve
    public-key = "{public}"
{secret_line}"""


def _write_new(path: Path, text: str, mode: int, overwrite: bool) -> None:
    """Create ``path`` with ``mode`` from the first byte (O_EXCL: never a file another user made,
    never world-readable for an instant); with ``overwrite``, via a new file renamed over it."""
    target = path
    if overwrite:
        path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except FileExistsError as e:
        raise ConfigError(f"{target} exists; pass --force (overwrite=True) to replace it") from e
    with os.fdopen(fd, "w", encoding="utf8") as f:
        f.write(text)
    if overwrite:
        os.replace(path, target)


def generate_keypair(out_dir: str | os.PathLike, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, mode 0644: share it) and ``NAME.key_secret`` (mode 0600 from
    creation: keep it) into ``out_dir``, in ZeroMQ's certificate format."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub, sec = out / f"{name}.key", out / f"{name}.key_secret"
    if not overwrite:
        for f in (pub, sec):
            if f.exists():
                raise ConfigError(f"{f} exists; pass --force (overwrite=True) to replace it")
    _write_new(sec, _CERT_TEMPLATE.format(title="**Secret**", advice="keep this file private (mode 0600); never copy it to another machine",
                                          public=public.decode(), secret_line=f'    secret-key = "{secret.decode()}"\n'), 0o600, overwrite)
    _write_new(pub, _CERT_TEMPLATE.format(title="Public", advice="share this file: put it in the allow-list (--keys-dir) of stages",
                                          public=public.decode(), secret_line=""), 0o644, overwrite)
    return pub, sec


def check_secret_file_mode(path: Path) -> None:
    """Refuse a secret key file that group or others can read or write (as ssh does)."""
    if os.name != "posix":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"secret key file {path} has mode {mode:04o}: group or others can read it; "
            f"run `chmod 600 {path}` (or regenerate it with `splitnet keys gen`)"
        )


def load_keypair(path: str | os.PathLike) -> KeyPair:
    """Read a certificate file written by :func:`generate_keypair` (``.key_secret`` for both halves);
    a secret that group or others can read is refused."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"key file {p} does not exist; create one with `splitnet keys gen --out {p.parent} --name NAME`")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{p} is not a CURVE certificate written by `splitnet keys gen`: {e}") from e
    if secret:
        check_secret_file_mode(p)
    return KeyPair(public, secret)


def load_public_key(path_or_key: str | os.PathLike | bytes) -> bytes:
    """A public key from a ``.key``/``.key_secret`` file or given directly as 40 Z85 characters."""
    if isinstance(path_or_key, bytes):
        return KeyPair(path_or_key).public
    s = str(path_or_key)
    if len(s) == _Z85_KEY_LEN and not os.path.exists(s):
        return KeyPair(s.encode()).public
    return load_keypair(s).public


class AllowList:
    """Client public keys allowed to connect: every ``*.key`` in ``directory`` plus ``extra`` keys.

    The directory is re-read when its modification time changes, so adding or removing a key file
    takes effect for the next connection without a restart.
    """

    def __init__(self, directory: str | os.PathLike | None = None, extra: Iterable[bytes] = ()):
        self.directory = Path(directory) if directory else None
        if self.directory is not None and not self.directory.is_dir():
            raise ConfigError(f"allow-list directory {self.directory} does not exist")
        self.extra = frozenset(extra)
        self._keys: frozenset[bytes] = frozenset()
        self._mtime: float | None = None
        self._lock = threading.Lock()
        self._reload()

    def _reload(self) -> None:
        if self.directory is None:
            return
        mtime = self.directory.stat().st_mtime
        if mtime == self._mtime:
            return
        keys = set()
        for f in sorted(self.directory.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(str(f))
            except (ValueError, OSError):
                log.warning("ignoring %s in the allow-list: not a public key file", f)
                continue
            if public and len(public) == _Z85_KEY_LEN:
                keys.add(public)
        self._keys = frozenset(keys)
        self._mtime = mtime

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            self._reload()
            return key in self.extra or key in self._keys

    def __len__(self) -> int:
        with self._lock:
            self._reload()
            return len(self.extra | self._keys)


class _DomainProvider:
    """ZAP credentials callback of one context: the allow-list of each bound socket's domain."""

    def __init__(self) -> None:
        self.allow: dict[str, AllowList] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        allow = self.allow.get(domain)
        ok = allow is not None and key in allow
        if not ok:
            log.warning("refused a CURVE client with public key %s... (not in the allow-list of %s)", key[:8].decode(errors="replace"), domain)
        return ok


_AUTH_LOCK = threading.Lock()
_AUTHS: dict[int, tuple[zmq.Context, object, _DomainProvider]] = {}
_DOMAIN_IDS = itertools.count()


def _register_domain(ctx: zmq.Context, allow: AllowList) -> str:
    """Start (once per context) the ZAP authenticator and register a new domain for ``allow``."""
    from zmq.auth.thread import ThreadAuthenticator

    with _AUTH_LOCK:
        entry = _AUTHS.get(id(ctx))
        if entry is None or entry[0] is not ctx or entry[0].closed:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("splitnet.security.zap"))
            auth.start()
            provider = _DomainProvider()
            entry = (ctx, auth, provider)
            _AUTHS[id(ctx)] = entry
        _, auth, provider = entry
        domain = f"splitnet-{os.getpid()}-{next(_DOMAIN_IDS)}"
        provider.allow[domain] = allow
        auth.configure_curve_callback(domain, provider)  # type: ignore[attr-defined]
        return domain


def stop_authenticator(ctx: zmq.Context) -> None:
    """Stop the ZAP thread of ``ctx`` (call before ``ctx.term()``, or term waits for it forever)."""
    with _AUTH_LOCK:
        entry = _AUTHS.pop(id(ctx), None)
    if entry is not None and entry[0] is ctx:
        entry[1].stop()  # type: ignore[attr-defined]


def stop_authenticators() -> None:
    """Stop every ZAP thread this process started (tests; normal processes just exit)."""
    with _AUTH_LOCK:
        for _, auth, _ in _AUTHS.values():
            auth.stop()  # type: ignore[attr-defined]
        _AUTHS.clear()


# ---------------------------------------------------------------------- socket hook --------------
@dataclass(frozen=True)
class CurveConfig:
    """CURVE settings applied by :func:`make_socket` through ``SocketConfig.security``.

    Attributes:
        keypair: this side's keypair (server identity on bound sockets, client identity on
            connecting ones).
        server_key: public key of the peers this side connects to by default; None: this side's
            own public key (stages sharing one deployment keypair). A client that talks to stages
            with different keys points each socket at its stage with :func:`set_peer_key`.
        allow_dir: directory of ``*.key`` files allowed to connect to sockets this side binds.
        allow_keys: further public keys allowed to connect (Z85 bytes).
        allow_self: also allow this side's own public key.
        stage_dir: directory of ``*.key`` files of the upstream stages: they may connect, and they
            may forward work on behalf of the client that sent it (``meta.origin``); anyone else's
            messages are taken as their own.
        transport: ``"curvezmq"``, libzmq's CURVE handshake and encryption with ZAP
            authentication (the only keyed transport).
    """

    keypair: KeyPair
    server_key: bytes | None = None
    allow_dir: str | None = None
    allow_keys: tuple[bytes, ...] = ()
    allow_self: bool = True
    stage_dir: str | None = None
    transport: str = DEFAULT_TRANSPORT

    def __post_init__(self) -> None:
        if self.keypair.secret is None:
            raise ConfigError("CurveConfig.keypair needs its secret half (the .key_secret file)")
        check_transport(self.transport)
        if self.server_key is not None:
            KeyPair(self.server_key)
        if self.stage_dir is not None and not Path(self.stage_dir).is_dir():
            raise ConfigError(f"stage-key directory {self.stage_dir} does not exist")

    @property
    def public_key(self) -> bytes:
        return self.keypair.public

    @property
    def peer_key(self) -> bytes:
        return self.server_key or self.keypair.public

    def stage_list(self) -> AllowList:
        """Keys trusted to forward on behalf of clients: the upstream stages, and this side's own."""
        return AllowList(self.stage_dir, {self.keypair.public})

    def allow_list(self) -> AllowList:
        extra = set(self.allow_keys)
        if self.allow_self:
            extra.add(self.keypair.public)
        return _UnionAllowList(AllowList(self.allow_dir, extra), self.stage_list() if self.stage_dir else None)

    def __call__(self, sock: zmq.Socket, server: bool) -> None:
        """Configure ``sock`` (the ``SocketConfig.security`` hook)."""
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        if server:
            sock.zap_domain = _register_domain(sock.context, self.allow_list()).encode()
            sock.curve_server = True
        else:
            sock.curve_serverkey = self.peer_key


class _UnionAllowList:
    """Keys in either of two allow-lists."""

    def __init__(self, first: AllowList, second: AllowList | None):
        self.first, self.second = first, second

    def __contains__(self, key: bytes) -> bool:
        return key in self.first or (self.second is not None and key in self.second)

    def __len__(self) -> int:
        return len(self.first) + (len(self.second) if self.second is not None else 0)


def set_peer_key(sock: zmq.Socket, key: bytes) -> None:
    """Point a connecting socket at a peer with public key ``key`` (Z85), before ``connect``."""
    sock.curve_serverkey = KeyPair(key).public


def server_curve_config(server_key_file: str, keys_dir: str | None, transport: str = DEFAULT_TRANSPORT, stage_keys_dir: str | None = None) -> CurveConfig:
    """A stage's CURVE settings from ``--server-key``, ``--keys-dir``, ``--stage-keys-dir`` and ``--transport``."""
    return CurveConfig(keypair=load_keypair(server_key_file), allow_dir=keys_dir, stage_dir=stage_keys_dir or None, transport=transport)


def load_server_keys(server_key: str | bytes | Iterable[str | bytes]) -> tuple[bytes, ...]:
    """Stage public keys from one key (every stage holds it) or one per stage: files, 40-character
    Z85 strings, or one string of them separated by commas."""
    if isinstance(server_key, (str, bytes, os.PathLike)):
        text = os.fspath(server_key)
        items = text.split(b"," if isinstance(text, bytes) else ",") if text else []
    else:
        items = list(server_key)
    keys = tuple(load_public_key(k.strip() if isinstance(k, (str, bytes)) else k) for k in items if k)
    if not keys:
        raise ConfigError("no stage public key given: pass the stages' NAME.key files (one for all, or one per stage)")
    return keys


def client_curve_config(client_key_file: str, server_key: str | bytes | Iterable[str | bytes], extra_trusted: Iterable[bytes] = (), transport: str = DEFAULT_TRANSPORT) -> CurveConfig:
    """A client's CURVE settings: its keypair and the stages' public keys (the first is the
    default peer); results accepted only from stages holding one of them (or ``extra_trusted``)."""
    servers = load_server_keys(server_key)
    return CurveConfig(keypair=load_keypair(client_key_file), server_key=servers[0], allow_keys=(*servers, *extra_trusted), allow_self=False, transport=transport)


# ---------------------------------------------------------------------- handshake monitor --------
_WATCHED = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class HandshakeWatch:
    """Watch connecting sockets' monitor events and raise :class:`AuthError` when a handshake fails.

    ``add(sock, endpoint)`` must be called before ``sock.connect``. ``check()`` is non-blocking:
    call it from the thread that owns the sockets while waiting for the first answers.
    """

    def __init__(self, secure: bool):
        self.secure = secure
        self._mons: list[tuple[zmq.Socket, zmq.Socket, str]] = []
        self._state: dict[str, str] = {}
        self._broken_pipes: dict[str, int] = {}  # handshakes the peer hung up on mid-greeting, per endpoint

    def add(self, sock: zmq.Socket, endpoint: str) -> None:
        self._mons.append((sock, sock.get_monitor_socket(_WATCHED), endpoint))

    def ok(self, endpoint: str) -> bool:
        return self._state.get(endpoint) == "ok"

    def check(self, timeout_ms: int = 0) -> None:
        if timeout_ms > 0 and self._mons:
            poller = zmq.Poller()
            for _, mon, _ in self._mons:
                poller.register(mon, zmq.POLLIN)
            poller.poll(timeout_ms)
        for _, mon, ep in self._mons:
            while True:
                try:
                    ev = recv_monitor_message(mon, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_event(ev["event"], ev["value"], ep)

    def _on_event(self, event: int, value: int, ep: str) -> None:
        if event == zmq.EVENT_CONNECTED:
            if self._state.get(ep) != "ok":
                self._state[ep] = "connected"
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._state[ep] = "ok"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise AuthError(
                f"the stage at {ep} refused this client's key (ZAP status {value}): add the client's public "
                "key file (NAME.key from `splitnet keys gen`) to the stage's --keys-dir"
            )
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                raise AuthError(self._mismatch(ep))
            raise AuthError(
                f"the CURVE handshake with {ep} failed (protocol error {value:#x}): the server public key "
                "this client uses is probably not the stage's (--server-key); check both key files"
            )
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            if self.secure:
                raise AuthError(
                    f"the CURVE handshake with {ep} failed (errno {value}): the stage could not read this client's "
                    "HELLO, so the server key this client uses is not the stage's (--server-key); check both key files"
                )
            if value == errno.EPIPE:
                self._broken_pipes[ep] = self._broken_pipes.get(ep, 0) + 1
            if value == errno.ECONNRESET or (value == errno.EPIPE and self._broken_pipes[ep] == 1):
                # the peer's kernel reset the connection, or it went away while we wrote the
                # greeting (a stage dying or restarting as we connect: seen once in 276 chaos
                # faults): no verdict on keys; the connection is retried and silence is reported
                # by timeouts. A second broken pipe on the same endpoint is a peer that hangs up
                # on every greeting: the mechanism differs
                self._state[ep] = "reset"
                return
            raise AuthError(self._mismatch(ep) + f" (handshake failed, errno {value})")
        elif event == zmq.EVENT_DISCONNECTED and self._state.get(ep) == "connected":
            # the peer hung up before the handshake finished: it could not decrypt our HELLO
            # (wrong server key) or it speaks another mechanism (one side plaintext)
            if self.secure:
                raise AuthError(
                    f"the stage at {ep} closed the connection during the CURVE handshake: this client's "
                    "server key does not match the stage's --server-key, or the stage runs --insecure"
                )
            raise AuthError(self._mismatch(ep))

    def _mismatch(self, ep: str) -> str:
        if self.secure:
            return f"the stage at {ep} runs without CURVE (--insecure) but this client uses CURVE keys; secure the stage or connect insecurely"
        return (
            f"the stage at {ep} requires CURVE authentication and this client connects in plaintext: pass "
            "ClientConfig(client_key=..., server_key=...) (or --client-key/--server-key)"
        )

    def close(self) -> None:
        for sock, mon, _ in self._mons:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)
        self._mons.clear()


def wait_handshake(watch: HandshakeWatch, endpoints: list[str], timeout_s: float = 2.0) -> None:
    """Block until every endpoint completed its handshake (or raise AuthError / StageUnavailable)."""
    from splitnet.errors import StageUnavailable

    deadline = time.monotonic() + timeout_s
    while not all(watch.ok(ep) for ep in endpoints):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [ep for ep in endpoints if not watch.ok(ep)]
            raise StageUnavailable(f"no completed handshake within {timeout_s} s with {missing}")
        watch.check(timeout_ms=max(1, int(min(left, 0.1) * 1000)))


def stage_socket_config(
    server_key: str, keys_dir: str, insecure: bool, bind: str, send_timeout_ms: int = 5000, transport: str = DEFAULT_TRANSPORT,
    stage_keys_dir: str = "", max_message_bytes: int | None = None,
) -> "SocketConfig":
    """The socket settings of ``splitnet serve-stage``: CURVE from ``--server-key``/``--keys-dir``,
    plaintext only with ``--insecure`` (warned)."""
    from splitnet.wire.sockets import SocketConfig

    if server_key:
        if insecure:
            raise ConfigError("--server-key and --insecure contradict each other; pick one")
        if keys_dir and not Path(keys_dir).is_dir():
            raise ConfigError(f"--keys-dir {keys_dir} is not a directory of client public keys")
        if stage_keys_dir and not Path(stage_keys_dir).is_dir():
            raise ConfigError(f"--stage-keys-dir {stage_keys_dir} is not a directory of upstream stage public keys")
        if not keys_dir and not stage_keys_dir:
            log.warning("no --keys-dir: only peers holding this stage's own keypair may connect")
        return SocketConfig(send_timeout_ms=send_timeout_ms, security=server_curve_config(server_key, keys_dir or None, transport, stage_keys_dir or None),
                            **({"max_message_bytes": max_message_bytes} if max_message_bytes else {}))
    if not insecure:
        raise ConfigError(
            f"refusing to serve {bind} without authentication: pass --server-key KEY.key_secret and --keys-dir DIR "
            "(see `splitnet keys gen`), or --insecure to accept plaintext from anyone who can reach the port"
        )
    host = bind.split("://", 1)[-1].rsplit(":", 1)[0]
    loopback = bind.startswith(("ipc://", "inproc://")) or host.startswith("127.") or host in ("localhost", "[::1]")
    if loopback:
        log.warning("serving plaintext (--insecure) on loopback %s", bind)
    else:
        log.warning(INSECURE_WARNING)
        print(f"WARNING: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    return SocketConfig(send_timeout_ms=send_timeout_ms, **({"max_message_bytes": max_message_bytes} if max_message_bytes else {}))
