"""What a freshly started stage pays for its first work, by warm-up (issue #18, replay over prefill).

A warm standby's first work is a resume: refills of the lost requests' contexts (hundreds of
positions), then decode steps of those requests together. On CUDA every new shape costs its first
forward more than the next (kernels loaded on first use, a decode graph captured per batch and
length bucket). This probe builds a real :class:`~splitnet.runtime.worker.StageWorker` (its model
load, cache pool, CUDA graphs and warm-up, no sockets served) and times, synchronised, the
sequence a replacement meets, twice: the first pass on the fresh stage, the second on the same
stage with the same shapes (what a stage that has served them pays).

Variants (each in its own process, so each starts from a fresh CUDA context):

- ``none``: no warm-up (``warm_up=False``);
- ``ready``: the warm-up before the CUDA shape ladder (an 8-token chunk, a batched one-token step);
- ``shapes``: the whole warm-up (``StageWorker._warm_up_shapes`` too).

Usage: ``python benchmarks/warm_up_probe.py --model gpt2-124m --blocks 4:8 --device cuda``
(runs the three variants as subprocesses and prints one JSON document).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SEQUENCE = (  # (what, members' new tokens per slot index): the first work of a replacement
    ("refill A 100", {0: 100}),
    ("step A", {0: 1}),
    ("refill B 70", {1: 70}),
    ("refill C 120", {2: 120}),
    ("step A B", {0: 1, 1: 1}),
    ("step A B C", {0: 1, 1: 1, 2: 1}),
    ("refill D 300", {3: 300}),
    ("step D", {3: 1}),
)


def _one(model: str, blocks: tuple[int, int], device: str, variant: str) -> dict:
    import torch

    from splitnet.runtime.config import StageWorkerConfig
    from splitnet.runtime.worker import StageWorker

    t0 = time.perf_counter()
    w = StageWorker(StageWorkerConfig(model=model, start_block=blocks[0], end_block=blocks[1], device=device, warm_up=False, stage_index=1))
    built_s = time.perf_counter() - t0
    if variant == "ready":
        w._warm_up_shapes = lambda inputs, slots: None  # the warm-up as it was before the ladder
    t0 = time.perf_counter()
    if variant != "none":
        w._warm_up()
    warm_s = time.perf_counter() - t0
    dev = torch.device(device)
    hidden = w.stage.arch.hidden_size
    first = w.stage.is_first

    def inputs(n: int) -> dict:
        if first:
            return {"input_ids": torch.zeros(1, n, dtype=torch.long)}
        return {"hidden": torch.zeros(1, n, hidden, dtype=w.dtype, device=dev)}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    passes = []
    for _ in range(2):
        slots = [w.pool.acquire() for _ in range(4)]
        times = {}
        for what, members in SEQUENCE:
            idx = sorted(members)
            sync()
            t = time.perf_counter()
            w.stage.forward_batch([inputs(members[i]) for i in idx], [slots[i] for i in idx])
            sync()
            times[what] = round((time.perf_counter() - t) * 1e3, 2)
        for c in slots:
            c.close()
        passes.append(times)
    graphs = w.stage.__dict__.get("_graphs")
    return {"variant": variant, "build_s": round(built_s, 2), "warm_up_s": round(warm_s, 3),
            "graph_captures": getattr(graphs, "captures", None), "first_pass_ms": passes[0], "second_pass_ms": passes[1],
            "first_pass_total_ms": round(sum(passes[0].values()), 1), "second_pass_total_ms": round(sum(passes[1].values()), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--blocks", default="4:8", help="START:END of the probed stage")
    p.add_argument("--device", default="cuda")
    p.add_argument("--variant", choices=("none", "ready", "shapes"), help="run one variant in this process (internal)")
    p.add_argument("--variants", default="none,ready,shapes", help="which variants to run, comma-separated")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per variant")
    args = p.parse_args()
    a, b = (int(x) for x in args.blocks.split(":"))
    if args.variant:
        print(json.dumps(_one(args.model, (a, b), args.device, args.variant)))
        return 0
    out = {"model": args.model, "blocks": [a, b], "device": args.device, "sequence": [w for w, _ in SEQUENCE], "variants": []}
    for v in args.variants.split(","):
        r = subprocess.run([sys.executable, __file__, "--model", args.model, "--blocks", args.blocks, "--device", args.device, "--variant", v],
                           capture_output=True, text=True, timeout=args.timeout_s)
        if r.returncode != 0:
            out["variants"].append({"variant": v, "error": r.stderr[-2000:]})
            continue
        out["variants"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
