"""Batch messages (splitnet.wire.batches, BatchHeader): round trips through the wire, and every
refusal of a malformed batch, before anything is split."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from splitnet.errors import ProtocolError
from splitnet.wire import Message, decode_message, encode_message
from splitnet.wire.batches import batch_message, member_shares, split_batch
from splitnet.wire.headers import BATCH_HEADER_VERSION, MAX_BATCH_MEMBERS, MAX_TRACE, BatchHeader, BatchMember, ForwardHeader

KEY = "rq:rAELpZqL*+#Vn!9sGhf7:Wr>I&sS*5Hx^/N6w"  # 40 Z85 characters
ROUTE = ("tcp://127.0.0.1:5002",)


def _header(pos: int, **kw) -> ForwardHeader:
    return ForwardHeader(reply_to="peer:" + "ab" * 16, route=ROUTE, route_keys=(KEY,), cache=True, pos=pos, head="argmax",
                         batch_messages=True, **kw)


def _wire(msg: Message) -> Message:
    return decode_message([bytes(f) for f in encode_message(msg)])


def _forward_batch(n: int = 3) -> Message:
    members = [BatchMember(f"r{i}", 4 + i, 2, 1, header=_header(10 + i, origin=KEY if i == 1 else None)) for i in range(n)]
    hidden = np.arange(n * 2 * 3, dtype=np.float32).reshape(n, 2, 3)
    return batch_message("forward_batch", members, {"hidden": hidden})


def test_a_forward_batch_round_trips_and_splits_into_the_messages_each_member_would_send():
    header, parts = split_batch(_wire(_forward_batch()))
    assert [m.req for m in header.members] == ["r0", "r1", "r2"] and header.total_rows == 3
    hidden = np.arange(18, dtype=np.float32).reshape(3, 2, 3)
    for i, part in enumerate(parts):
        assert (part.kind, part.req, part.seq, part.epoch) == ("forward", f"r{i}", 4 + i, 2)
        assert np.array_equal(part.tensors["hidden"], hidden[i:i + 1])
        h = ForwardHeader.from_meta(part.meta)  # each member is a whole forward header, route merged in
        assert h == _header(10 + i, origin=KEY if i == 1 else None)


def test_the_wire_form_holds_the_route_once_and_each_member_without_it():
    meta = _forward_batch().meta
    assert meta["bv"] == BATCH_HEADER_VERSION and meta["route"] == list(ROUTE) and meta["route_keys"] == [KEY]
    assert all("route" not in m[4] and "hv" not in m[4] for m in meta["members"])


def test_a_result_batch_splits_rows_and_gives_shared_tensors_whole():
    members = [BatchMember("a", 0, 1, 2, trace=({"stage": 1},)), BatchMember("b", 3, 1, 1)]
    msg = batch_message("result_batch", members, {"argmax": np.asarray([[5], [6], [7]]), "vocab": np.asarray([257])}, shared=["vocab"])
    header, parts = split_batch(_wire(msg))
    assert [(p.kind, p.req, p.seq, p.epoch) for p in parts] == [("result", "a", 0, 1), ("result", "b", 3, 1)]
    assert parts[0].tensors["argmax"].tolist() == [[5], [6]] and parts[1].tensors["argmax"].tolist() == [[7]]
    assert all(p.tensors["vocab"].tolist() == [257] for p in parts)
    assert parts[0].meta == {"trace": [{"stage": 1}]} and parts[1].meta == {"trace": []}
    assert member_shares([m.rows for m in header.members], 1001) == [667, 334]


def test_bf16_bit_patterns_keep_their_dtype_when_split():
    members = [BatchMember("a", 0, 0, 1, header=_header(0)), BatchMember("b", 0, 0, 1, header=_header(0))]
    msg = Message(**{**batch_message("forward_batch", members, {"hidden": np.zeros((2, 1, 4), np.uint16)})._asdict(), "dtypes": {"hidden": "bf16"}})
    _, parts = split_batch(_wire(msg))
    assert all(p.dtypes["hidden"] == "bf16" for p in parts)


def _meta_with(edit) -> dict:
    meta = copy.deepcopy(_forward_batch().meta)
    edit(meta)
    return meta


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _member(i, value):
    return lambda m: m["members"].__setitem__(i, value)


def _member_field(key, value):
    return lambda m: m["members"][0][4].__setitem__(key, value)


@pytest.mark.parametrize("edit,match", [
    (_set("bv", 2), "version"),
    (_set("bv", "1"), "version"),
    (lambda m: m.pop("bv"), "version"),
    (_set("extra", 1), "unknown keys"),
    (_set("members", "x"), "meta.members"),
    (_set("members", []), "meta.members"),
    (_member(0, ["r0", 4, 2, 1]), "member 0"),
    (_member(0, ["r0", 4, 2, 1, "fields"]), "member 0"),
    (_member(0, ["", 4, 2, 1, {"reply_to": "tcp://x:1"}]), "non-empty string"),
    (_member(0, ["r0", "4", 2, 1, {"reply_to": "tcp://x:1"}]), "seq"),
    (_member(0, ["r0", 4, 2, 0, {"reply_to": "tcp://x:1"}]), "rows"),
    (_member(0, ["r0", 4, 2, True, {"reply_to": "tcp://x:1"}]), "rows"),
    (_member(0, ["r1", 5, 2, 1, {"reply_to": "tcp://x:1"}]), "twice"),
    (_member_field("route", ["tcp://elsewhere:1"]), "holds"),  # a member may not bring its own route
    (_member_field("route_keys", [KEY]), "holds"),
    (_member_field("codecs", {}), "codec"),
    (_member_field("packed_tokens", True), "codec"),
    (_member_field("hv", 1), "holds"),
    (_member_field("pos", -1), "meta.pos"),  # each member's header is checked as a forward's own
    (_member_field("origin", "not a key"), "origin"),
    (_member_field("surprise", 1), "unknown keys"),
    (_member_field("reply_to", "http://x"), "reply_to"),
    (_set("route", "tcp://y:1"), "meta.route"),
    (_set("shared", "vocab"), "shared"),
    (_set("shared", ["vocab"]), "does not carry"),
    (_set("shared", ["hidden", "hidden"]), "distinct"),
])
def test_malformed_forward_batches_are_refused_before_anything_is_split(edit, match):
    msg = _forward_batch()
    bad = Message(msg.kind, msg.req, msg.seq, msg.epoch, msg.tensors, _meta_with(edit))
    with pytest.raises(ProtocolError, match=match):
        split_batch(_wire(bad))


def test_too_many_members_are_refused():
    msg = _forward_batch()
    meta = copy.deepcopy(msg.meta)
    meta["members"] = [[f"r{i}", 0, 0, 1, {"reply_to": "tcp://x:1"}] for i in range(MAX_BATCH_MEMBERS + 1)]
    with pytest.raises(ProtocolError, match="members"):
        BatchHeader.from_meta("forward_batch", meta)


@pytest.mark.parametrize("tensors,match", [
    ({"hidden": np.zeros((2, 2, 3), np.float32)}, "3 rows"),  # fewer rows than the members hold
    ({"hidden": np.zeros((4, 2, 3), np.float32)}, "3 rows"),
    ({"hidden": np.zeros((3, 2, 3), np.float32), "x": np.array(1.0, np.float32)}, "rows"),  # a scalar cannot be split
])
def test_tensors_must_hold_exactly_the_members_rows(tensors, match):
    meta = _forward_batch().meta
    with pytest.raises(ProtocolError, match=match):
        split_batch(_wire(Message("forward_batch", "", 0, 0, tensors, meta)))


@pytest.mark.parametrize("fields,match", [
    ({"trace": "x"}, "trace"),
    ({"trace": [{}] * (MAX_TRACE + 1)}, "trace"),
    ({"reply_to": "tcp://x:1"}, "unknown fields"),  # a result member carries its trace only
])
def test_malformed_result_batches_are_refused(fields, match):
    meta = {"bv": 1, "members": [["a", 0, 0, 1, fields]]}
    with pytest.raises(ProtocolError, match=match):
        split_batch(_wire(Message("result_batch", "", 0, 0, {"argmax": np.zeros((1, 1), np.int64)}, meta)))


def test_a_result_batch_refuses_forward_only_keys_and_other_kinds_are_not_batches():
    with pytest.raises(ProtocolError, match="unknown keys"):
        BatchHeader.from_meta("result_batch", {"bv": 1, "route": [], "members": [["a", 0, 0, 1, {}]]})
    with pytest.raises(ProtocolError, match="not a batch"):
        split_batch(Message("forward", "a"))


def test_the_sender_cannot_build_a_batch_of_two_routes_or_wrong_rows():
    a = BatchMember("a", 0, 0, 1, header=_header(0))
    b = BatchMember("b", 0, 0, 1, header=ForwardHeader(reply_to="tcp://x:1", route=("tcp://other:1",)))
    with pytest.raises(ProtocolError, match="route is the same"):
        batch_message("forward_batch", [a, b], {"input_ids": np.zeros((2, 1), np.int64)})
    with pytest.raises(ValueError, match="rows"):
        batch_message("forward_batch", [a], {"input_ids": np.zeros((2, 1), np.int64)})
    coded = BatchMember("c", 0, 0, 1, header=ForwardHeader(reply_to="tcp://x:1", route=ROUTE, route_keys=(KEY,), codecs={"hidden": {}}))
    with pytest.raises(ProtocolError, match="raw tensors"):
        BatchHeader("forward_batch", (coded,))


def test_mutated_batch_headers_raise_only_protocol_errors():
    """Seeded mutations of valid forward and result batch headers: every one is accepted or
    refused with ProtocolError, never another exception (a stage answers those as typed errors)."""
    import random

    rng = random.Random(16)
    values = [None, True, 0, -1, 2**40, 1.5, "", "x", "tcp://a:1", KEY, [], [1], ["x"], {}, {"a": 1}, [[]], [["r", 0, 0, 1, {}]], b"\x00"]
    keys = ["bv", "members", "shared", "route", "x", "trace", "pos", "hv", "codecs", "mask_len", "upstream_batch", "route_keys", "reply_to"]

    def mutate(o):
        if isinstance(o, dict):
            o, r = dict(o), rng.random()
            if r < 0.4 and o:
                k = rng.choice(list(o))
                o[k] = mutate(o[k])
            elif r < 0.6 and o:
                del o[rng.choice(list(o))]
            else:
                o[rng.choice(keys)] = rng.choice(values)
            return o
        if isinstance(o, list):
            o = list(o)
            if o and rng.random() < 0.6:
                i = rng.randrange(len(o))
                o[i] = mutate(o[i])
            elif rng.random() < 0.5:
                o.append(rng.choice(values))
            elif o:
                o.pop()
            return o
        return rng.choice(values) if rng.random() < 0.7 else o

    forward = _forward_batch()
    result = batch_message("result_batch", [BatchMember("a", 0, 0, 2, trace=({"s": 1},)), BatchMember("b", 0, 0, 1)],
                           {"argmax": np.zeros((3, 1), np.int64), "vocab": np.zeros(1, np.int64)}, shared=["vocab"])
    for trial in range(3000):
        base = forward if trial % 2 else result
        meta = copy.deepcopy(dict(base.meta))
        for _ in range(rng.randint(1, 4)):
            meta = mutate(meta)
        try:
            split_batch(Message(base.kind, "", 0, 0, base.tensors, meta))
        except ProtocolError:
            pass


def test_a_member_built_with_the_meta_its_header_was_read_from_writes_the_same_batch():
    """The sender's path (batch_member with meta: the map written as it is) and the header's own
    to_meta give batches a receiver reads as the same headers."""
    from splitnet.wire.headers import batch_member

    metas = [{**_header(10 + i).to_meta(), "trace": [{"stage": 0, "batch": 3}]} for i in range(3)]
    headers = [ForwardHeader.from_meta(m) for m in metas]
    by_meta = BatchHeader("forward_batch", tuple(batch_member(f"r{i}", i, 0, 1, h, (), m) for i, (h, m) in enumerate(zip(headers, metas))))
    by_header = BatchHeader("forward_batch", tuple(BatchMember(f"r{i}", i, 0, 1, header=h) for i, h in enumerate(headers)))
    assert by_meta.to_meta() == by_header.to_meta()
    assert all("hv" not in m[4] and "route" not in m[4] for m in by_meta.to_meta()["members"])
    got = BatchHeader.from_meta("forward_batch", by_meta.to_meta())
    assert [m.header for m in got.members] == headers


@pytest.mark.parametrize("step", [["", 0, 0, 1], ["r", True, 0, 1], ["r", 0, 1.0, 1], ["r", 0, 0, 0], [7, 0, 0, 1], ["r", 0, 0, False]])
def test_from_meta_refuses_bad_step_fields_as_the_constructor_does(step):
    """from_meta does not run __post_init__ a second time: its own checks must refuse what it refuses."""
    meta = copy.deepcopy(_forward_batch().meta)
    meta["members"][1][:4] = step
    with pytest.raises(ProtocolError, match="each batch member"):
        BatchHeader.from_meta("forward_batch", meta)
    fields = meta["members"][1][4]
    with pytest.raises(ProtocolError):
        BatchHeader("forward_batch", (BatchMember(*step, header=ForwardHeader.from_meta({**fields, "route": list(ROUTE), "route_keys": [KEY]})),))


def test_a_header_read_from_the_wire_equals_one_built_from_its_members():
    msg = _forward_batch(4)
    got = BatchHeader.from_meta("forward_batch", msg.meta)
    assert got == BatchHeader("forward_batch", got.members, got.shared)
