"""SentLog (what a stage sent on per request) and the resume fields of a forward header."""

from __future__ import annotations

import pytest
import torch

from splitnet.errors import ProtocolError
from splitnet.runtime.sent_log import SentLog
from splitnet.wire.headers import ForwardHeader


def _h(t: int, start: float = 0.0) -> dict:
    return {"hidden": torch.arange(t * 4, dtype=torch.float32).view(1, t, 4) + start}


def test_chunks_cover_the_positions_in_order_and_truncate_cuts_back():
    log = SentLog(max_bytes=1 << 20)
    log.append("a", 0, _h(5))
    log.append("a", 5, _h(1, 100))
    log.append("a", 6, _h(1, 200))
    assert log.end("a") == 7
    chunks = log.chunks("a", 6, max_tokens=4)
    assert [p for p, _ in chunks] == [0, 4]
    whole = torch.cat([c["hidden"] for _, c in chunks], dim=1)
    assert whole.shape == (1, 6, 4) and torch.equal(whole[:, :5], _h(5)["hidden"]) and torch.equal(whole[:, 5:], _h(1, 100)["hidden"])
    assert log.chunks("a", 8, 4) is None  # not covered: the caller falls back to a replay
    log.truncate("a", 3)  # a rewind into the first entry
    assert log.end("a") == 3 and log.total_bytes == 3 * 4 * 4
    log.append("a", 3, _h(2))
    assert log.end("a") == 5


def test_a_gap_or_a_non_sequence_drops_the_log_and_rename_moves_it():
    log = SentLog(max_bytes=1 << 20)
    log.append("a", 0, _h(3))
    log.append("a", 4, _h(1))  # does not continue at 3
    assert log.end("a") == 0 and len(log) == 0 and log.total_bytes == 0
    log.append("b", 0, {"hidden": torch.zeros(2, 3, 4)})  # two sequences: not a request's log
    assert log.end("b") == 0
    log.append("c", 0, _h(3))
    log.rename("c", "d")
    assert log.end("c") == 0 and log.end("d") == 3 and log.total_bytes == 3 * 16


def test_memory_is_bounded_least_recently_used_first():
    log = SentLog(max_bytes=3 * 16 * 2)  # two requests of 3 positions
    log.append("a", 0, _h(3))
    log.append("b", 0, _h(3))
    log.append("a", 3, _h(1))  # a is touched last: b goes first when c comes
    log.append("c", 0, _h(2))
    assert log.end("b") == 0 and log.end("a") == 4 and log.end("c") == 2
    assert log.total_bytes <= log.max_bytes
    off = SentLog(max_bytes=0)
    off.append("a", 0, _h(3))
    assert off.end("a") == 0


def test_header_resume_fields_are_checked():
    h = ForwardHeader.from_meta({"reply_to": "tcp://127.0.0.1:5", "route": [], "resume_from": "abc", "refill": [0, 2]})
    assert h.resume_from == "abc" and h.refill == (0, 2)
    assert ForwardHeader.from_meta(h.to_meta()) == h
    for bad in ({"resume_from": ""}, {"resume_from": 5}, {"resume_from": "x" * 65}, {"refill": [2, 1]}, {"refill": [1, 1]},
                {"refill": [-1]}, {"refill": [True]}, {"refill": "01"}):
        with pytest.raises(ProtocolError):
            ForwardHeader.from_meta({"reply_to": "tcp://127.0.0.1:5", "route": [], **bad})
