"""The planner's per-message transport bytes (splitnet.wire.overhead), and LinkProfile takes them
as its default."""

from __future__ import annotations

import pytest

from splitnet.errors import ConfigError
from splitnet.planner.profiles import LinkProfile
from splitnet.wire import overhead


def test_link_defaults_to_its_transport_bytes():
    assert LinkProfile("a", "b", 10.0).bytes_per_message == 0.0
    assert LinkProfile("a", "b", 10.0, transport="curvezmq").bytes_per_message == 66
    assert LinkProfile("a", "b", 10.0, transport="curvezmq", bytes_per_message=0).bytes_per_message == 0.0  # explicit wins
    ln = LinkProfile.from_dict({"src": "a", "dst": "b", "bandwidth_mbit_s": 5, "transport": "curvezmq"})
    assert LinkProfile.from_dict(ln.to_dict()) == ln
    assert overhead.transport_bytes_per_message("curvezmq", 5) == 5 * overhead.CURVEZMQ_BYTES_PER_FRAME
    for gone in ("tls", "sealed"):  # sealed was splitnet's own construction: removed
        with pytest.raises(ConfigError, match="transport"):
            LinkProfile("a", "b", 10.0, transport=gone)
    with pytest.raises(ValueError, match="frames"):
        overhead.transport_bytes_per_message("curvezmq", 0)
