"""ForwardHeader: the declared meta of a forward message (round trip, versions, types)."""

from __future__ import annotations

import msgpack
import pytest

from splitnet.errors import ProtocolError
from splitnet.wire import Message, decode_message, encode_message
from splitnet.wire.headers import FORWARD_HEADER_VERSION, ForwardHeader

KEY = "rq:rAELpZqL*+#Vn!9sGhf7:Wr>I&sS*5Hx^/N6w"  # 40 Z85 characters


def test_round_trip_through_the_wire():
    h = ForwardHeader(reply_to="peer:" + "ab" * 16, route=("tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"), route_keys=(KEY, KEY),
                      cache=True, pos=7, rewind=True, want_result=False, all_logits=True, head="topk", top_k=40)
    frames = encode_message(Message(kind="forward", req="r", seq=2, epoch=3, meta=h.to_meta()))
    got = decode_message([bytes(f) for f in frames])
    assert ForwardHeader.from_meta(got.meta) == h


def test_defaults_are_left_out_and_a_header_without_version_is_version_1():
    meta = ForwardHeader(reply_to="tcp://127.0.0.1:9").to_meta()
    assert meta == {"hv": FORWARD_HEADER_VERSION, "reply_to": "tcp://127.0.0.1:9", "route": []}
    assert ForwardHeader.from_meta({"reply_to": "tcp://127.0.0.1:9", "cache": True}).cache is True


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_unknown_versions_are_refused(version):
    with pytest.raises(ProtocolError, match="version"):
        ForwardHeader.from_meta({"hv": version, "reply_to": "tcp://127.0.0.1:9"})


@pytest.mark.parametrize("meta,match", [
    ({"reply_to": "tcp://x:1", "pos": "3"}, "meta.pos"),
    ({"reply_to": "tcp://x:1", "pos": -1}, "meta.pos"),
    ({"reply_to": "tcp://x:1", "pos": True}, "meta.pos"),  # a bool is not a position
    ({"reply_to": "tcp://x:1", "cache": 1}, "meta.cache"),
    ({"reply_to": "tcp://x:1", "want_result": "yes"}, "meta.want_result"),
    ({"reply_to": "tcp://x:1", "head": "softmax"}, "meta.head"),
    ({"reply_to": "tcp://x:1", "head": "topk"}, "top_k"),
    ({"reply_to": "tcp://x:1", "head": "topk", "top_k": 5000}, "top_k"),
    ({"reply_to": "tcp://x:1", "route": "tcp://y:2"}, "meta.route"),
    ({"reply_to": "tcp://x:1", "route": ["http://y:2"]}, "meta.route"),
    ({"reply_to": "tcp://x:1", "route": ["tcp://y:2"], "route_keys": [KEY, KEY]}, "route_keys"),
    ({"reply_to": "tcp://x:1", "route": ["tcp://y:2"], "route_keys": ["short"]}, "Z85"),
    ({"reply_to": "http://x:1"}, "reply_to"),
    ({"reply_to": "peer:XYZ"}, "reply_to"),
    ({}, "reply_to"),
    ({"reply_to": "tcp://x:1", "upstream_batch": [1]}, "upstream_batch"),
    ({"reply_to": "tcp://x:1", "codecs": [1, 2]}, "codecs"),
    ({"reply_to": "tcp://x:1", "cahce": True}, "unknown keys"),
])
def test_bad_fields_are_protocol_errors_naming_the_field(meta, match):
    with pytest.raises(ProtocolError, match=match):
        ForwardHeader.from_meta(meta)


def test_meta_must_be_a_map():
    with pytest.raises(ProtocolError, match="map"):
        ForwardHeader.from_meta([("reply_to", "tcp://x:1")])


def test_building_a_bad_header_fails_on_the_client_too():
    with pytest.raises(ProtocolError, match="meta.pos"):
        ForwardHeader(reply_to="tcp://x:1", pos=-3)


def test_what_stages_add_is_part_of_the_schema():
    meta = {"reply_to": "tcp://x:1", "trace": [{"stage": 0, "in_bytes": 10}], "origin": "", "upstream_batch": [4, 2],
            "reply_key": KEY, "packed_tokens": True, "mask_len": 9, "codecs": {"hidden": {}}}
    h = ForwardHeader.from_meta(msgpack.unpackb(msgpack.packb(meta)))
    assert h.upstream_batch == (4, 2) and h.trace[0]["stage"] == 0 and h.mask_len == 9
