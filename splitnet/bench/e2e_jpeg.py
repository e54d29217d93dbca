"""The cloud-only baseline of ``splitnet bench e2e``: the edge sends the JPEG of the image, a cloud
process decodes it and runs the whole model.

Wire: a DEALER (client) / ROUTER (server) pair made by :func:`splitnet.wire.sockets.make_socket`.
A request is two frames, a msgpack header ``{"v": 1, "req": int}`` and the JPEG bytes; the reply
is a header ``{"v": 1, "req": int, "ok": bool, "error": str}`` and, when ok, the logits as raw
float32 (1, 1000). The server checks the version, the frame count, the header size and types,
the JPEG's size, format and pixel count before it decodes; a bad request gets an error reply and
the server keeps serving. Plaintext, like the split stages of the bench (``--insecure``).

Run as ``python -m splitnet.bench.e2e_jpeg --bind tcp://HOST:0 [--cpus 1]``; prints
``READY tcp://HOST:PORT`` once bound.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass

import msgpack
import numpy as np

from splitnet.errors import ProtocolError

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class JpegLimits:
    """What the server accepts: ``max_jpeg_bytes`` per image, ``image_side_px`` x ``image_side_px``
    pixels, ``max_header_bytes`` of msgpack header."""

    max_jpeg_bytes: int = 4 * 1024 * 1024
    image_side_px: int = 224
    max_header_bytes: int = 1024


def pack_request(req: int) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "req": int(req)})


def unpack_header(data: bytes, limits: JpegLimits = JpegLimits()) -> dict:
    """A request or reply header, checked (raises ProtocolError)."""
    if len(data) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(data)} bytes exceeds {limits.max_header_bytes}")
    try:
        h = msgpack.unpackb(data, raw=False, max_str_len=512, max_bin_len=0, max_array_len=8, max_map_len=8, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"header is not msgpack: {e}") from None
    if not isinstance(h, dict) or h.get("v") != PROTOCOL_VERSION or not isinstance(h.get("req"), int):
        raise ProtocolError(f"header must be a map with v={PROTOCOL_VERSION} and an integer req")
    return h


def decode_jpeg(data: bytes, limits: JpegLimits = JpegLimits()) -> np.ndarray:
    """The RGB uint8 (side, side, 3) image of a JPEG, checked before decoding (raises ProtocolError)."""
    from PIL import Image, UnidentifiedImageError

    if not 0 < len(data) <= limits.max_jpeg_bytes:
        raise ProtocolError(f"JPEG of {len(data)} bytes: must be 1..{limits.max_jpeg_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.size != (limits.image_side_px, limits.image_side_px):
            raise ProtocolError(f"expected a {limits.image_side_px}x{limits.image_side_px} JPEG, got {img.format} {img.size}")
        return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ProtocolError(f"not a decodable JPEG: {e}") from None


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def serve(bind: str, limits: JpegLimits, idle_timeout_s: float) -> int:
    import torch
    import zmq

    from splitnet.model import load_model
    from splitnet.model.efficientnet import to_pixel_values
    from splitnet.wire.sockets import SocketConfig, make_socket

    full = load_model("efficientnet-lite0").full()
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER, SocketConfig(max_message_bytes=limits.max_jpeg_bytes + 4096), server=True)
    host, _, port = bind[len("tcp://"):].rpartition(":")
    if port == "0":
        port = str(sock.bind_to_random_port(f"tcp://{host}", min_port=20000, max_port=60000))
    else:
        sock.bind(bind)
    print(f"READY tcp://{host}:{port}", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        if not poller.poll(idle_timeout_s * 1000):  # nobody asked for this long: the bench is gone
            return 0
        frames = sock.recv_multipart(copy=True)
        ident, parts = frames[0], frames[1:]
        req = -1
        try:
            if len(parts) != 2:
                raise ProtocolError(f"expected 2 frames (header, JPEG), got {len(parts)}")
            req = unpack_header(parts[0], limits)["req"]
            x = torch.from_numpy(to_pixel_values(decode_jpeg(parts[1], limits)))[None]
            with torch.no_grad():
                logits = full({"pixel_values": x})["logits"].float().numpy()
            reply = [msgpack.packb({"v": PROTOCOL_VERSION, "req": req, "ok": True, "error": ""}), np.ascontiguousarray(logits).tobytes()]
        except ProtocolError as e:
            reply = [msgpack.packb({"v": PROTOCOL_VERSION, "req": req, "ok": False, "error": str(e)})]
        sock.send_multipart([ident, *reply])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.bench.e2e_jpeg")
    p.add_argument("--bind", required=True, help="tcp://HOST:PORT (port 0: any free port)")
    p.add_argument("--cpus", default="", help="CPU cores to pin to, e.g. 1")
    p.add_argument("--idle-timeout-s", type=float, default=900.0, help="exit after this long without a request")
    a = p.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    import torch

    torch.set_num_threads(1)
    return serve(a.bind, JpegLimits(), a.idle_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
