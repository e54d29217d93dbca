"""splitnet: edge-cloud collaborative split inference.

Quick start::

    import splitnet
    session = splitnet.connect(["tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"])
    print(session.infer({"text": ["hello world"]}))
"""

from splitnet.errors import (
    CodecError,
    ConfigError,
    LimitExceeded,
    ModelLoadError,
    PlanMismatch,
    ProtocolError,
    SplitnetError,
    StageError,
    StageUnavailable,
)

__version__ = "0.1.0"


def connect(stages, **kwargs):
    """Connect to a pipeline of stage endpoints (or a plan file); see :func:`splitnet.edge.sdk.connect`."""
    from splitnet.edge.sdk import connect as _connect

    return _connect(stages, **kwargs)


__all__ = [
    "CodecError",
    "ConfigError",
    "LimitExceeded",
    "ModelLoadError",
    "PlanMismatch",
    "ProtocolError",
    "SplitnetError",
    "StageError",
    "StageUnavailable",
    "__version__",
    "connect",
]
