"""ForwardHeader.from_meta_like (the batch members' fast path) accepts and refuses exactly what
from_meta does, and gives equal headers."""

from __future__ import annotations

import random

import pytest

from splitnet.errors import ProtocolError
from splitnet.wire.headers import BatchHeader, BatchMember, ForwardHeader

FIRST = ForwardHeader(reply_to="tcp://127.0.0.1:5555", route=("tcp://127.0.0.1:5556",), cache=True, pos=7, head="argmax",
                      batch_messages=True, trace=({"stage": 0},))
FIRST_META = FIRST.to_meta()

BAD_VALUES = [None, 1, 0, -1, 2**40, True, False, "x", "", [], [1], {}, {"a": 1}, 1.5, float("nan"), b"raw", "tcp://x", ["tcp://x"]]


def _same(meta: dict) -> None:
    try:
        want = ForwardHeader.from_meta(meta)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            ForwardHeader.from_meta_like(meta, FIRST, FIRST_META)
        return
    got = ForwardHeader.from_meta_like(meta, FIRST, FIRST_META)
    assert got == want and got.__dict__ == want.__dict__


def test_a_sibling_differing_in_its_step_fields_equals_from_meta():
    meta = {**FIRST_META, "pos": 9, "final": True, "want_result": False, "rewind": True, "trace": [{"stage": 0}, {"stage": 1}]}
    got = ForwardHeader.from_meta_like(meta, FIRST, FIRST_META)
    assert got == ForwardHeader.from_meta(meta)
    assert got.pos == 9 and got.final and got.trace == ({"stage": 0}, {"stage": 1}) and got.route == FIRST.route


@pytest.mark.parametrize("key", ["pos", "final", "want_result", "rewind", "trace", "cache", "head", "top_k", "reply_to", "origin",
                                 "all_logits", "batch_messages", "mask_len", "route", "hv", "unknown_key"])
@pytest.mark.parametrize("value", BAD_VALUES)
def test_every_field_set_to_any_value_is_judged_as_from_meta_judges_it(key, value):
    _same({**FIRST_META, key: value})


def test_a_sibling_with_an_int_where_the_first_has_a_bool_is_refused():
    with pytest.raises(ProtocolError, match="cache"):
        ForwardHeader.from_meta_like({**FIRST_META, "cache": 1}, FIRST, FIRST_META)  # 1 == True, but not a flag


def test_seeded_mutations_agree_with_from_meta():
    rng = random.Random(5)
    keys = list(FIRST_META) + ["pos", "final", "trace", "want_result", "rewind", "top_k", "reply_key", "nope"]
    for _ in range(3000):
        meta = dict(FIRST_META)
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(keys)
            if rng.random() < 0.2:
                meta.pop(k, None)
            else:
                meta[k] = rng.choice(BAD_VALUES + [7, 0, True, False, [{"stage": 0}], "logits", "topk"])
        _same(meta)


def test_a_batch_header_refuses_a_bad_later_member():
    members = [BatchMember(f"r{i}", 1, 0, 1, header=FIRST) for i in range(4)]
    meta = BatchHeader("forward_batch", tuple(members)).to_meta()
    assert len(BatchHeader.from_meta("forward_batch", meta).members) == 4
    for key, value in [("pos", -1), ("final", 1), ("trace", "x"), ("cache", 1), ("head", "nope"), ("reply_to", "udp://x")]:
        bad = {**meta, "members": [list(m) for m in meta["members"]]}
        bad["members"][3] = [*bad["members"][3][:4], {**bad["members"][3][4], key: value}]
        with pytest.raises(ProtocolError):
            BatchHeader.from_meta("forward_batch", bad)
