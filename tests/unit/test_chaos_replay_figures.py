"""The chaos bench's replay figures: grouping replays by the requests rebuilt from one loss."""

from __future__ import annotations

from splitnet.bench.chaos import _by_requests_rebuilt_together

STAGE0 = ["stage", "0"]
STAGE1 = ["stage", "1"]


def test_replays_of_one_loss_are_grouped_and_other_losses_are_not():
    kept = [
        (STAGE0, 10.0, 0.9, 50, 0.1), (STAGE0, 10.2, 1.4, 50, 0.1), (STAGE0, 10.3, 1.8, 50, 0.1),  # one loss, three requests
        (STAGE1, 10.1, 0.7, 50, 0.1),  # another stage lost at the same moment: its own group
        (STAGE0, 30.0, 0.8, 50, 0.1),  # stage 0's replacement lost later: alone
    ]
    groups = _by_requests_rebuilt_together(kept, window_s=1.5)
    assert set(groups) == {"1", "3"}
    assert groups["3"]["n"] == 3 and groups["3"]["max"] == 1.8
    assert groups["1"]["n"] == 2 and groups["1"]["max"] == 0.8


def test_no_replays_no_groups():
    assert _by_requests_rebuilt_together([], window_s=1.5) == {}


def test_a_replay_is_compared_with_a_restart_of_as_many_requests_at_once():
    from splitnet.bench.chaos import _burst_figures

    burst = [(20, 0.3), (60, 0.5), (100, 0.7)]  # seconds = 0.2 + 0.005 * tokens
    samples = {"replays_with_together": [[3, [60, 0.25]], [3, [300, 0.7]], [1, [60, 9.0]]]}
    fig = _burst_figures(burst, 3, samples)
    assert fig["requests_at_once"] == 3
    assert fig["fit_s"] == [0.2, 0.005]
    # 0.25 / 0.5 and 0.7 / 0.7 (a context past the burst's longest prompt is held there); the
    # replay that resumed alone is not compared with a burst of three
    assert fig["replay_over_restart"]["n"] == 2 and fig["replay_over_restart"]["max"] == 1.0
    assert fig["replay_over_restart"]["p50"] == 0.75  # statistics.median of two
    assert _burst_figures([], 3, samples) is None
