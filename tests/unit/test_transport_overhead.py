"""The planner's per-message transport bytes (splitnet.wire.overhead) match what the transports
really add, and LinkProfile takes them as its default."""

from __future__ import annotations

import os

import numpy as np
import pytest

from splitnet.errors import ConfigError
from splitnet.planner.profiles import LinkProfile
from splitnet.wire import overhead
from splitnet.wire.sealed import ENVELOPE_BYTES, TO_SERVER, _seal


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_sealed_overhead_is_what_sealing_adds(frames):
    parts = [os.urandom(10 + 7 * i) for i in range(frames - 1)] + [np.arange(50_000, dtype=np.float32)]  # bytes and array paths
    sealed = _seal(os.urandom(32), TO_SERVER, os.urandom(32), os.urandom(32), 1, parts)
    added = sum(memoryview(f).nbytes for f in sealed) - sum(memoryview(p).nbytes for p in parts)
    assert added == overhead.transport_bytes_per_message("sealed", frames)
    assert ENVELOPE_BYTES == overhead.SEALED_ENVELOPE_BYTES


def test_link_defaults_to_its_transport_bytes():
    assert LinkProfile("a", "b", 10.0).bytes_per_message == 0.0
    assert LinkProfile("a", "b", 10.0, transport="sealed").bytes_per_message == 107 + 2 * 32
    assert LinkProfile("a", "b", 10.0, transport="curvezmq").bytes_per_message == 66
    assert LinkProfile("a", "b", 10.0, transport="sealed", bytes_per_message=0).bytes_per_message == 0.0  # explicit wins
    ln = LinkProfile.from_dict({"src": "a", "dst": "b", "bandwidth_mbit_s": 5, "transport": "sealed"})
    assert LinkProfile.from_dict(ln.to_dict()) == ln
    with pytest.raises(ConfigError, match="transport"):
        LinkProfile("a", "b", 10.0, transport="tls")
    with pytest.raises(ValueError, match="frames"):
        overhead.transport_bytes_per_message("sealed", 0)
