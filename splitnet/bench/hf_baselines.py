"""What a user would run instead of splitnet: the whole model in transformers, on the same device.

- ``eager``: ``AutoModelForCausalLM`` with its ``DynamicCache``, a greedy loop (one forward a token);
- ``compiled``: ``generate`` with a static cache and ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs), as transformers' docs recommend for fast decoding.

Each reports time to first token, ms per decoded token for one sequence, and tokens/s for a
batch of equal-length prompts; the eager run also gives the reference greedy tokens.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load(model_dir: Path, device: str, dtype: str):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model


def greedy_eager(model, prompts: list[list[int]], n_new: int, device: str) -> tuple[list[list[int]], float, float]:
    """(tokens per prompt, ttft_ms, decode ms per step) for prompts of one length, as one batch."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor(prompts, device=device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        tok = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n_new - 1):
            tok = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
        _sync(device)
        t2 = time.perf_counter()
    tokens = torch.cat(out, 1).tolist()
    return tokens, (t1 - t0) * 1e3, (t2 - t1) * 1e3 / max(1, n_new - 1)


def generate_compiled(model, prompts: list[list[int]], n_new: int, device: str) -> tuple[list[list[int]], float, float]:
    """(tokens, ttft_ms, decode ms per step) of ``generate`` with a static cache, its decode
    steps compiled with CUDA graphs; steps are timed as the tokens reach a streamer."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import CompileConfig
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(prompts, device=device)
    gc = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, cache_implementation="static",
                          compile_config=CompileConfig(mode="reduce-overhead"), pad_token_id=0)
    clock = Clock()
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, generation_config=gc, streamer=clock)
        _sync(device)
    t = clock.times[1:]  # the first put is the prompt
    per_step = (t[-1] - t[1]) / max(1, len(t) - 2) * 1e3 if len(t) > 2 else float("nan")
    return out[:, ids.shape[1]:].tolist(), (t[0] - t0) * 1e3, per_step


def measure(model_dir: Path, device: str, dtype: str, prompt: list[int], batch_prompts: list[list[int]], n_new: int, repeats: int,
            kinds: list[str], check_prompts: list[list[int]] = ()) -> dict:
    """Every baseline in ``kinds`` ("eager", "compiled") on ``prompt`` alone and on ``batch_prompts``;
    with the model loaded once, also the eager greedy tokens of each of ``check_prompts`` alone
    (``reference_decode_tokens``)."""
    import torch

    model = load(model_dir, device, dtype)
    doc: dict = {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    try:
        doc["reference_decode_tokens"] = [greedy_eager(model, [p], n_new, device)[0][0] for p in check_prompts]
        if "eager" in kinds:
            runs = [greedy_eager(model, [prompt], n_new, device) for _ in range(repeats + 1)][1:]
            doc["eager"] = {"ttft_ms": round(statistics.median(r[1] for r in runs), 2),
                            "ms_per_token": round(statistics.median(r[2] for r in runs), 3)}
            doc["reference_tokens"] = runs[0][0][0]
            with torch.no_grad():  # teacher-forced: transformers' greedy choice at every position of prompt + its tokens
                seq = torch.tensor([prompt + doc["reference_tokens"]], device=device)
                doc["reference_teacher_argmax"] = model(input_ids=seq).logits[0].argmax(-1).tolist()
            batch = [greedy_eager(model, batch_prompts, n_new, device) for _ in range(2)][1]
            doc["eager"][f"batch_{len(batch_prompts)}_tokens_per_s"] = round(len(batch_prompts) * 1e3 / batch[2], 1)
            doc["eager"]["batch"] = len(batch_prompts)
        if "compiled" in kinds:
            res: dict = {"batch": len(batch_prompts)}
            for label, ps in (("one", [prompt]), ("batch", batch_prompts)):
                t_compile = time.perf_counter()
                generate_compiled(model, ps, n_new, device)  # compile and capture the graphs
                res[f"{label}_warmup_s"] = round(time.perf_counter() - t_compile, 1)
                runs = [generate_compiled(model, ps, n_new, device) for _ in range(repeats)]
                per_step = statistics.median(r[2] for r in runs)
                if label == "one":
                    res.update(ttft_ms=round(statistics.median(r[1] for r in runs), 2), ms_per_token=round(per_step, 3))
                    res["tokens_equal_eager"] = runs[0][0][0] == doc.get("reference_tokens")
                    res["first_divergence_from_eager"] = first_divergence(runs[0][0][0], doc.get("reference_tokens") or [])
                    res["compiled_applied"] = hasattr(model, "_compiled_call")  # transformers compiles only where it can (CUDA)
                else:
                    res[f"batch_{len(ps)}_tokens_per_s"] = round(len(ps) * 1e3 / per_step, 1)
            doc["compiled"] = res
    finally:
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return doc


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two greedy runs differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def device_bandwidth_gb_s(device: str, threads: int, nbytes: int = 1 << 30) -> float:
    """Memory bandwidth as a large device-to-device copy moves it (bytes read + written per second)."""
    import torch

    if not device.startswith("cuda"):
        torch.set_num_threads(max(1, threads))
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / min(times[1:]) / 1e9
