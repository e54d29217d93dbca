"""The chaos bench's replay figures: grouping replays by the requests rebuilt from one loss."""

from __future__ import annotations

from splitnet.bench.chaos import _by_requests_rebuilt_together

STAGE0 = ["stage", "0", "at", "tcp://127.0.0.1:4000"]
STAGE1 = ["stage", "1", "at", "tcp://127.0.0.1:4001"]


def test_replays_of_one_loss_are_grouped_and_other_losses_are_not():
    kept = [
        (STAGE0, 10.0, 0.9), (STAGE0, 10.2, 1.4), (STAGE0, 10.3, 1.8),  # one loss, three requests
        (STAGE1, 10.1, 0.7),  # another stage lost at the same moment: its own group
        (STAGE0, 30.0, 0.8),  # stage 0's replacement lost later: alone
    ]
    groups = _by_requests_rebuilt_together(kept, window_s=1.5)
    assert set(groups) == {"1", "3"}
    assert groups["3"]["n"] == 3 and groups["3"]["max"] == 1.8
    assert groups["1"]["n"] == 2 and groups["1"]["max"] == 0.8


def test_no_replays_no_groups():
    assert _by_requests_rebuilt_together([], window_s=1.5) == {}
