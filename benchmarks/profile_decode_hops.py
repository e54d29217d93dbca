"""Where one sequence's decode time goes outside the stages' forwards: py-spy on every stage
process and on the client while one sequence decodes through a local pipeline.

    python benchmarks/profile_decode_hops.py shape:llama-3.2-1b --stages 2 --device cuda --out /tmp/prof

Prints ms/token, the stages' own compute per token (from the traces) and, per process, the
frames that hold the most samples (inclusive), and writes py-spy's raw profiles under --out.
Research code: needs ``py-spy`` on PATH (pip install py-spy) and ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def summarize(raw: Path, top: int) -> list[tuple[float, str]]:
    total, frames = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        for fr in set(stack.split(";")):
            frames[fr] += int(n)
    return [(round(100 * v / max(1, total), 1), k) for k, v in frames.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--out", default="/tmp/splitnet-profile")
    p.add_argument("--py-spy", default="", help="the py-spy binary (default: on PATH or next to this Python)")
    args = p.parse_args()

    import splitnet
    from splitnet.bench.shapes import is_shape, shape_dir
    from splitnet.runtime.launcher import launch_pipeline

    model = str(shape_dir(args.model, device=args.device, dtype=args.dtype)) if is_shape(args.model) else args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spy = args.py_spy or shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    extra = ["--device", args.device, "--dtype", args.dtype]
    with launch_pipeline(model, num_stages=args.stages, extra_args=extra, ready_timeout_s=600) as pipe, splitnet.connect(pipe.endpoints, timeout_s=600) as s:
        prompt = list(range(1, 65))
        for _ in range(3):
            s.generate(prompt, args.tokens)  # warm-up: graphs, caches, sockets
        targets = {f"stage{i}": pid for i, pid in enumerate(pipe.pids)} | {"client": os.getpid()}
        spies = [subprocess.Popen([spy, "record", "-p", str(pid), "-o", str(out / f"{name}.txt"), "-f", "raw", "-d", str(int(args.seconds) + 2),
                                   "-r", str(args.rate), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, pid in targets.items()]
        time.sleep(1.0)
        t0, n, compute = time.perf_counter(), 0, collections.Counter()
        while time.perf_counter() - t0 < args.seconds:
            r = s.generate(prompt, args.tokens)
            n += args.tokens - 1
            for stage, st in r.stats.get("decode_stage_ms", {}).items():
                for k, v in st.items():
                    if k != "steps":
                        compute[f"{stage}.{k}"] += v
            decode_s = (r.latency_ms - r.ttft_ms) / 1e3
            compute["decode_s"] += decode_s
        for sp in spies:
            sp.wait(timeout=60)
    report = {"model": args.model, "stages": args.stages, "device": args.device,
              "ms_per_token": round(1e3 * compute.pop("decode_s") / n, 3),
              "stage_ms_per_token": {k: round(v / n, 3) for k, v in sorted(compute.items())},
              "profiles": {name: summarize(out / f"{name}.txt", args.top) for name in targets if (out / f"{name}.txt").exists()}}
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
