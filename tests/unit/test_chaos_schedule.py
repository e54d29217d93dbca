"""The chaos bench's fault schedule: ``--kinds`` narrows it, unknown kinds are refused up front."""

from __future__ import annotations

import random

import pytest

from splitnet.bench.chaos import _schedule, parse_kinds
from splitnet.errors import ConfigError


def test_only_the_kinds_asked_for_are_scheduled():
    kinds = _schedule(random.Random(1), 40, False, ["restart_same_endpoint", "kill_two"])
    assert set(kinds) == {"restart_same_endpoint", "kill_two"} and len(kinds) == 40
    assert len(set(_schedule(random.Random(1), 200, False))) > 5  # no --kinds: every kind


def test_an_unknown_kind_is_refused_naming_the_known_ones():
    assert parse_kinds(" kill_two, cut ") == ["kill_two", "cut"]
    assert parse_kinds("") == []
    with pytest.raises(ConfigError, match="restart_same_endpoint"):
        parse_kinds("kill_two,restart")


def test_the_device_is_checked_before_any_work():
    import torch

    from splitnet.bench.chaos import check_device

    assert check_device("cpu") == {"device": "cpu"}
    for bad in ("gpu", "cuda:x", "cpu:0"):
        with pytest.raises(ConfigError, match="cpu, cuda or cuda:N"):
            check_device(bad)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"has {n} CUDA device"):
        check_device(f"cuda:{n}")  # one past the last present index
