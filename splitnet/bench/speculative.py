"""Speculative decoding: an edge draft model proposes, the split pipeline verifies, over delayed links.

Stage processes run on this host; every link (client -> stage 0 -> ... -> last stage -> client)
goes through the link emulator (:mod:`splitnet.lab.relay`) with the given one-way delay, so each
decode step costs one pipeline round trip. Plain greedy decoding (one token per round trip) is
measured in the same run, on the same prompts, and speculative tokens are checked to be equal to
it. Acceptance is measured on held-out text the models were not trained on. The default models
are trained on first use (about 4 minutes on 2 cores, then cached; see docs/models.md).
"""

from __future__ import annotations

import argparse
import subprocess
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="stdlib-gpt", help="decoder served by the pipeline")
    p.add_argument("--draft", default="stdlib-gpt-draft", help="draft decoder run by the client (same vocabulary)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--delays-ms", default="0,10,25", help="one-way delay added to every link, comma-separated")
    p.add_argument("--speculate", default="2,4,6", help="draft tokens per step to compare")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per stage process")
    p.add_argument("--quick", action="store_true", help="one delay (25 ms), k=4, 2 prompts, 32 tokens")


def _prompts(n: int, tokenizer) -> list[list[int]]:
    """Code prompts from the stdlib files ``stdlib-gpt`` was not trained on (``train_lm``'s held-out split)."""
    from splitnet.model.train_lm import heldout_files

    files = heldout_files()
    out = []
    for f in files:
        text = open(f, encoding="utf-8", errors="replace").read()
        i = text.find("\ndef ")
        if i < 0:
            continue
        out.append(list(tokenizer.encode(text[i + 1 : i + 161])))
        if len(out) == n:
            break
    return out


def _relays(endpoints: list[str], delay_ms: float) -> tuple[list[str], list[subprocess.Popen]]:
    if delay_ms <= 0:
        return list(endpoints), []
    from splitnet.lab.relay import start_relay

    eps, procs = [], []
    for ep in endpoints:
        p, relayed = start_relay("127.0.0.1", ep, delay_ms)
        procs.append(p)
        eps.append(relayed)
    return eps, procs


def run(args: argparse.Namespace) -> dict:
    import splitnet
    from splitnet.edge.config import ClientConfig
    from splitnet.edge.draft import DraftModel
    from splitnet.model import load_model
    from splitnet.runtime.launcher import launch_pipeline

    delays = [25.0] if args.quick else [float(x) for x in args.delays_ms.split(",")]
    ks = [4] if args.quick else [int(x) for x in args.speculate.split(",")]
    n_new = 32 if args.quick else args.new_tokens
    n_prompts = 2 if args.quick else args.prompts
    t_start = time.perf_counter()
    from splitnet.model.builtin import TRAINED_LMS
    from splitnet.model.train_lm import materialize_trained

    for name in (args.target, args.draft):  # the explicit training step (cached), announced on stderr
        if name in TRAINED_LMS:
            materialize_trained(name)
    target = load_model(args.target)
    draft = DraftModel(args.draft, threads=1)
    prompts = _prompts(n_prompts, target.tokenizer)
    num = target.num_blocks
    cuts = [round(num * i / args.stages) for i in range(1, args.stages)]
    results = []
    with launch_pipeline(args.target, cuts, torch_threads=args.torch_threads) as pipe:
        for delay in delays:
            eps, relays = _relays(pipe.endpoints, delay)
            try:
                with splitnet.connect(eps, config=ClientConfig(timeout_s=120, heartbeat_interval_s=2.0)) as s:
                    s.generate(prompts[0], 4)  # warm-up: connections, caches, first-call costs
                    plain = []
                    for p in prompts:
                        t0 = time.perf_counter()
                        r = s.generate(p, n_new)
                        plain.append((r.tokens, time.perf_counter() - t0 - r.ttft_ms / 1e3))
                    plain_tps = (n_new - 1) * len(prompts) / sum(dt for _, dt in plain)
                    results.append({"delay_ms": delay, "speculate_tokens": 0, "tokens_per_s": round(plain_tps, 2), "round_trips": (n_new - 1) * len(prompts)})
                    for k in ks:
                        acc, steps, exact, secs = [0, 0], 0, True, 0.0
                        for p, (want, _) in zip(prompts, plain):
                            t0 = time.perf_counter()
                            r = s.generate(p, n_new, draft=draft, speculate_tokens=k)
                            secs += time.perf_counter() - t0 - r.ttft_ms / 1e3
                            st = r.stats["speculative"]
                            acc[0] += st["accepted"]
                            acc[1] += st["proposed"]
                            steps += st["round_trips"]
                            exact &= r.tokens == want
                        tps = (n_new - 1) * len(prompts) / secs
                        results.append({"delay_ms": delay, "speculate_tokens": k, "tokens_per_s": round(tps, 2), "speedup": round(tps / plain_tps, 3),
                                        "acceptance": round(acc[0] / max(1, acc[1]), 4), "round_trips": steps,
                                        "tokens_per_round_trip": round((n_new - 1) * len(prompts) / max(1, steps), 3), "tokens_equal_plain_greedy": exact})
            finally:
                for r in relays:
                    r.kill()
    best = {d: max((r for r in results if r["delay_ms"] == d and r["speculate_tokens"]), key=lambda r: r["tokens_per_s"], default=None) for d in delays}
    return {
        "config": {"target": args.target, "draft": args.draft, "stages": args.stages, "cuts": cuts, "delays_ms": delays, "speculate": ks,
                   "new_tokens": n_new, "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "torch_threads": args.torch_threads,
                   "timing": "decode only (time to first token excluded), greedy"},
        "results": results,
        "best_speedup_by_delay": {str(d): (b["speedup"] if b else None) for d, b in best.items()},
        "all_tokens_equal": all(r.get("tokens_equal_plain_greedy", True) for r in results),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        "exit_code": 0 if all(r.get("tokens_equal_plain_greedy", True) for r in results) else 1,
    }


def summarize(doc: dict) -> str:
    lines = [f"speculative decoding: {doc['config']['target']} in {doc['config']['stages']} stages, draft {doc['config']['draft']}"]
    for r in doc["results"]:
        k = r["speculate_tokens"]
        extra = f" x{r['speedup']} acceptance {r['acceptance']} tokens/round trip {r['tokens_per_round_trip']} exact {r['tokens_equal_plain_greedy']}" if k else " (plain greedy)"
        lines.append(f"  delay {r['delay_ms']:>5} ms  k={k}: {r['tokens_per_s']:7.1f} tok/s{extra}")
    return "\n".join(lines)


