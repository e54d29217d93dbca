"""Property tests: the frame decoder answers any input with a Message or a typed SplitnetError."""

from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitnet.bench.hardening import _FUZZ_LIMITS, fuzz_decoder, fuzz_input
from splitnet.errors import LimitExceeded, ProtocolError, SplitnetError
from splitnet.wire import Message, decode_message, encode_message

pytestmark = pytest.mark.timeout(60)

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(), st.text(max_size=20), st.binary(max_size=20))
_objs = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=8), c, max_size=5)), max_leaves=20)


def _decode_or_typed(frames):
    try:
        return decode_message(frames, _FUZZ_LIMITS)
    except SplitnetError:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_random_frames_never_crash(frames):
    _decode_or_typed(frames)


@settings(max_examples=300, deadline=None)
@given(_objs, st.lists(st.binary(max_size=64), max_size=3))
def test_random_msgpack_header_never_crashes(obj, rest):
    _decode_or_typed([msgpack.packb(obj, use_bin_type=True), *rest])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["name", "dtype", "shape", "nbytes"]), _objs)
def test_mutated_descriptor_is_typed(field, value):
    frames = encode_message(Message(kind="forward", tensors={"x": np.zeros((2, 3), np.float32)}))
    h = msgpack.unpackb(frames[0], raw=False)
    h["tensors"][0][field] = value
    _decode_or_typed([msgpack.packb(h, use_bin_type=True), bytes(frames[1])])


def test_seeded_mutation_corpus_has_no_crash():
    counts = fuzz_decoder(3000, seed=1)
    assert counts["crashes"] == 0, counts["crash_examples"]
    assert counts["typed_errors"] > 1000


@pytest.mark.parametrize(
    "frames, exc",
    [
        ([b"\x00" * (_FUZZ_LIMITS.max_header_bytes + 1)], LimitExceeded),
        ([msgpack.packb({"v": 1, "kind": "forward", "req": "", "seq": 0, "epoch": 0, "tensors": [{}] * 17})], LimitExceeded),
        ([msgpack.packb({"v": 1, "kind": "forward", "req": "", "seq": 0, "epoch": 0,
                         "tensors": [{"name": "x", "dtype": "f32", "shape": [2**20, 2**20], "nbytes": 2**42}]}), b""], LimitExceeded),
        ([msgpack.packb({"v": 9, "kind": "ping"})], ProtocolError),
        ([], ProtocolError),
    ],
)
def test_each_limit_has_a_typed_error(frames, exc):
    with pytest.raises(exc):
        decode_message(frames, _FUZZ_LIMITS)


_ATHERIS = """
import sys, atheris
with atheris.instrument_imports():
    from splitnet.wire.message import decode_message
from splitnet.errors import SplitnetError
from splitnet.bench.hardening import _FUZZ_LIMITS

def one(data):
    fdp = atheris.FuzzedDataProvider(data)
    frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)) for _ in range(fdp.ConsumeIntInRange(1, 4))]
    try:
        decode_message(frames, _FUZZ_LIMITS)
    except SplitnetError:
        pass

atheris.Setup([sys.argv[0], "-runs=20000", "-seed=1", "-max_len=2048"], one)
atheris.Fuzz()
"""


def test_atheris_coverage_guided_decoder():
    pytest.importorskip("atheris")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _ATHERIS], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr[-3000:]  # atheris exits non-zero on an uncaught exception
    assert "Done 20000 runs" in r.stderr


def test_fuzz_input_is_deterministic():
    a = [fuzz_input(random.Random(3)) for _ in range(5)]
    b = [fuzz_input(random.Random(3)) for _ in range(5)]
    assert a == b
