"""Wire messages: a msgpack header frame followed by raw tensor frames.

Frame 0 is a msgpack map::

    {"v": 1, "kind": "forward", "req": "a1b2", "seq": 0, "epoch": 0,
     "tensors": [{"name": "hidden", "dtype": "f32", "shape": [1, 7, 384], "nbytes": 10752}, ...],
     "meta": {...}}

Frames 1..n are the tensors' raw little-endian buffers, in descriptor order, sent without copying.
:func:`decode_message` checks the version, the kind, the frame count, every dtype against the
allow-list, every byte count against its shape and every size against :class:`WireLimits` before
it touches a buffer, and raises :class:`ProtocolError` (or :class:`LimitExceeded`) otherwise.
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Sequence

import msgpack
import numpy as np

from splitnet.errors import LimitExceeded, ProtocolError
from splitnet.wire.dtypes import WIRE_DTYPES, wire_name_of_numpy, wire_name_of_torch
from splitnet.wire.limits import DEFAULT_LIMITS, WireLimits

PROTOCOL_VERSION = 1

KINDS = frozenset(
    {
        "forward",  # activations for a stage (client -> stage 0, stage i -> stage i+1)
        "result",  # output of the last stage (last stage -> client)
        "forward_batch",  # forwards of many requests in one message (splitnet.wire.batches)
        "result_batch",  # results of many of one client's requests in one message
        "error",  # a typed error as data
        "ping",  # liveness probe; answered with "pong"
        "pong",
        "info",  # ask a stage what it serves; answered with "info_reply"
        "info_reply",
        "release",  # drop the KV cache of a request
        "ack",
    }
)


_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Message(NamedTuple):
    """A decoded (or to-be-encoded) wire message; immutable.

    ``tensors`` maps names to numpy arrays; for received messages they are zero-copy, read-only
    views of the frames. bfloat16 tensors are held as their uint16 bit patterns with
    ``dtypes[name] == "bf16"``; :meth:`torch` views them as ``torch.bfloat16``.
    (A NamedTuple rather than a frozen dataclass: it is built on every message, and this is
    several times cheaper.)
    """

    kind: str
    req: str = ""
    seq: int = 0
    epoch: int = 0
    tensors: Mapping[str, Any] = _EMPTY
    meta: Mapping[str, Any] = _EMPTY
    dtypes: Mapping[str, str] = _EMPTY

    def torch(self, name: str):
        """The tensor ``name`` as a torch tensor (zero-copy where the buffer allows)."""
        import torch

        arr = self.tensors[name]
        if isinstance(arr, torch.Tensor):
            return arr
        if not arr.flags.writeable:
            arr = arr.copy()  # torch wants writable memory; received frames are read-only
        t = torch.from_numpy(arr)
        if self.dtypes.get(name) == "bf16":
            t = t.view(torch.bfloat16)
        return t


_NUMPY_WIRE_CACHE: dict[np.dtype, str] = {}


def _numpy_buffer(arr: np.ndarray) -> tuple[str, tuple[int, ...], Any]:
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)  # the only copy: non-contiguous inputs
    dt = arr.dtype
    name = _NUMPY_WIRE_CACHE.get(dt)
    if name is None:
        if dt.byteorder == ">":
            arr = arr.astype(dt.newbyteorder("<"))
        name = wire_name_of_numpy(arr.dtype)
        if dt.byteorder != ">":
            _NUMPY_WIRE_CACHE[dt] = name
    if not arr.size:
        return name, arr.shape, b""
    return name, arr.shape, arr if arr.ndim else arr.reshape(1)  # the array itself is the frame (buffer protocol)


def _as_buffer(value: Any) -> tuple[str, tuple[int, ...], Any]:
    """(wire dtype, shape, contiguous buffer) of a numpy array or torch tensor, copying only if
    the input is not C-contiguous (or not in host memory)."""
    if isinstance(value, np.ndarray):
        return _numpy_buffer(value)
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot send {type(value).__name__} as a tensor")
        name = wire_name_of_torch(value.dtype)
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        shape = tuple(t.shape)
        if t.numel() == 0:
            return name, shape, memoryview(b"")
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        arr = t.numpy().reshape(-1).view(np.uint8)
        return name, shape, memoryview(arr)
    raise TypeError(f"cannot send {type(value).__name__} as a tensor; use a numpy array or torch tensor")


_LOCAL = threading.local()  # one Packer per thread: a Packer holds a buffer and is not thread-safe


def _pack_header(header: dict) -> bytes:
    packer = getattr(_LOCAL, "packer", None)
    if packer is None:
        packer = _LOCAL.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    try:
        return packer.pack(header)
    except BaseException:
        packer.reset()  # a failed pack may leave partial bytes in the buffer
        raise


def encode_message(msg: Message) -> list[Any]:
    """Frames of ``msg``: [header bytes, buffer, buffer, ...]. Buffers are not copied."""
    if msg.kind not in KINDS:
        raise ValueError(f"unknown message kind {msg.kind!r}; known: {sorted(KINDS)}")
    descs = []
    frames: list[Any] = [b""]
    bf16 = msg.dtypes
    for name, value in msg.tensors.items():
        dtype, shape, buf = _as_buffer(value)
        if dtype == "u16" and bf16 and bf16.get(name) == "bf16":
            dtype = "bf16"
        descs.append({"name": name, "dtype": dtype, "shape": list(shape), "nbytes": buf.nbytes if type(buf) is not bytes else 0})
        frames.append(buf)
    try:
        frames[0] = _pack_header(
        {
            "v": PROTOCOL_VERSION,
            "kind": msg.kind,
            "req": msg.req,
            "seq": int(msg.seq),
            "epoch": int(msg.epoch),
            "tensors": descs,
            "meta": msg.meta if type(msg.meta) is dict else dict(msg.meta),
        }
        )
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"message header cannot be encoded (meta must hold only str, int64, float, bool, None, lists and maps): {e}") from e
    return frames


def message_nbytes(frames: Sequence[Any]) -> int:
    """Bytes a list of frames puts on the socket (payload bytes, before ZMTP framing)."""
    total = 0
    for f in frames:
        n = getattr(f, "nbytes", None)  # memoryview, numpy array
        total += n if n is not None else len(f)
    return total


def _unpack_header(raw: bytes, limits: WireLimits) -> dict:
    if len(raw) > limits.max_header_bytes:
        raise LimitExceeded(
            f"header frame is {len(raw)} bytes, over the limit of {limits.max_header_bytes}"
        )
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_str_len,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"header frame is not valid msgpack within limits: {e}") from e
    except Exception as e:  # msgpack raises a few other types on hostile input
        raise ProtocolError(f"header frame could not be decoded: {type(e).__name__}: {e}") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def _bad_field(header: dict, key: str) -> ProtocolError:
    if key not in header:
        return ProtocolError(f"header lacks the field {key!r}")
    return ProtocolError(f"header field {key!r} has type {type(header[key]).__name__}")


def decode_header(raw: bytes, limits: WireLimits = DEFAULT_LIMITS) -> dict:
    """Parse and validate frame 0 alone (version, kind and field types)."""
    header = _unpack_header(raw, limits)
    v = header.get("v")
    if v != PROTOCOL_VERSION or type(v) is not int:
        raise ProtocolError(
            f"protocol version {v!r} is not supported (this side speaks {PROTOCOL_VERSION}); "
            "upgrade splitnet on both ends to the same release"
        )
    kind = header.get("kind")
    if type(kind) is not str:
        raise _bad_field(header, "kind")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if type(header.get("req")) is not str:
        raise _bad_field(header, "req")
    if type(header.get("seq")) is not int:
        raise _bad_field(header, "seq")
    if type(header.get("epoch")) is not int:
        raise _bad_field(header, "epoch")
    if type(header.get("tensors")) is not list:
        raise _bad_field(header, "tensors")
    meta = header.get("meta", {})
    if type(meta) is not dict:
        raise ProtocolError("header field 'meta' must be a map")
    header["meta"] = meta
    return header


def _frame_buffer(f: Any) -> memoryview:
    buf = getattr(f, "buffer", None)  # zmq.Frame from recv_multipart(copy=False)
    return buf if buf is not None else memoryview(f)


def tensor_spec(name: str, dtype: Any, shape: Any, limits: WireLimits = DEFAULT_LIMITS) -> tuple[np.dtype, int]:
    """(numpy dtype, byte count) of a tensor a peer describes by wire dtype and shape, checked
    against the allow-list and ``limits``; ProtocolError (or LimitExceeded) otherwise."""
    np_dtype = WIRE_DTYPES.get(dtype) if type(dtype) is str else None
    if np_dtype is None:
        raise ProtocolError(
            f"tensor {name!r} has dtype {dtype!r}, which is not on the allow-list {sorted(WIRE_DTYPES)}"
        )
    if type(shape) is not list or len(shape) > limits.max_ndim:
        raise ProtocolError(f"tensor {name!r} has an invalid shape {shape!r}")
    count, span = 1, 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"tensor {name!r} has an invalid shape {shape!r}")
        count *= d
        span *= max(d, 1)  # an empty tensor may still not name a huge shape ([0, 2**62] breaks numpy)
        if span > limits.max_tensor_bytes:
            raise LimitExceeded(f"tensor {name!r} has shape {shape}: dimensions over the limit of {limits.max_tensor_bytes} elements")
    expected = count * np_dtype.itemsize
    if expected > limits.max_tensor_bytes:
        raise LimitExceeded(
            f"tensor {name!r} of shape {shape} is {expected} bytes, over the limit of {limits.max_tensor_bytes}"
        )
    return np_dtype, expected


def decode_message(frames: Sequence[Any], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Validate and decode received frames (bytes, memoryview or zmq.Frame) into a Message."""
    if not frames:
        raise ProtocolError("empty message: expected a header frame")
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    header = decode_header(raw, limits)
    descs = header["tensors"]
    if len(descs) > limits.max_tensors:
        raise LimitExceeded(f"{len(descs)} tensors in one message, over the limit of {limits.max_tensors}")
    if len(frames) != 1 + len(descs):
        raise ProtocolError(
            f"header describes {len(descs)} tensors but the message has {len(frames) - 1} tensor frames"
        )
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    total = 0
    for i, desc in enumerate(descs):
        if type(desc) is not dict:
            raise ProtocolError(f"tensor descriptor {i} is not a map")
        name = desc.get("name")
        dtype = desc.get("dtype")
        shape = desc.get("shape")
        nbytes = desc.get("nbytes")
        if type(name) is not str or not name:
            raise ProtocolError(f"tensor descriptor {i} has no valid name")
        if name in tensors:
            raise ProtocolError(f"tensor name {name!r} appears twice")
        np_dtype, expected = tensor_spec(name, dtype, shape, limits)
        if type(nbytes) is not int or nbytes != expected:
            raise ProtocolError(f"tensor {name!r}: descriptor says {nbytes!r} bytes, shape and dtype need {expected}")
        buf = _frame_buffer(frames[1 + i])
        if buf.nbytes != expected:
            raise ProtocolError(f"tensor {name!r}: frame has {buf.nbytes} bytes, shape and dtype need {expected}")
        total += expected
        if total > limits.max_message_bytes:
            raise LimitExceeded(f"message tensors exceed {limits.max_message_bytes} bytes")
        tensors[name] = np.ndarray(shape, dtype=np_dtype, buffer=buf) if expected else np.empty(shape, dtype=np_dtype)
        dtypes[name] = dtype
    return Message(header["kind"], header["req"], header["seq"], header["epoch"], tensors, header["meta"], dtypes)


def error_message(req: str, seq: int, epoch: int, code: str, msg: str, **meta: Any) -> Message:
    """A typed error as data: ``meta = {"status": "error", "code": ..., "msg": ...}``."""
    return Message(
        kind="error", req=req, seq=seq, epoch=epoch, meta={"status": "error", "code": code, "msg": msg[:2000], **meta}
    )
