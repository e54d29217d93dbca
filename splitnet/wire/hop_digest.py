"""A digest of one hop (a next stage's endpoint and CURVE key), as a stage's heartbeat reports the
target of a send in progress: a client can tell whether that send goes to its own next stage
(liveness, :mod:`splitnet.edge.links`) without the stage telling every pinging client where the
other requests are routed."""

from __future__ import annotations

import hashlib


def hop_digest(endpoint: str, key: bytes | str | None) -> str:
    """16 hex digits of ``endpoint`` and ``key`` (z85 text or its bytes; None or "" without keys)."""
    k = key.decode() if isinstance(key, bytes) else (key or "")
    return hashlib.blake2b(f"{endpoint}|{k}".encode(), digest_size=8).hexdigest()
