"""``splitnet demo``: a real multi-process pipeline on localhost, checked against the unsplit model.

Default: the real all-MiniLM-L6-v2 cut into 3 stage processes, embedding real sentences.
``--generate``: a GPT-2-architecture decoder (built-in ``tiny-gpt2``) generating greedy tokens
through the stages with KV caches, checked against Hugging Face transformers' own ``generate``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SENTENCES = [
    "The edge device runs the first layers and sends compressed features to the cloud.",
    "A heartbeat that goes silent means the stage process or its link is down.",
    "Python's standard library ships a module for nearly every everyday task.",
    "Bandwidth between a phone and the cloud is the scarce resource in split inference.",
    "The quick brown fox jumps over the lazy dog.",
    "Vector quantization replaces each feature vector by the index of its nearest codeword.",
    "Transformers process every token of the prompt in parallel during prefill.",
    "Mount Everest is the highest mountain above sea level.",
]

PROMPT = "def fibonacci(n):\n    "


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a real multi-process split pipeline on localhost and check it")
    p.add_argument("--generate", action="store_true", help="decoder demo: greedy generation through the stages")
    p.add_argument("--model", default=None, help="model (default: minilm, or tiny-gpt2 with --generate)")
    p.add_argument("--stages", type=int, default=3, help="number of stage processes (default 3)")
    p.add_argument("--codec", default="", help="codec on every cut (e.g. fp16, int8); default raw fp32")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats for the latency figure")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff allowed against the unsplit model")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import splitnet
    from splitnet.errors import SplitnetError
    from splitnet.runtime.launcher import launch_pipeline

    from splitnet.runtime.preflight import check_codec_spec

    model = args.model or ("tiny-gpt2" if args.generate else "minilm")
    try:
        check_codec_spec(args.codec, "--codec")  # before any process starts
    except SplitnetError as e:
        print(f"splitnet demo: {e}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"splitnet demo: starting {args.stages} stage processes for {model} on 127.0.0.1 (plaintext, loopback only) ...", flush=True)
    try:
        t0 = time.perf_counter()
        from splitnet.model.loading import architecture_for, resolve_model_dir
        from splitnet.model.weights import read_config
        from splitnet.runtime.launcher import even_cuts

        L = architecture_for(read_config(resolve_model_dir(model))).num_blocks
        cuts = even_cuts(L, args.stages)
        # local stages on 127.0.0.1 serve plaintext (--insecure); their own logs stay quiet
        with launch_pipeline(model, cuts, codecs=[args.codec] * len(cuts), extra_args=["--log-level", "ERROR"]) as pipe:
            startup_s = time.perf_counter() - t0
            with splitnet.connect(pipe.endpoints, timeout_s=60) as session:
                doc = _generate(session, model, args) if args.generate else _infer(session, model, args)
            doc["stages"] = [
                {"index": s.index, "blocks": list(s.blocks), "pid": s.pid, "endpoint": s.endpoint} for s in pipe.stages
            ]
            doc["startup_s"] = round(startup_s, 2)
    except SplitnetError as e:
        print(f"splitnet demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    doc = {"model": model, "codec": args.codec or "raw", **doc}
    doc["client_pid"] = __import__("os").getpid()
    ok = doc["outputs_match"]
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(_report(doc))
    return 0 if ok else 1


def _infer(session, model: str, args) -> dict:
    import numpy as np

    from splitnet.model import load_model

    out = session.infer({"text": SENTENCES})
    lat = []
    for _ in range(max(1, args.repeats)):
        session.infer({"text": SENTENCES})
        lat.append(session.last_stats["latency_ms"])
    stats = session.last_stats
    bm = load_model(model)
    ref = bm.full()(bm.tokenize(SENTENCES, max_length=256))["embedding"].numpy()
    diff = float(np.abs(out["embedding"] - ref).max())
    cos = (out["embedding"] * ref).sum(-1) / (np.linalg.norm(out["embedding"], axis=-1) * np.linalg.norm(ref, axis=-1))
    tol = args.tolerance if not args.codec else max(args.tolerance, 5e-2)
    return {
        "task": f"embed {len(SENTENCES)} sentences",
        "outputs_match": bool(diff <= tol),
        "max_abs_diff": diff,
        "min_cosine": float(cos.min()),
        "tolerance": tol,
        "output_shape": list(out["embedding"].shape),
        "wire_bytes": stats["wire_bytes"],
        "cut_bytes": stats["cut_bytes"],
        "client_to_stage0_bytes": stats["client_to_stage0_bytes"],
        "result_bytes": stats["result_bytes"],
        "latency_ms": round(statistics.median(lat), 2),
        "latency_ms_runs": [round(x, 2) for x in lat],
        "trace": stats["trace"],
    }


def _reference_generate(model: str, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
    """Greedy tokens of the unsplit model: HF transformers' generate when it can load the
    architecture, else splitnet's own unsplit model without KV cache."""
    import torch

    from splitnet.model import load_model, resolve_model_dir

    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(model))).eval()
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist(), f"transformers {transformers.__version__} {type(ref).__name__}.generate"
    except ImportError:
        pass
    full = load_model(model).full()
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(full({"input_ids": torch.tensor([ids])})["logits"].argmax(-1)))
    return ids[len(prompt_ids):], "splitnet unsplit model, full recompute"


