"""Pipeline latency and throughput against what a user would run instead, in the same run.

Stage processes run on this host (CPU cores, pinned disjointly with ``--cpus-per-stage``, or one
GPU shared by the stages). Measured:

- the baselines: transformers eager (dynamic cache) and, on CUDA, static cache +
  ``torch.compile(mode="reduce-overhead")``, for one sequence and a batch; the memory-bandwidth
  limit (weight bytes / this device's measured copy bandwidth);
- chunked prefill: time to first token for each chunk size, against the whole prompt at once
  (ideal speed-up with S stages and k equal chunks: S k / (k + S - 1), at most S);
- decode: ``--concurrency`` clients at once (one process, session and sequence each), tokens/s,
  each stage's busy fraction and mean batch; and (``--drivers many``) the same number of
  sequences driven by ONE client process through ``generate_many``, whose ready decode steps
  go to stage 0 as one batch message;
- greedy tokens against transformers' for the same prompts (batching on).
"""

from __future__ import annotations

import argparse
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-gpt2", help="decoder: built-in name, HF directory, or shape:NAME (random weights at a real size: "
                   "shape:llama-3-8b, shape:llama-3.2-1b, shape:qwen2-1.5b)")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--cuts", default="", help="block indices where stages 2..S start, e.g. 6,12,17 (default: even cuts)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (all stages share it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per stage process (and for the baselines)")
    p.add_argument("--cpus-per-stage", type=int, default=0, help="pin each stage to this many disjoint cores (0: not pinned)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--chunks", default="0,128,64,32", help="prefill chunk sizes to compare (0: whole prompt)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,8", help="concurrent clients for the decode runs (one sequence each)")
    p.add_argument("--decode-prompt-tokens", type=int, default=32, help="prompt length of each client in the decode runs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baselines", default="", help="transformers baselines: eager,compiled (default: eager on cpu, both on cuda; 'none' for none)")
    p.add_argument("--max-batch-size", type=int, default=64, help="stage batching limit (1: one request per forward)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="stage option: wait this long at most for active requests' next steps")
    p.add_argument("--check-sequences", type=int, default=4, help="decode sequences whose tokens are checked against transformers")
    p.add_argument("--drivers", default="clients,many", help="who drives the decode runs: clients (one process per sequence), "
                   "many (one process, generate_many over all of them); comma-separated")


def _stage_stats(endpoints: list[str]) -> list[dict]:
    """Each stage's counters (busy seconds, batches), asked over a plain socket (local stages)."""
    import zmq

    from splitnet.wire import Message, SocketConfig, decode_message, encode_message, make_socket

    ctx = zmq.Context.instance()
    out = []
    for ep in endpoints:
        s = make_socket(ctx, zmq.DEALER, SocketConfig())
        try:
            s.connect(ep)
            s.send_multipart(encode_message(Message(kind="info", req="bench")))
            if not s.poll(10_000):
                raise RuntimeError(f"stage at {ep} did not answer info within 10 s")
            out.append(dict(decode_message(s.recv_multipart()).meta["stats"]))
        finally:
            s.close(linger=0)
    return out


def _teacher_forced_argmax(endpoints: list[str], ids: list[int]) -> list[int]:
    """The pipeline's greedy choice at every position of ``ids`` (one pass, no cache)."""
    import numpy as np

    import splitnet
    from splitnet.edge.config import ClientConfig

    with splitnet.connect(endpoints, config=ClientConfig(timeout_s=600)) as s:
        out = s.infer({"input_ids": np.asarray([ids], dtype=np.int64)}, all_logits=True, head="argmax")
    return [int(x) for x in np.asarray(out["argmax"]).reshape(-1)]


def _client_process(endpoints: list[str], prompt: list[int], n_new: int, start, results, index: int) -> None:
    """One client: its own process and session, one generation once every client is connected."""
    import splitnet
    from splitnet.edge.config import ClientConfig

    try:
        with splitnet.connect(endpoints, config=ClientConfig(timeout_s=600)) as s:
            start.wait(timeout=120)
            r = s.generate(prompt, n_new)
        results.put((index, list(r.tokens), r.latency_ms, r.ttft_ms, r.stats.get("decode_stage_ms", {}), None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        results.put((index, None, 0.0, 0.0, {}, f"{type(e).__name__}: {e}"))


def _many_process(endpoints: list[str], prompts: list[list[int]], n_new: int, start, results) -> None:
    """One client process driving every prompt through ``generate_many``."""
    import splitnet
    from splitnet.edge.config import ClientConfig

    try:
        with splitnet.connect(endpoints, config=ClientConfig(timeout_s=600)) as s:
            start.wait(timeout=120)
            rs = s.generate_many(prompts, n_new)
            batched = s.batch_messages
        results.put(([list(r.tokens) for r in rs], [(r.latency_ms - r.ttft_ms) / max(1, n_new - 1) for r in rs], batched,
                     _stage_step_ms(rs[0].stats.get("decode_stage_ms", {})), None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        results.put((None, [], False, {}, f"{type(e).__name__}: {e}"))


def _many(endpoints: list[str], prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], float, list[float], bool, dict]:
    """ONE client process generating every prompt at once (``generate_many``); (tokens, wall s,
    ms/token of each sequence, whether its steps travelled as batch messages, sequence 0's
    per-stage step times)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    results = ctx.Queue()
    proc = ctx.Process(target=_many_process, args=(endpoints, prompts, n_new, start, results), daemon=True)
    proc.start()
    try:
        start.wait(timeout=180)
        t0 = time.perf_counter()
        tokens, per_tok, batched, step_ms, error = results.get(timeout=900)
        wall = time.perf_counter() - t0
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    if error:
        raise RuntimeError(f"the generate_many client failed: {error}")
    return tokens, wall, per_tok, batched, step_ms


def _stage_deltas(before: list[dict], after: list[dict], wall: float) -> dict:
    """Per stage, over one run: busy fraction, mean batch, batch messages received and sent."""
    return {
        "stage_busy_fraction": [round((a["busy_s"] - b["busy_s"]) / wall, 3) for a, b in zip(after, before)],
        "stage_mean_batch": [round((a["batched_requests"] - b["batched_requests"]) / max(1, a["batches"] - b["batches"]), 2) for a, b in zip(after, before)],
        "stage_batch_messages_in": [a.get("batch_messages_in", 0) - b.get("batch_messages_in", 0) for a, b in zip(after, before)],
        "stage_batch_messages_out": [a.get("batch_messages_out", 0) - b.get("batch_messages_out", 0) for a, b in zip(after, before)],
    }


def _clients(endpoints: list[str], prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], float, list[float], dict]:
    """Run one client process per prompt at once (so the clients' Python is not what limits the
    stages); (tokens, wall s, ms/token each, client 0's per-stage step times)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(prompts) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(endpoints, p, n_new, start, results, i), daemon=True) for i, p in enumerate(prompts)]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=180)
        t0 = time.perf_counter()
        got = [results.get(timeout=900) for _ in procs]
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    got.sort(key=lambda g: g[0])
    errors = [g[5] for g in got if g[5]]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} clients failed; first: {errors[0]}")
    per_tok = [(g[2] - g[3]) / max(1, n_new - 1) for g in got]
    return [g[1] for g in got], wall, per_tok, _stage_step_ms(got[0][4])


def _stage_step_ms(per_stage: dict) -> dict:
    """Per stage, mean ms per decode step of one generation (queue, decode, compute, encode) as
    the stages' traces report them (``stats["decode_stage_ms"]``)."""
    from splitnet.edge.generation import STAGE_TIMES

    out = {}
    for stage, acc in sorted(per_stage.items()):
        n = max(1, acc["steps"])
        out[str(stage)] = {k: round(acc.get(k, 0.0) / n, 3) for k in STAGE_TIMES}
    return out


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from splitnet.bench import hf_baselines
    from splitnet.bench.shapes import is_shape, shape_dir
    from splitnet.model.loading import architecture_for, resolve_model_dir
    from splitnet.model.weights import read_config
    from splitnet.runtime.launcher import disjoint_cpus, even_cuts, launch_pipeline

    model_dir = shape_dir(args.model, device=args.device, dtype=args.dtype) if is_shape(args.model) else resolve_model_dir(args.model)
    cfg = read_config(model_dir)
    L = architecture_for(cfg).num_blocks
    cuts = [int(c) for c in args.cuts.split(",")] if args.cuts else even_cuts(L, args.stages)
    if len(cuts) != args.stages - 1:
        raise SystemExit(f"splitnet bench pipeline: --cuts gives {len(cuts) + 1} stages, --stages says {args.stages}")
    vocab = int(cfg.get("vocab_size", 257))
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, min(vocab, 32000), args.prompt_tokens)]
    chunks = [int(c) for c in args.chunks.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    n_max = max(concurrency)
    decode_prompts = [[int(x) for x in rng.integers(0, min(vocab, 32000), args.decode_prompt_tokens)] for _ in range(n_max)]
    kinds = args.baselines.split(",") if args.baselines else (["eager", "compiled"] if args.device.startswith("cuda") else ["eager"])
    kinds = [k for k in kinds if k and k != "none"]
    drivers = [d for d in args.drivers.split(",") if d]
    if not drivers or set(drivers) - {"clients", "many"}:
        raise SystemExit(f"splitnet bench pipeline: --drivers takes clients and/or many, got {args.drivers!r}")
    if "clients" not in drivers and 1 not in concurrency:
        raise SystemExit("splitnet bench pipeline: --drivers many alone needs 1 in --concurrency (the one-sequence figure)")

    threads = args.cpus_per_stage or args.torch_threads
    torch.set_num_threads(max(1, threads))  # the baselines get the threads of one stage
    bandwidth = hf_baselines.device_bandwidth_gb_s(args.device, threads)
    base = hf_baselines.measure(model_dir, args.device, args.dtype, prompt, decode_prompts, args.new_tokens, args.repeats, kinds,
                                check_prompts=decode_prompts[: args.check_sequences]) if kinds else {}
    ref_decode: list[list[int]] = base.get("reference_decode_tokens", [])
    weight_bytes = base.get("weight_bytes") or sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    extra = ["--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)]
    if args.device.startswith("cuda"):
        extra.append("--shared-device")  # every stage on this one GPU
    stage_cpus = disjoint_cpus(args.stages, args.cpus_per_stage) if args.cpus_per_stage else []
    results: dict = {"prefill": [], "decode": [], "decode_many": []}
    import splitnet
    from splitnet.edge.config import ClientConfig

    with launch_pipeline(str(model_dir), cuts, torch_threads=threads, extra_args=extra, stage_cpus=stage_cpus, ready_timeout_s=600) as pipe:
        first_tokens = None
        for chunk in chunks:
            ccfg = ClientConfig(timeout_s=600, prefill_chunk_tokens=chunk or args.prompt_tokens)
            with splitnet.connect(pipe.endpoints, config=ccfg) as s:
                s.generate(prompt[:8], 2)  # warm-up
                s.generate(prompt, 4)
                ttft, per_tok, wire = [], [], []
                for _ in range(args.repeats):
                    r = s.generate(prompt, args.new_tokens)
                    step_ms = _stage_step_ms(r.stats.get("decode_stage_ms", {}))
                    ttft.append(r.ttft_ms)
                    per_tok.append((r.latency_ms - r.ttft_ms) / max(1, args.new_tokens - 1))
                    wire.append(r.stats["prefill"]["wire_bytes"])
                    first_tokens = first_tokens or list(r.tokens)
            results["prefill"].append({
                "chunk_tokens": chunk or args.prompt_tokens,
                "ttft_ms": round(statistics.median(ttft), 2),
                "decode_ms_per_token": round(statistics.median(per_tok), 3),
                "prefill_wire_bytes": int(statistics.median(wire)),
                "stage_step_ms": step_ms,
            })
        teacher = _teacher_forced_argmax(pipe.endpoints, prompt + base["reference_tokens"]) if "reference_tokens" in base else None
        for n in concurrency:
            if "clients" in drivers or n == 1:  # one sequence: the clients run is the single-sequence figure
                _clients(pipe.endpoints, decode_prompts[:n], 4)  # warm-up: these batch shapes
                before = _stage_stats(pipe.endpoints)
                tokens, wall, per_tok, step_ms = _clients(pipe.endpoints, decode_prompts[:n], args.new_tokens)
                deltas = _stage_deltas(before, _stage_stats(pipe.endpoints), wall)
                checked = [tokens[i] == ref_decode[i] for i in range(min(n, len(ref_decode)))]
                diverge = [hf_baselines.first_divergence(tokens[i], ref_decode[i]) for i in range(min(n, len(ref_decode)))]
                results["decode"].append({
                    "clients": n, "tokens": sum(len(t) for t in tokens), "seconds": round(wall, 3),
                    "tokens_per_s": round(sum(len(t) for t in tokens) / wall, 1),
                    "ms_per_token_median": round(statistics.median(per_tok), 3),
                    **deltas, "stage_step_ms_client_0": step_ms,
                    "tokens_checked": len(checked), "tokens_identical": sum(checked), "first_divergence": diverge,
                })
            if "many" in drivers and n > 1:
                _many(pipe.endpoints, decode_prompts[:n], 4)  # warm-up
                before = _stage_stats(pipe.endpoints)
                tokens, wall, per_tok, batched, step_ms = _many(pipe.endpoints, decode_prompts[:n], args.new_tokens)
                deltas = _stage_deltas(before, _stage_stats(pipe.endpoints), wall)
                checked = [tokens[i] == ref_decode[i] for i in range(min(n, len(ref_decode)))]
                results["decode_many"].append({
                    "sequences": n, "client_processes": 1, "batch_messages": batched, "tokens": sum(len(t) for t in tokens),
                    "seconds": round(wall, 3), "tokens_per_s": round(sum(len(t) for t in tokens) / wall, 1),
                    "ms_per_token_median": round(statistics.median(per_tok), 3), **deltas, "stage_step_ms_sequence_0": step_ms,
                    "tokens_checked": len(checked), "tokens_identical": sum(checked),
                    "first_divergence": [hf_baselines.first_divergence(tokens[i], ref_decode[i]) for i in range(min(n, len(ref_decode)))],
                })
    if teacher is not None:
        ref = base["reference_teacher_argmax"]
        results["teacher_forced"] = {"positions": len(ref), "argmax_agreement": round(sum(a == b for a, b in zip(teacher, ref)) / len(ref), 4),
                                     "decode_positions_agreement": round(sum(a == b for a, b in zip(teacher[len(prompt) - 1:], ref[len(prompt) - 1:])) / max(1, len(ref) - len(prompt) + 1), 4)}
    return _document(args, model_dir, pipe, base, bandwidth, weight_bytes, results, first_tokens)


def _document(args, model_dir, pipe, base: dict, bandwidth: float, weight_bytes: int, results: dict, first_tokens) -> dict:
    from splitnet.bench import hf_baselines

    S = args.stages
    whole = next(p for p in results["prefill"] if p["chunk_tokens"] == args.prompt_tokens)
    best = min(results["prefill"], key=lambda p: p["ttft_ms"])
    k = -(-args.prompt_tokens // best["chunk_tokens"])
    ideal = S * k / (k + S - 1)
    speedup = whole["ttft_ms"] / best["ttft_ms"]
    one = next((d for d in results["decode"] if d["clients"] == 1), None)
    top = max(results["decode"], key=lambda d: d["clients"])
    limit_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    split_ms = (one or {}).get("ms_per_token_median", min(p["decode_ms_per_token"] for p in results["prefill"]))
    summary = {
        "split_ms_per_token_1_seq": split_ms,
        "bandwidth_limit_ms_per_token": round(limit_ms, 3),
        "split_over_bandwidth_limit": round(split_ms / limit_ms, 3),
        "chunked_prefill_speedup": round(speedup, 3),
        "chunked_prefill_ideal": round(ideal, 3),
        "chunked_prefill_efficiency": round(speedup / ideal, 3),
        "chunked_prefill_efficiency_vs_stages": round(speedup / S, 3),
        "decode_tokens_per_s_1": one["tokens_per_s"] if one else None,
        f"decode_tokens_per_s_{top['clients']}": top["tokens_per_s"],
        "decode_concurrency_ratio": round(top["tokens_per_s"] / one["tokens_per_s"], 3) if one and top["clients"] > 1 else None,
        "decode_concurrency_ratio_over_ideal": round(top["tokens_per_s"] / one["tokens_per_s"] / min(top["clients"], S if S > 1 else top["clients"]), 3) if one and top["clients"] > 1 else None,
    }
    if "teacher_forced" in results:
        summary["teacher_forced_argmax_agreement"] = results["teacher_forced"]["argmax_agreement"]
    if "reference_tokens" in base:
        summary["tokens_identical_1_seq"] = first_tokens == base["reference_tokens"]
        summary["first_divergence_1_seq"] = hf_baselines.first_divergence(first_tokens or [], base["reference_tokens"])
        if "compiled" in base:  # the noise floor: transformers' own compiled run against its eager one
            summary["transformers_compiled_first_divergence"] = base["compiled"]["first_divergence_from_eager"]
        runs = results["decode"] + results.get("decode_many", [])
        summary["tokens_identical_decode"] = f"{sum(d['tokens_identical'] for d in runs)}/{sum(d['tokens_checked'] for d in runs)}"
    for kind in ("eager", "compiled"):
        if kind in base:
            summary[f"split_over_{kind}_1_seq"] = round(split_ms / base[kind]["ms_per_token"], 3)
            key = f"batch_{base[kind]['batch']}_tokens_per_s"
            if base[kind]["batch"] == top["clients"]:
                summary[f"split_over_{kind}_batch_{top['clients']}"] = round(top["tokens_per_s"] / base[kind][key], 3)
            for m in results.get("decode_many", []):
                if base[kind]["batch"] == m["sequences"]:
                    summary[f"split_many_over_{kind}_batch_{m['sequences']}"] = round(m["tokens_per_s"] / base[kind][key], 3)
    for m in results.get("decode_many", []):
        n = m["sequences"]
        summary[f"decode_many_tokens_per_s_{n}"] = m["tokens_per_s"]
        if one:
            summary[f"decode_many_concurrency_ratio_{n}"] = round(m["tokens_per_s"] / one["tokens_per_s"], 3)
        clients = next((d for d in results["decode"] if d["clients"] == n), None)
        if clients is not None:
            summary[f"many_over_clients_{n}"] = round(m["tokens_per_s"] / clients["tokens_per_s"], 3)
    return {
        "config": {k: getattr(args, k) for k in ("model", "stages", "device", "dtype", "torch_threads", "cpus_per_stage", "prompt_tokens",
                                                 "new_tokens", "concurrency", "decode_prompt_tokens", "repeats", "max_batch_size", "batch_wait_ms",
                                                 "drivers")},
        "model_dir": str(model_dir),
        "cuts": [st.blocks[0] for st in pipe.stages[1:]],
        "stages": [{"index": st.index, "blocks": list(st.blocks), "pid": st.pid} for st in pipe.stages],
        "device_copy_bandwidth_gb_s": round(bandwidth, 1),
        "weight_bytes": weight_bytes,
        "baselines": {k: v for k, v in base.items() if k not in ("reference_tokens", "reference_decode_tokens", "reference_teacher_argmax")},
        **results,
        "summary": summary,
    }


def summarize(doc: dict) -> str:
    s, c = doc["summary"], doc["config"]
    lines = [f"{c['model']} in {c['stages']} stages on {c['device']} ({c['dtype']}), batching up to {c['max_batch_size']}"]
    lines.append(f"bandwidth limit {s['bandwidth_limit_ms_per_token']} ms/token ({doc['weight_bytes'] / 1e9:.2f} GB at {doc['device_copy_bandwidth_gb_s']} GB/s)")
    for kind, b in doc["baselines"].items():
        if isinstance(b, dict):
            tps = b["batch_%d_tokens_per_s" % b["batch"]]
            lines.append(f"transformers {kind}: TTFT {b['ttft_ms']} ms, {b['ms_per_token']} ms/token, batch {b['batch']}: {tps} tokens/s")
    for p in doc["prefill"]:
        lines.append(f"prefill chunk {p['chunk_tokens']:>5}: TTFT {p['ttft_ms']} ms, decode {p['decode_ms_per_token']} ms/token")
    for d in doc["decode"]:
        lines.append(f"decode {d['clients']:>3} clients: {d['tokens_per_s']} tokens/s, busy {d['stage_busy_fraction']}, mean batch {d['stage_mean_batch']}, "
                     f"tokens identical {d['tokens_identical']}/{d['tokens_checked']}")
    for m in doc.get("decode_many", []):
        lines.append(f"decode {m['sequences']:>3} sequences, one generate_many process: {m['tokens_per_s']} tokens/s, busy {m['stage_busy_fraction']}, "
                     f"mean batch {m['stage_mean_batch']}, batch messages in {m['stage_batch_messages_in']}, tokens identical {m['tokens_identical']}/{m['tokens_checked']}")
    lines.append(f"chunked prefill x{s['chunked_prefill_speedup']} (ideal x{s['chunked_prefill_ideal']}); concurrency ratio x{s['decode_concurrency_ratio']}")
    return "\n".join(lines)
