"""The splitnet error family.

Every error a user can meet derives from :class:`SplitnetError`. Errors that travel between
processes are sent as data (``{"status": "error", "code": ..., "msg": ...}``) and rebuilt on the
other side with :func:`error_from_code`, so a remote failure raises the same type locally.
"""

from __future__ import annotations


class SplitnetError(Exception):
    """Base class of every error splitnet raises on purpose."""

    code = "internal"


class ConfigError(SplitnetError, ValueError):
    """A configuration value is invalid; the message names the field and the reason."""

    code = "config"


class ProtocolError(SplitnetError):
    """A wire message is malformed (bad version, frame count, byte count, dtype, size cap)."""

    code = "protocol"


class LimitExceeded(ProtocolError):
    """A peer asked for more than a configured limit (header size, tensor size, requests, cache)."""

    code = "limit"


class StageUnavailable(SplitnetError):
    """A stage did not answer within its timeout, or its process is gone."""

    code = "unavailable"


class StageError(SplitnetError):
    """A stage received a well-formed request but failed while executing it."""

    code = "stage"


class UnknownRequest(StageError):
    """A decode step referred to a request whose KV cache the stage does not hold."""

    code = "unknown_request"


class CachesLost(UnknownRequest):
    """Some stages' caches are gone while the others' are not: ``stages`` names those that lost
    theirs (a process restarted on its endpoint; none when only a reply was lost on the way).
    A recovery then resumes the requests on the caches that survived (refilling those stages)
    instead of replaying them in full."""

    #: its own code: a client raises it, no stage sends it, and a stage's ``unknown_request``
    #: must come back as a plain UnknownRequest (a lost cache to replay in full), not as a
    #: CachesLost naming no stage (a resume on the same caches, which fails again)
    code = "caches_lost"

    def __init__(self, message: str, stages: tuple[int, ...] = ()):
        super().__init__(message)
        self.stages = tuple(stages)


class StaleEpoch(ProtocolError):
    """A message of a request stamped with an older epoch than one the stage already saw for it
    (sent before the client's recovery started a new epoch): refused, never run."""

    code = "stale_epoch"


class PlanMismatch(SplitnetError):
    """The plan, model or codebook hash a peer expects differs from what is loaded."""

    code = "plan_mismatch"


class ModelLoadError(SplitnetError):
    """A model directory or weight file is missing, incomplete or of an unsupported architecture."""

    code = "model_load"


class CodecError(SplitnetError):
    """A codec was misused (not fitted, wrong shape) or its payload is inconsistent."""

    code = "codec"


class AuthError(SplitnetError):
    """A CURVE handshake failed: wrong, missing or unauthorised key."""

    code = "auth"


_BY_CODE: dict[str, type[SplitnetError]] = {}


def _register(cls: type[SplitnetError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(SplitnetError)


def error_from_code(code: str, msg: str) -> SplitnetError:
    """Rebuild an error sent as data by a peer; unknown codes become a plain StageError."""
    cls = _BY_CODE.get(code, StageError)
    return cls(msg)
