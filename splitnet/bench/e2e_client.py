"""The edge client of ``splitnet bench e2e``, run inside the lab's edge host.

``python -m splitnet.bench.e2e_client --option split --endpoints EDGE,CLOUD ...`` prepares the
held-out crops (the same seeded list the bench computes), connects, prints ``READY``, then reads
commands on stdin, one a line: ``run N`` makes N requests (crops taken in turn) and prints one
JSON line ``{"latency_ms": [...], "crop": [...], "top1": [...], "payload_bytes": [...]}``;
``quit`` (or end of input) exits. Options:

* ``edge``: the whole model in this process (no network), pinned to ``--cpus``;
* ``split``: :func:`splitnet.connect` to an edge stage and a cloud stage, ``session.infer``;
* ``cloud``: the crop's JPEG at ``--jpeg-quality`` to :mod:`splitnet.bench.e2e_jpeg`.

Every latency is the client's wall time for one request, from the pixels in memory to the
logits in memory (JPEG encoding included for ``cloud``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def held_out_crops(per_source: int, seed: int, held_out_fraction: float, count: int) -> list:
    """The first ``count`` held-out crops of :mod:`splitnet.bench.photos` for these settings."""
    from splitnet.bench import photos as P

    _, held = P.split_crops(P.photo_crops(per_source=per_source, seed=seed), held_out_fraction=held_out_fraction, seed=seed)
    return held[:count]


class _Edge:
    def __init__(self, a):
        import torch

        from splitnet.model import load_model

        self.torch = torch
        self.full = load_model("efficientnet-lite0").full()

    def infer(self, rgb: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, int]:
        with self.torch.no_grad():
            return self.full({"pixel_values": self.torch.from_numpy(pixels)[None]})["logits"].numpy(), 0

    def close(self) -> None:
        pass


class _Split:
    def __init__(self, a):
        import splitnet

        self.s = splitnet.connect(a.endpoints.split(","), timeout_s=a.timeout_s, connect_timeout_s=a.timeout_s)

    def infer(self, rgb, pixels):
        y = self.s.infer({"pixel_values": pixels[None]})["logits"]
        return y, int(self.s.last_stats["wire_bytes"] - self.s.last_stats["client_to_stage0_bytes"])

    def close(self) -> None:
        self.s.close()


class _Cloud:
    def __init__(self, a):
        import zmq

        from splitnet.wire.sockets import make_socket

        self.zmq = zmq
        self.quality = a.jpeg_quality
        self.timeout_ms = int(a.timeout_s * 1000)
        self.ctx = zmq.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER)
        self.sock.connect(a.endpoints)
        self.req = 0

    def infer(self, rgb, pixels):
        from splitnet.bench.e2e_jpeg import encode_jpeg, pack_request, unpack_header
        from splitnet.errors import ProtocolError, StageUnavailable

        data = encode_jpeg(rgb, self.quality)
        self.req += 1
        self.sock.send_multipart([pack_request(self.req), data])
        if not self.sock.poll(self.timeout_ms):
            raise StageUnavailable(f"the cloud JPEG server sent no reply within {self.timeout_ms / 1000} s")
        frames = self.sock.recv_multipart()
        h = unpack_header(frames[0])
        if not h.get("ok") or h["req"] != self.req or len(frames) != 2:
            raise ProtocolError(f"cloud JPEG server: {h.get('error') or 'unexpected reply'}")
        return np.frombuffer(frames[1], dtype=np.float32).reshape(1, -1), len(data) + len(frames[1])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


OPTIONS = {"edge": _Edge, "split": _Split, "cloud": _Cloud}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.bench.e2e_client")
    p.add_argument("--option", required=True, choices=sorted(OPTIONS))
    p.add_argument("--endpoints", default="", help="split: EDGE,CLOUD stage endpoints; cloud: the JPEG server")
    p.add_argument("--per-source", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out-fraction", type=float, default=0.25)
    p.add_argument("--crops", type=int, required=True)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--cpus", default="", help="CPU cores to pin this client to, e.g. 0")
    p.add_argument("--timeout-s", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    import torch

    from splitnet.bench import photos as P
    from splitnet.model.efficientnet import to_pixel_values

    torch.set_num_threads(1)
    crops = held_out_crops(a.per_source, a.seed, a.held_out_fraction, a.crops)
    rgbs = [P.crop_pixels(c) for c in crops]
    pixels = [np.ascontiguousarray(to_pixel_values(x), dtype=np.float32) for x in rgbs]
    client = OPTIONS[a.option](a)
    print("READY", len(crops), flush=True)
    out_fields = ("latency_ms", "crop", "top1", "payload_bytes")

    def one(i: int, out: dict) -> None:
        t0 = time.perf_counter()
        logits, nbytes = client.infer(rgbs[i], pixels[i])
        out["latency_ms"].append(round((time.perf_counter() - t0) * 1e3, 3))
        out["crop"].append(i)
        out["top1"].append(int(np.asarray(logits)[0].argmax()))
        out["payload_bytes"].append(nbytes)

    return serve_commands(client, len(crops), out_fields, one)


def serve_commands(client, items: int, out_fields: tuple[str, ...], one) -> int:
    """The clients' stdin protocol: ``run N`` calls ``one(i, out)`` for the next N items in
    turn (``i`` modulo ``items``) and prints ``out`` (a list per field of ``out_fields``, and
    ``error`` when a typed error stopped the run) as one JSON line; ``quit`` or end of input
    closes ``client`` and returns 0."""
    from splitnet.errors import SplitnetError

    turn = 0
    try:
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                break
            out: dict = {k: [] for k in out_fields}
            try:
                for _ in range(int(cmd[1])):
                    i = turn % items
                    turn += 1  # a request that fails is not retried: the next run takes the next item
                    one(i, out)
            except SplitnetError as e:
                out["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(out), flush=True)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
