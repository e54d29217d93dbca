"""Bearer API keys of the HTTP API: ``--api-key`` values and ``--api-keys-file`` lines.

Keys are compared in constant time (``hmac.compare_digest``) against every listed key. The keys
file holds one key a line (blank lines and ``#`` comments skipped) and, like a CURVE secret, must
not be readable by group or others."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Iterable

from splitnet.errors import ConfigError

MIN_KEY_CHARS = 16


def read_keys_file(path: str | Path) -> list[str]:
    """The API keys listed in ``path``."""
    from splitnet.wire.security import check_secret_file_mode

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--api-keys-file {p} does not exist")
    check_secret_file_mode(p)
    keys = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"--api-keys-file {p} lists no key (one key a line)")
    return keys


class APIKeys:
    """The keys a request may present; an empty set means authentication is off."""

    def __init__(self, keys: Iterable[str] = ()):
        self.keys = tuple(dict.fromkeys(keys))
        for k in self.keys:
            if len(k) < MIN_KEY_CHARS or any(c.isspace() for c in k):
                raise ConfigError(f"API keys must be at least {MIN_KEY_CHARS} characters without spaces "
                                  "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries a listed key."""
        if not self.keys:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        token = token.strip().encode()
        ok = False
        for k in self.keys:  # every key is compared, whichever matches
            ok |= hmac.compare_digest(token, k.encode())
        return ok
