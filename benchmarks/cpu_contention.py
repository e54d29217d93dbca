"""How much one CPU stage slows down when its neighbours compute at the same time on the same host.

    python benchmarks/cpu_contention.py qwen2-0.5b --cpus-per-proc 4 --procs 4 --tokens 64

Runs the whole model's forward over ``--tokens`` tokens (no cache, float32) in ``--procs`` processes
pinned to disjoint cores, first one alone, then all at once, and prints the median time of each and
the slowdown. A pipelined prefill on one host runs its stages at once (sharing DRAM bandwidth and
caches), while the whole-prompt run has one stage computing at a time: this is the part of the
chunked-prefill ideal that a single host cannot give. Research code, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def _work(model_dir: str, cpus: list[int], tokens: int, repeats: int, start, out) -> None:
    os.sched_setaffinity(0, cpus)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(len(cpus))
    cfg = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, min(cfg.vocab_size, 32000), (1, tokens))
    with torch.inference_mode():
        model(ids, use_cache=False)
        start.wait(timeout=600)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            times.append((time.perf_counter() - t0) * 1e3)
    out.put(statistics.median(times))


def _run(model_dir: str, sets: list[list[int]], tokens: int, repeats: int) -> list[float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(len(sets)), ctx.Queue()
    procs = [ctx.Process(target=_work, args=(model_dir, c, tokens, repeats, start, out)) for c in sets]
    for p in procs:
        p.start()
    got = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--cpus-per-proc", type=int, default=4)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--tokens", default="64,512")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    from splitnet.bench.environment import environment
    from splitnet.model.loading import resolve_model_dir
    from splitnet.runtime.launcher import disjoint_cpus

    model_dir = str(resolve_model_dir(args.model))
    sets = [[int(c) for c in s.split(",")] for s in disjoint_cpus(args.procs, args.cpus_per_proc)]
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        alone = _run(model_dir, sets[:1], tokens, args.repeats)[0]
        together = _run(model_dir, sets, tokens, args.repeats)
        rows.append({"tokens": tokens, "alone_ms": round(alone, 2), "together_ms": [round(t, 2) for t in together],
                     "slowdown": round(statistics.median(together) / alone, 3)})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"suite": "cpu-contention", "environment": environment(), "config": vars(args), "cpu_sets": sets, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
