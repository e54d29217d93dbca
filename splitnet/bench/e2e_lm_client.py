"""The edge client of ``splitnet bench e2e --workload lm``, run inside the lab's edge host.

``python -m splitnet.bench.e2e_lm_client --option split --endpoints EDGE,CLOUD --prompts FILE ...``
loads the held-out prompts the bench wrote (``.npy``, (G, P) int64), connects, prints ``READY``,
then reads commands on stdin, one a line: ``run N`` makes N requests (prompts taken in turn), each
one prompt + ``--new-tokens`` greedy tokens, and prints one JSON line
``{"ttft_ms": [...], "total_ms": [...], "prompt": [...], "tokens": [[...]], "link_prefill_bytes": [...],
"link_decode_bytes": [...], "sdk_bytes": [...]}``; ``quit`` (or end of input) exits. Options:

* ``edge``: the whole model in this process (KV cache, greedy; no network);
* ``cloud``: :func:`splitnet.connect` to one cloud stage holding the whole model; the prompt's token
  ids go to it and every decoded token is one round trip (``session.stream``);
* ``split``: :func:`splitnet.connect` to an edge stage (blocks [0, cut), its ``--codec-out`` on the
  cut) and a cloud stage ([cut, L)).

``ttft_ms``: from the prompt ids in memory to the first generated token in memory; ``total_ms``: to
the last. ``link_*_bytes``: the edge veth's counters (``--veth``, tx + rx, every frame), read when the
request starts, when its first token arrives and when its last one does (this process runs in the
edge host's namespace: its sysfs shows that veth). ``sdk_bytes``: the SDK's own count of the
request's messages (for a split it includes the client -> edge stage hop inside the edge host,
which is not on the link).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def veth_bytes(dev: str) -> int:
    """tx + rx bytes of network device ``dev`` in this namespace (0 when ``dev`` is "")."""
    if not dev:
        return 0
    total = 0
    for k in ("tx_bytes", "rx_bytes"):
        with open(f"/sys/class/net/{dev}/statistics/{k}") as f:
            total += int(f.read())
    return total


class _Edge:
    """The whole model in this process: greedy decoding with a KV cache, batch 1."""

    def __init__(self, a):
        import torch

        from splitnet.model import load_model

        self.torch = torch
        self.stage = load_model(a.model).full()

    def generate(self, ids: np.ndarray, new_tokens: int, on_first) -> tuple[list[int], int]:
        torch = self.torch
        cache = self.stage.new_cache()
        out: list[int] = []
        feed = torch.from_numpy(np.ascontiguousarray(ids[None], dtype=np.int64))
        with torch.no_grad():
            for i in range(new_tokens):
                logits = self.stage({"input_ids": feed}, cache)["logits"]
                tok = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
                out.append(tok)
                if i == 0:
                    on_first()
                feed = torch.tensor([[tok]], dtype=torch.int64)
        return out, 0

    def close(self) -> None:
        pass


class _Remote:
    """``cloud`` and ``split``: the SDK's greedy ``stream`` over the stages at ``--endpoints``."""

    def __init__(self, a):
        import splitnet

        self.s = splitnet.connect(a.endpoints.split(","), timeout_s=a.timeout_s, connect_timeout_s=a.timeout_s)

    def generate(self, ids: np.ndarray, new_tokens: int, on_first) -> tuple[list[int], int]:
        from splitnet.edge.generation import GenerationResult

        result = None
        first = True
        for ev in self.s.stream([int(x) for x in ids], new_tokens):
            if isinstance(ev, GenerationResult):
                result = ev
            elif first:
                first = False
                on_first()
        if result is None:
            from splitnet.errors import StageUnavailable

            raise StageUnavailable("the stream ended without a result")
        st = result.stats
        nbytes = int(st.get("prefill", {}).get("wire_bytes", 0)) + int(st.get("decode_wire_bytes", 0))
        return list(result.tokens), nbytes

    def close(self) -> None:
        self.s.close()


OPTIONS = {"edge": _Edge, "cloud": _Remote, "split": _Remote}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.bench.e2e_lm_client")
    p.add_argument("--option", required=True, choices=sorted(OPTIONS))
    p.add_argument("--endpoints", default="", help="split: EDGE,CLOUD stage endpoints; cloud: the cloud stage")
    p.add_argument("--model", default="stdlib-gpt")
    p.add_argument("--prompts", required=True, help=".npy file of (G, P) int64 prompt token ids")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--veth", default="", help="the edge host's link device, whose counters are read per request phase")
    p.add_argument("--cpus", default="", help="CPU cores to pin this client to, e.g. 0")
    p.add_argument("--timeout-s", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    import torch

    from splitnet.bench.e2e_client import serve_commands

    torch.set_num_threads(1)
    prompts = np.load(a.prompts)
    client = OPTIONS[a.option](a)
    print("READY", len(prompts), flush=True)
    out_fields = ("ttft_ms", "total_ms", "prompt", "tokens", "link_prefill_bytes", "link_decode_bytes", "sdk_bytes")

    def one(i: int, out: dict) -> None:
        mark: dict = {}

        def first() -> None:
            mark["t"] = time.perf_counter()
            mark["b"] = veth_bytes(a.veth)

        b0 = veth_bytes(a.veth)
        t0 = time.perf_counter()
        toks, nbytes = client.generate(prompts[i], a.new_tokens, first)
        t1 = time.perf_counter()
        b1 = veth_bytes(a.veth)
        out["ttft_ms"].append(round((mark["t"] - t0) * 1e3, 3))
        out["total_ms"].append(round((t1 - t0) * 1e3, 3))
        out["prompt"].append(i)
        out["tokens"].append(toks)
        out["link_prefill_bytes"].append(mark["b"] - b0)
        out["link_decode_bytes"].append(b1 - mark["b"])
        out["sdk_bytes"].append(nbytes)

    return serve_commands(client, len(prompts), out_fields, one)


if __name__ == "__main__":
    sys.exit(main())
