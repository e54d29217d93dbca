"""Measure a :class:`~splitnet.planner.profiles.ModelProfile` on this machine.

For each part of the model chain (embed, every block, head) and each token count: warm-up runs, then
``repeats`` timed runs, median kept. For each cut: the feature's size, and for each codec that can
run without fitting (or with a saved codebook), its honest wire bytes (``payload.nbytes``), encode and
decode time and the fidelity it keeps (mean cosine between the model's outputs with and without the
codec at that cut).
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Sequence

from splitnet.errors import ConfigError
from splitnet.planner.profiles import DEFAULT_CODECS, BlockProfile, CodecOption, ModelProfile

DEFAULT_TOKENS = (1, 32, 128)
PROFILED_CODECS = ("fp16", "int8", "int4")


def median_ms(fn, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _first_input(bm, tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    if bm.kind == "vision":
        cfg = bm.arch.config
        size = int(cfg.get("image_size", 8))
        ch = int(cfg.get("num_channels", 1))
        return {"pixel_values": torch.randn(1, ch, size, size, generator=g)}
    if bm.kind == "sequential":
        return {"x": torch.randn(1, tokens, bm.hidden_size, generator=g)}
    vocab = int(bm.arch.config.get("vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out_tensor(out: dict):
    import torch

    for k in ("hidden", "embedding", "logits", "pooled"):
        if isinstance(out.get(k), torch.Tensor):
            return out[k]
    return next(v for v in out.values() if isinstance(v, torch.Tensor))


def _cos(a, b) -> float:
    import torch

    a = a.reshape(a.shape[0], -1).float() if a.dim() > 1 else a.reshape(1, -1).float()
    b = b.reshape(a.shape).float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def profile_model(model: Any, tokens: Sequence[int] = DEFAULT_TOKENS, repeats: int = 5, warmup: int = 2,
                  codecs: Sequence[str] = PROFILED_CODECS, codec_tokens: int = 128, threads: int | None = 1,
                  progress: bool = True) -> ModelProfile:
    """Profile ``model`` (a name/path for :func:`splitnet.model.load_model`, or a loaded BlockModel)."""
    import numpy as np
    import torch

    from splitnet.model import load_model

    if threads:
        torch.set_num_threads(int(threads))
    bm = load_model(model) if isinstance(model, str) else model
    L = bm.num_blocks
    if bm.kind == "vision":
        tokens = (1,)  # an image is one request of fixed size; "tokens" are patches, set by the model
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    steps = len(tokens) * (L + 2) + L * len(codecs)
    bar = tqdm(total=steps, desc=f"profile {bm.name}", disable=not progress) if tqdm else None

    def tick():
        if bar:
            bar.update(1)

    embed_ms: dict[int, float] = {}
    block_ms: list[dict[int, float]] = [{} for _ in range(L)]
    head_ms: dict[int, float] = {}
    feats: dict[int, list] = {}  # tokens -> hidden leaving each block
    head_out = None
    seq_len = {}
    with torch.no_grad():
        for T in tokens:
            inp = _first_input(bm, T)
            embed_ms[T] = median_ms(lambda: bm.embed(inp, 0), warmup, repeats)
            h, ctx = bm.embed(inp, 0)
            seq_len[T] = h.shape[1] if h.dim() == 3 else 1
            tick()
            hs = []
            for i in range(L):
                blk = bm.blocks[i]
                h_in = h
                block_ms[i][T] = median_ms(lambda: blk(h_in, ctx, None, i), warmup, repeats)
                h = blk(h_in, ctx, None, i)
                hs.append(h)
                tick()
            feats[T] = (hs, ctx)
            head_ms[T] = median_ms(lambda: bm.head(h, ctx), warmup, repeats)
            head_out = _out_tensor(bm.head(h, ctx))
            tick()
    # KV bytes per token of context for decoders (keys + values in the block's dtype)
    def pbytes(mod) -> int:
        return int(sum(p.numel() * p.element_size() for p in mod.parameters())) if mod is not None else 0

    elem = next(bm.blocks[0].parameters()).element_size()
    kv = 2.0 * bm.hidden_size * elem if bm.kind == "decoder" else 0.0

    # codecs at each cut, on the largest token count
    Tc = codec_tokens if codec_tokens in feats else max(feats)
    hs, ctx = feats[Tc]
    ref_out = None
    codec_costs: list[dict] = [{} for _ in range(L)]
    measured: list[str] = []
    if codecs and L > 1:
        try:
            from splitnet.codecs import make_codec
        except ImportError:
            make_codec = None
        if make_codec is not None:
            with torch.no_grad():
                ref_out = _out_tensor(bm.stage(0, L)(_first_input(bm, Tc)))
                for k in range(L - 1):
                    x = hs[k]
                    xn = x.detach().float().cpu().numpy()
                    ntok = int(np.prod(xn.shape[:-1]))
                    for name in codecs:
                        try:
                            codec = make_codec(name)
                            if getattr(codec, "needs_fit", False):
                                continue
                            enc_ms = median_ms(lambda: codec.encode(xn), 1, max(1, repeats // 2))
                            payload = codec.encode(xn)
                            dec_ms = median_ms(lambda: codec.decode(payload), 1, max(1, repeats // 2))
                            xd = torch.from_numpy(np.asarray(codec.decode(payload), dtype=np.float32)).reshape(x.shape)
                            rest = {"hidden": xd.to(x.dtype), **bm.arch.carry(ctx)}
                            out = _out_tensor(bm.stage(k + 1, L)(rest))
                            codec_costs[k][name] = {
                                "bytes_per_token": round(payload.nbytes / ntok, 3),
                                "encode_ms_per_token": round(enc_ms / ntok, 6),
                                "decode_ms_per_token": round(dec_ms / ntok, 6),
                                "fidelity": round(min(1.0, max(0.0, _cos(out, ref_out))), 6),
                            }
                            if name not in measured:
                                measured.append(name)
                        except (ConfigError, ValueError, ImportError, NotImplementedError) as e:
                            codec_costs[k].setdefault("_errors", []).append(f"{name}: {e}")
                        tick()
            for cc in codec_costs:
                cc.pop("_errors", None)
    if bar:
        bar.close()

    def tok_map(d: dict[int, float]) -> dict[int, float]:
        # keyed by the sequence length the blocks actually saw
        return {int(seq_len[t]): round(ms, 5) for t, ms in d.items()}

    C = bm.hidden_size
    blocks = []
    for i in range(L):
        x = feats[max(feats)][0][i]
        ch = int(x.shape[-1])
        blocks.append(BlockProfile(i, tok_map(block_ms[i]), pbytes(bm.blocks[i]), ch,
                                   out_bytes_per_token=float(ch * x.element_size()), kv_bytes_per_token=kv,
                                   codec_costs={k: v for k, v in codec_costs[i].items()}))
    ho = head_out
    head_ch = int(ho.shape[-1])
    head_all = ho.dim() == 3 and ho.shape[1] > 1
    embed = BlockProfile(-1, tok_map(embed_ms), pbytes(bm.embed), C)
    head = BlockProfile(L, tok_map(head_ms), pbytes(bm.head), head_ch, out_bytes_per_token=float(head_ch * 4))
    names = {c.name for c in DEFAULT_CODECS}
    opts = list(DEFAULT_CODECS)
    for m in measured:
        if m not in names:
            opts.append(CodecOption(m))
    try:
        mhash = bm.fingerprint()
    except Exception:  # noqa: BLE001 - a model without a fingerprint still profiles
        mhash = ""
    src = (f"measured by splitnet profile on {_cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} "
           f"thread(s), median of {repeats} after {warmup} warm-up, {time.strftime('%Y-%m-%d')}")
    if bm.kind == "decoder":
        src += "; decode_ms = prefill at 1 token (no KV cache measured); kv_bytes_per_token = 2 * hidden * dtype"
    return ModelProfile(bm.name, bm.kind, tuple(blocks), embed, head, model_hash=mhash,
                        reference_device=f"{_cpu_name()} x{torch.get_num_threads()} thread(s)",
                        return_tokens="all" if head_all else "last", codecs=tuple(opts), source=src)
