"""A client run inside a lab host: ``python -m splitnet.lab.probe --endpoints A,B,C --reply-host IP``.

Runs ``--requests`` inferences (encoders) or a short generation (decoders) through the pipeline,
checks the output against the whole model run locally in this process, and prints one JSON line
with latencies, bytes and the largest difference. Used by the netns tests and ``splitnet lab``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitnet.lab.probe")
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoints", required=True, help="comma-separated stage endpoints, in order")
    p.add_argument("--reply-host", required=True, help="this host's address (the last stage connects back to it)")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--client-key", default="")
    p.add_argument("--server-key", default="", help="the stages' public keys: one file for all, or one per stage, comma-separated")
    p.add_argument("--transport", default="curvezmq", choices=("curvezmq",))
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--no-reference", action="store_true", help="skip the local whole-model check")


def run(a: argparse.Namespace) -> int:

    import torch

    import splitnet.edge.sdk as sdk
    from splitnet.edge.config import ClientConfig
    from splitnet.errors import SplitnetError

    cfg = ClientConfig(reply_host=a.reply_host, timeout_s=a.timeout_s, connect_timeout_s=a.timeout_s, client_key=a.client_key, server_key=a.server_key, transport=a.transport)
    out: dict = {"ok": False}
    try:
        t0 = time.perf_counter()
        with sdk.connect(a.endpoints.split(","), config=cfg) as s:
            out["connect_ms"] = (time.perf_counter() - t0) * 1e3
            out["kind"] = s.kind
            lat = []
            if s.kind == "decoder":
                prompt = "def split_inference(model, link):"
                ids = list(s.tokenizer.encode(prompt))
                for _ in range(a.requests):
                    r = s.generate(ids, max_new_tokens=a.new_tokens)
                    lat.append(r.latency_ms)
                out["tokens"] = r.tokens
                if not a.no_reference:
                    out["max_abs_diff"] = _reference_decoder(s, ids, r.tokens)
            else:
                texts = ["split inference across three hosts", "shaped links in network namespaces"]
                inputs = dict(s.tokenizer(texts, max_length=64))
                for _ in range(a.requests):
                    y = s.infer(inputs)
                    lat.append(s.last_stats["latency_ms"])
                out["wire_bytes"] = s.last_stats["wire_bytes"]
                out["outputs"] = {k: list(v.shape) for k, v in y.items()}
                if not a.no_reference:
                    out["max_abs_diff"] = _reference_encoder(s, inputs, y)
            out["latency_ms"] = lat
            out["latency_ms_median"] = statistics.median(lat)
            out["ok"] = True
    except SplitnetError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
    del torch
    return 0 if out["ok"] else 1


def _full_stage(s):
    from splitnet.model import load_model

    bm = load_model(s.stages[0]["model"])
    return bm.stage(0, bm.num_blocks)


def _reference_encoder(s, inputs, y) -> float:
    import torch

    with torch.no_grad():
        ref = _full_stage(s)({k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})
    return max(float(np.max(np.abs(ref[k].float().numpy() - y[k].astype(np.float32)))) for k in y if k in ref)


def _reference_decoder(s, ids, tokens) -> float:
    """Greedy tokens of the whole model vs the pipeline's: 0.0 when they agree, else 1.0."""
    import torch

    stage = _full_stage(s)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(len(tokens)):
            out = stage({"input_ids": torch.tensor([seq])})
            seq.append(int(out["logits"][0, -1].argmax()) if out["logits"].dim() == 3 else int(out["logits"][0].argmax()))
    return 0.0 if seq[len(ids):] == list(tokens) else 1.0


if __name__ == "__main__":
    sys.exit(main())
