"""Fixtures for the netns tier: skip unless root; a lab of three hosts torn down even on failure."""

from __future__ import annotations

import pytest

from splitnet.lab.netns import LinkSpec, check_root, lab_topology

LINKS = {
    ("edge-a", "edge-b"): LinkSpec(rate_mbit=50, delay_ms=5, jitter_ms=1),
    ("edge-b", "cloud"): LinkSpec(rate_mbit=20, delay_ms=10, jitter_ms=2, loss_pct=0.5),
    ("edge-a", "cloud"): LinkSpec(rate_mbit=20, delay_ms=10),
}


def pytest_collection_modifyitems(config, items):
    reason = check_root()
    if reason:
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def lab():
    with lab_topology(("edge-a", "edge-b", "cloud"), LINKS) as lab:  # removes namespaces and kills processes however the tests end
        yield lab