def _generate(session, model: str, args) -> dict:
    n = args.max_new_tokens
    res = session.generate(args.prompt, n)
    ref, ref_name = _reference_generate(model, res.prompt_ids, n)
    computed = res.stats.get("tokens_computed", [])
    prompt_len = len(res.prompt_ids)
    with_cache = prompt_len + n - 1
    without_cache = sum(prompt_len + i for i in range(n))
    return {
        "task": f"greedy generation of {n} tokens",
        "prompt": args.prompt,
        "prompt_tokens": prompt_len,
        "tokens": res.tokens,
        "reference_tokens": ref,
        "reference": ref_name,
        "outputs_match": res.tokens == ref,
        "max_abs_diff": 0.0 if res.tokens == ref else None,
        "text": res.text,
        "kv_cache": {
            "tokens_computed_per_stage": computed,
            "expected_with_cache": with_cache,
            "would_be_without_cache": without_cache,
            "used": bool(computed) and all(c == with_cache for c in computed),
        },
        "wire_bytes": res.stats["prefill"]["wire_bytes"] + res.stats.get("decode_wire_bytes", 0),
        "prefill_wire_bytes": res.stats["prefill"]["wire_bytes"],
        "decode_wire_bytes": res.stats.get("decode_wire_bytes", 0),
        "latency_ms": round(res.latency_ms, 2),
        "ttft_ms": round(res.ttft_ms, 2),
        "ms_per_token": round((res.latency_ms - res.ttft_ms) / max(1, n - 1), 2),
    }


def _report(doc: dict) -> str:
    lines = [f"model      {doc['model']}   codec on cuts: {doc['codec']}   client pid {doc['client_pid']}", "stages"]
    for s in doc["stages"]:
        lines.append(f"  [{s['index']}] blocks {s['blocks'][0]}:{s['blocks'][1]}   pid {s['pid']:<7}  {s['endpoint']}")
    if "cut_bytes" in doc:
        cuts = ", ".join(f"{b} B" for b in doc["cut_bytes"])
        lines.append(f"task       {doc['task']}")
        lines.append(f"bytes      client->stage0 {doc['client_to_stage0_bytes']} B; per cut {cuts}; result {doc['result_bytes']} B; total {doc['wire_bytes']} B")
        lines.append(f"latency    {doc['latency_ms']} ms (median of {len(doc['latency_ms_runs'])})   startup {doc['startup_s']} s")
        lines.append(f"check      max |split - unsplit| = {doc['max_abs_diff']:.2e} (tolerance {doc['tolerance']:.0e}), min cosine {doc['min_cosine']:.6f}")
    else:
        kv = doc["kv_cache"]
        lines.append(f"task       {doc['task']} from a {doc['prompt_tokens']}-token prompt")
        lines.append(f"text       {doc['text']!r}")
        lines.append(f"tokens     {doc['tokens']}")
        lines.append(f"reference  {doc['reference_tokens']}  ({doc['reference']})")
        lines.append(f"kv cache   tokens computed per stage {kv['tokens_computed_per_stage']} (without cache: {kv['would_be_without_cache']})")
        lines.append(f"bytes      prefill {doc['prefill_wire_bytes']} B, decode {doc['decode_wire_bytes']} B")
        lines.append(f"latency    {doc['latency_ms']} ms total, first token {doc['ttft_ms']} ms, {doc['ms_per_token']} ms/token   startup {doc['startup_s']} s")
    lines.append("RESULT     " + ("outputs match the unsplit model" if doc["outputs_match"] else "MISMATCH against the unsplit model"))
    return "\n".join(lines)
