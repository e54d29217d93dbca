"""Configuration of a client session."""

from __future__ import annotations

from dataclasses import dataclass

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class ClientConfig:
    """Timeouts and liveness settings of :class:`splitnet.edge.sdk.Session`.

    Attributes:
        timeout_s: longest wait for one request's result (a prefill or a decode step).
        connect_timeout_s: longest wait for every stage to answer ``info`` at connect.
        heartbeat_interval_s: how often each stage is pinged while a request is in flight.
        heartbeat_liveness: missed heartbeats after which a stage is declared unavailable: a
            stage silent for ``heartbeat_interval_s x heartbeat_liveness`` (1.5 s by default)
            plus 4 x the longest of its recent heartbeat round trips (milliseconds on a LAN;
            seconds on a slow, lossy link or a loaded host), at most ``max_rtt_slack_s``, is
            unavailable.
        max_rtt_slack_s: the most the round trips may add to a stage's silence window (1.4 s:
            at the defaults a stage silent for 2.9 s is down, however slow its pongs were, so a
            failure is seen within 3 s with the poll loop's 50 ms; raise it for links whose
            round trips are near a second or more). A stage frozen for a while (a SIGSTOP, a
            long pause) answers its next ping late, and that one round trip widens its window
            to the cap for its next 16 heartbeats.
        reply_via: how results come back: ``"connection"`` (default) over the connection this
            client opened to the last stage, so the client needs no open port and works behind
            NAT; ``"bind"``: the client binds ``reply_host`` and the last stage connects to it.
        reply_host: address this client binds for results with ``reply_via="bind"``; it must be
            reachable from the last stage.
        max_recoveries: most recoveries (stage replacements + replays, and failed attempts
            inside a recovery) one request may use before it fails (with a recovery hook).
        recovery_refill_tokens: one recovery is given back per this many tokens generated
            since the last one (0: never), so a long generation survives faults far apart.
        disconnect_grace_s: a stage whose connection closed (socket monitor) and has not come
            back within this is unavailable at once, before its heartbeat window ends (a
            stage restarted on the same endpoint reconnects within it; on links with long
            round trips, raise it above a reconnect + handshake time).
        compute_stall_s: a stage whose heartbeat says its compute thread has not finished a
            round for this long (and for 4 x the longest step this client saw it compute),
            with no forward done since its previous heartbeat, counts as failed: its I/O thread
            answers, but the work does not move (a frozen compute thread is replaced).
        max_pending_replies: most replies held for requests not yet collected; beyond it a new
            reply raises LimitExceeded (replies of released requests or old epochs are dropped).
        prefill_chunk_tokens: prompt tokens per prefill chunk (chunks flow through the stages
            one after another, so stage i works on chunk k+1 while stage i+1 works on chunk k).
        client_key: this client's CURVE keypair file (``NAME.key_secret`` from ``splitnet keys gen``);
            "" connects in plaintext (a stage that requires CURVE then refuses with AuthError).
        server_key: the stages' public keys (``NAME.key`` files or 40 Z85 characters): one for
            every stage, or one per stage in pipeline order (a tuple, or one string separated by
            commas); needed with ``client_key``. Each stage learns the next one's key from the
            request (``meta.route_keys``), for that request only.
        transport: how keyed links are protected: ``"curvezmq"`` (libzmq CURVE), the only one.
    """

    timeout_s: float = 60.0
    connect_timeout_s: float = 30.0
    heartbeat_interval_s: float = 0.5
    heartbeat_liveness: int = 3
    max_rtt_slack_s: float = 1.4
    reply_via: str = "connection"
    reply_host: str = "127.0.0.1"
    prefill_chunk_tokens: int = 64
    max_recoveries: int = 3
    recovery_refill_tokens: int = 256
    disconnect_grace_s: float = 1.0
    compute_stall_s: float = 2.0
    max_pending_replies: int = 1024
    client_key: str = ""
    server_key: str | tuple[str, ...] = ""
    transport: str = "curvezmq"

    def __post_init__(self) -> None:
        for name in ("timeout_s", "connect_timeout_s", "heartbeat_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ClientConfig.{name} must be positive, got {getattr(self, name)!r}")
        if not self.max_rtt_slack_s >= 0:
            raise ConfigError("ClientConfig.max_rtt_slack_s must be >= 0")
        if self.heartbeat_liveness < 1:
            raise ConfigError("ClientConfig.heartbeat_liveness must be >= 1")
        if self.max_recoveries < 0:
            raise ConfigError("ClientConfig.max_recoveries must be >= 0")
        if self.recovery_refill_tokens < 0:
            raise ConfigError("ClientConfig.recovery_refill_tokens must be >= 0 (0: the budget never refills)")
        if self.disconnect_grace_s <= 0:
            raise ConfigError(f"ClientConfig.disconnect_grace_s must be positive, got {self.disconnect_grace_s!r}")
        if self.compute_stall_s <= 0:
            raise ConfigError(f"ClientConfig.compute_stall_s must be positive, got {self.compute_stall_s!r}")
        if self.max_pending_replies < 1:
            raise ConfigError("ClientConfig.max_pending_replies must be >= 1")
        if self.prefill_chunk_tokens < 1:
            raise ConfigError("ClientConfig.prefill_chunk_tokens must be >= 1")
        if bool(self.client_key) != bool(self.server_key):
            raise ConfigError("ClientConfig.client_key and server_key go together (CURVE needs both)")
        if self.reply_via not in ("connection", "bind"):
            raise ConfigError(f"ClientConfig.reply_via must be 'connection' or 'bind', got {self.reply_via!r}")
        from splitnet.wire.security import check_transport

        check_transport(self.transport)
