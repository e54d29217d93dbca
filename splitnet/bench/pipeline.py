"""Pipeline latency and throughput: chunked prefill, decode across sequences, vs the unsplit model.

Stage processes run on this host (CPU or one GPU shared by the stages); the baseline is the
same model unsplit in this process with a KV cache, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-gpt2", help="decoder model (built-in name or HF directory)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (all stages share it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per stage process")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--chunks", default="0,128,64,32", help="prefill chunk sizes to compare (0: whole prompt)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--sequences", default="1,4,8", help="concurrent sequences for the decode throughput run")
    p.add_argument("--repeats", type=int, default=3)


def _baseline(model: str, device: str, dtype: str, prompt: list[int], n_new: int, repeats: int) -> dict:
    import torch

    from splitnet.model import load_model

    bm = load_model(model)
    full = bm.full().to(torch.device(device), getattr(torch, dtype))
    ids = torch.tensor([prompt], device=device)
    ttft, per_tok = [], []
    for _ in range(repeats + 1):
        cache = full.new_cache()
        _sync(device)
        t0 = time.perf_counter()
        tok = full({"input_ids": ids}, cache)["logits"].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            tok = full({"input_ids": tok}, cache)["logits"].argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
        ttft.append((t1 - t0) * 1e3)
        per_tok.append((t2 - t1) * 1e3 / max(1, n_new - 1))
    return {"ttft_ms": statistics.median(ttft[1:]), "ms_per_token": statistics.median(per_tok[1:]), "tokens_per_s": 1e3 / statistics.median(per_tok[1:])}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    import splitnet
    from splitnet.edge.config import ClientConfig
    from splitnet.model.loading import architecture_for, resolve_model_dir
    from splitnet.model.weights import read_config
    from splitnet.runtime.launcher import even_cuts, launch_pipeline

    cfg = read_config(resolve_model_dir(args.model))
    L = architecture_for(cfg).num_blocks
    vocab = int(cfg.get("vocab_size", 257))
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, min(vocab, 256), args.prompt_tokens)]
    chunks = [int(c) for c in args.chunks.split(",")]
    seq_counts = [int(c) for c in args.sequences.split(",")]
    import torch

    torch.set_num_threads(max(1, args.torch_threads))  # the baseline gets the threads of one stage
    baseline = _baseline(args.model, args.device, args.dtype, prompt, args.new_tokens, args.repeats)
    cuts = even_cuts(L, args.stages)
    extra = ["--device", args.device, "--dtype", args.dtype]
    results: dict = {"prefill": [], "decode": []}
    with launch_pipeline(args.model, cuts, torch_threads=args.torch_threads, extra_args=extra) as pipe:
        for chunk in chunks:
            ccfg = ClientConfig(timeout_s=300, prefill_chunk_tokens=chunk or args.prompt_tokens)
            with splitnet.connect(pipe.endpoints, config=ccfg) as s:
                s.generate(prompt[:8], 2)  # warm-up
                ttft, per_tok, wire = [], [], []
                for _ in range(args.repeats):
                    r = s.generate(prompt, args.new_tokens)
                    ttft.append(r.ttft_ms)
                    per_tok.append((r.latency_ms - r.ttft_ms) / max(1, args.new_tokens - 1))
                    wire.append(r.stats["prefill"]["wire_bytes"])
            results["prefill"].append({
                "chunk_tokens": chunk or args.prompt_tokens,
                "ttft_ms": round(statistics.median(ttft), 2),
                "decode_ms_per_token": round(statistics.median(per_tok), 2),
                "prefill_wire_bytes": int(statistics.median(wire)),
            })
        with splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=300)) as s:
            for k in seq_counts:
                prompts = [prompt[: 32 + i] for i in range(k)]
                s.generate_many(prompts, args.new_tokens)  # warm-up: first use of these shapes
                t0 = time.perf_counter()
                outs = s.generate_many(prompts, args.new_tokens)
                dt = time.perf_counter() - t0
                results["decode"].append({"sequences": k, "tokens": sum(len(o) for o in outs), "seconds": round(dt, 3), "tokens_per_s": round(sum(len(o) for o in outs) / dt, 1)})
    best_ttft = min(p["ttft_ms"] for p in results["prefill"])
    whole = next(p for p in results["prefill"] if p["chunk_tokens"] == args.prompt_tokens)
    return {
        "config": {k: getattr(args, k) for k in ("model", "stages", "device", "dtype", "torch_threads", "prompt_tokens", "new_tokens", "repeats")},
        "stages": [{"index": st.index, "blocks": list(st.blocks), "pid": st.pid} for st in pipe.stages],
        "baseline_unsplit": {k: round(v, 2) for k, v in baseline.items()},
        **results,
        "summary": {
            "ttft_whole_prompt_ms": whole["ttft_ms"],
            "ttft_best_chunked_ms": best_ttft,
            "chunked_prefill_speedup": round(whole["ttft_ms"] / best_ttft, 3),
            "decode_tokens_per_s_1_seq": results["decode"][0]["tokens_per_s"],
            "decode_tokens_per_s_max": max(d["tokens_per_s"] for d in results["decode"]),
            "baseline_tokens_per_s": round(baseline["tokens_per_s"], 1),
        },
    }


def summarize(doc: dict) -> str:
    s = doc["summary"]
    lines = [f"{doc['config']['model']} in {doc['config']['stages']} stages on {doc['config']['device']} ({doc['config']['dtype']})"]
    lines.append(f"unsplit baseline: TTFT {doc['baseline_unsplit']['ttft_ms']} ms, {doc['baseline_unsplit']['ms_per_token']} ms/token")
    for p in doc["prefill"]:
        lines.append(f"prefill chunk {p['chunk_tokens']:>5}: TTFT {p['ttft_ms']} ms, decode {p['decode_ms_per_token']} ms/token")
    for d in doc["decode"]:
        lines.append(f"decode {d['sequences']:>3} sequences: {d['tokens_per_s']} tokens/s")
    lines.append(f"chunked prefill speedup x{s['chunked_prefill_speedup']}")
    return "\n".join(lines)
