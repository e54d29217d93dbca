"""e2e, LM workload: stdlib-gpt split into an edge and a cloud part over shaped links in the netns lab.

``splitnet bench e2e --workload lm``. The lab, the link shaping (tc tbf with a small bucket), the
RTT (a relay in the edge host, half the RTT each way), the cgroup CPU quota of the edge device and
the planner comparison are the vision workload's (:mod:`splitnet.bench.e2e`). A request is one
held-out prompt (``--prompt-tokens`` tokens of the model's held-out stdlib files) + ``--new-tokens``
greedy tokens; the client in the edge host (:mod:`splitnet.bench.e2e_lm_client`) times TTFT and the
total, and reads the edge veth's counters at the start, at the first token and at the last one
(bytes of the prefill phase and of the decode phase). Options, each at every point:

* cloud-only: the prompt's token ids to one cloud stage holding the whole model (``splitnet
  serve-stage`` blocks [0, L)), every decoded token one round trip (``session.stream``);
* edge-only: the whole model in the edge client, KV cache, greedy (no network);
* split@CUT:CODEC: an edge stage [0, CUT) with the codec on the cut (``--codec-out``) and a cloud
  stage [CUT, L), driven by :func:`splitnet.connect` (``session.stream``).

Codecs are fitted on cut features of calibration windows from the model's TRAINING files
(:func:`splitnet.bench.lm_data.lm_data`, the fit of ``bench lm``: :func:`splitnet.bench.lm._fit`);
the measured prompts and the profile's prompts are disjoint rows drawn from its HELD-OUT files.
Fidelity is greedy positional agreement with the unsplit model (in process, on the same prompts).

The planner's prediction uses the cost model (:func:`splitnet.planner.cost.evaluate`) as is:
``Workload(prefill_tokens=P, decode_steps=N - 1)``: the prefill is one pass of P tokens, each of
the N - 1 decode steps pays every block's one-token step time, its cut message (encode + bytes +
RTT/2 + decode) and the reply's trip back (RTT/2). The per-block prefill and step times are
measured in this run on each core, and each codec's message bytes in prefill and per decode step
are measured with the SDK's wire format (:mod:`splitnet.bench.lm_split`) and fitted exactly by the
model's two parameters (``bytes_per_token``, ``bytes_per_message``; :func:`message_fit`).
Cloud-only is outside the cost model (the client sits on the first stage's device), so it is
predicted by :func:`predict_cloud_only` with the same link arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from splitnet.errors import ConfigError

MODEL = "stdlib-gpt"
DEFAULT_CODECS = ("fp16", "int8", "topk:k=32", "pq:m=48/nbits=8", "rvq:stages=40/nbits=8", "alignedvq:stages=8/nbits=8")
QUICK_CODECS = ("fp16", "int8", "rvq:stages=4/nbits=8")
QUICK_BANDWIDTHS = (1.0, 50.0)
DEFAULT_CUTS = (1, 2, 3, 4, 5)
QUICK_CUTS = (1, 2)
#: the quota period of the LM's edge device: a decode step is a few ms of compute, so a short period
#: spreads the quota over it instead of letting a whole step run unthrottled at the start of a period
LM_CGROUP_PERIOD_MS = 5.0
#: the bar of the issue (#17) for the planner
GOAL_CHOICE_WITHIN = 0.10
GOAL_MAPE_PCT = 15.0
#: bytes of the cloud stage's reply per step (token id + header), a modelling figure: every reply
#: is below the tbf bucket, so the cost model charges it RTT/2 and the link overhead only
REPLY_BYTES = 160.0
#: profile prompts' decode-step ms are the mean over this many steps after a prefill
PROFILE_REPEATS = 3


def add_lm_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lm workload (--workload lm)")
    g.add_argument("--prompts", type=int, help="lm: held-out prompts the requests cycle through (default 16; --quick 4)")
    g.add_argument("--profile-prompts", type=int, help="lm: other held-out prompts for the codec profile's fidelity (default 32; --quick 8)")
    g.add_argument("--prompt-tokens", type=int, help="lm: tokens per prompt (default 128; --quick 32)")
    g.add_argument("--new-tokens", type=int, help="lm: greedy tokens per request (default 32; --quick 16)")
    g.add_argument("--calibration-windows", type=int, help="lm: training-file windows the codecs are fitted on (default 120; --quick 16)")
    g.add_argument("--max-train", type=int, help="lm: calibration vectors a k-means / PQ / RVQ fit sees (default 25000; --quick 2000)")


def config(a: argparse.Namespace) -> dict:
    """The LM run's settings, checked before any work (codec names and settings included)."""
    from splitnet.bench import e2e
    from splitnet.bench.codec_specs import split_codec_specs
    from splitnet.bench.lm import _settings

    q = a.quick
    codecs = split_codec_specs(a.codecs) if a.codecs else list(QUICK_CODECS if q else DEFAULT_CODECS)
    try:
        settings = _settings(",".join(c.replace(",", "/") for c in codecs))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--codecs: {e}") from e
    cfg = {
        "workload": "lm",
        "quick": bool(q),
        "model": MODEL,
        "bandwidths_mbit_s": e2e._floats(a.bandwidths, QUICK_BANDWIDTHS if q else e2e.DEFAULT_BANDWIDTHS),
        "rtts_ms": e2e._floats(a.rtts, e2e.QUICK_RTTS if q else e2e.DEFAULT_RTTS),
        "codecs": [s for s, _, _, _ in settings],
        "candidate_cuts": [int(c) for c in a.cuts.split(",")] if a.cuts else list(QUICK_CUTS if q else DEFAULT_CUTS),
        "cut": a.cut,
        "requests": a.requests if a.requests is not None else (2 if q else 5),
        "prompts": a.prompts if a.prompts is not None else (4 if q else 16),
        "profile_prompts": a.profile_prompts if a.profile_prompts is not None else (8 if q else 32),
        "prompt_tokens": a.prompt_tokens if a.prompt_tokens is not None else (32 if q else 128),
        "new_tokens": a.new_tokens if a.new_tokens is not None else (16 if q else 32),
        "calibration_windows": a.calibration_windows if a.calibration_windows is not None else (16 if q else 120),
        "window_tokens": 96 if q else 256,
        "max_train": a.max_train if a.max_train is not None else (2000 if q else 25000),
        "fidelity_floor": a.fidelity_floor,
        "edge_cpu_fraction": a.edge_cpu_fraction,
        "cgroup_period_ms": a.cgroup_period_ms if a.cgroup_period_ms is not None else LM_CGROUP_PERIOD_MS,
        "seed": a.seed,
    }
    e2e.check_sweep(cfg)
    for k in ("requests", "prompts", "profile_prompts", "prompt_tokens", "calibration_windows", "max_train"):
        if cfg[k] < 1:
            raise ConfigError(f"--{k.replace('_', '-')} must be >= 1")
    if cfg["new_tokens"] < 2:
        raise ConfigError("--new-tokens must be >= 2 (a prefill and at least one decode step)")
    if cfg["prompt_tokens"] < 2:
        raise ConfigError("--prompt-tokens must be >= 2")
    e2e.check_edge_share(cfg)
    if not 0.0 <= cfg["fidelity_floor"] <= 1.0:
        raise ConfigError("--fidelity-floor must be in [0, 1]")
    return cfg


# ---------------------------------------------------------------------------- pure parts
def message_fit(prefill_message_bytes: float, decode_message_bytes: float, prompt_tokens: int) -> tuple[float, float]:
    """(bytes_per_token, bytes_per_message) such that a message of T tokens costs
    ``T * bytes_per_token + bytes_per_message`` (the cost model's codec bytes) and the measured
    prefill message (``prompt_tokens`` tokens) and decode message (1 token) come out exactly.
    A prefill cheaper per token than a decode step (compact decode codes) gives bytes_per_message
    > 0; neither may go below 0 (then all bytes count per token, the prefill exact)."""
    if prompt_tokens < 2:
        raise ValueError("prompt_tokens must be >= 2 to separate per-token from per-message bytes")
    per_token = (prefill_message_bytes - decode_message_bytes) / (prompt_tokens - 1)
    per_message = decode_message_bytes - per_token
    if per_token < 0 or per_message < 0:
        return prefill_message_bytes / prompt_tokens, 0.0
    return float(per_token), float(per_message)


def per_token_ms(prefill_ms: float, step_ms: float, prompt_tokens: int, decode_steps: int) -> float:
    """A codec's time for one request spread over its tokens (the cost model charges
    ``ms_per_token * (P + steps)``): exact for this workload, whatever the per-call cost."""
    return (prefill_ms + decode_steps * step_ms) / (prompt_tokens + decode_steps)


def greedy_agreement(got: Sequence[int], want: Sequence[int]) -> float:
    """Positional agreement of two continuations over ``want``'s length (a shorter ``got`` loses the rest)."""
    want = list(want)
    if not want:
        raise ValueError("empty reference continuation")
    got = list(got)[: len(want)]
    return sum(int(a == b) for a, b in zip(got, want)) / len(want)


def phase_bytes(out: dict, prompt_tokens: int, new_tokens: int) -> dict:
    """Per request and per token: the link bytes of the prefill phase (request start to first
    token) per prompt token, of the decode phase (first to last token) per decoded token (the
    ``new_tokens - 1`` steps after the prefill), and the SDK's own count."""
    pre = np.asarray(out["link_prefill_bytes"], dtype=np.float64)
    dec = np.asarray(out["link_decode_bytes"], dtype=np.float64)
    steps = max(1, new_tokens - 1)
    return {"link_prefill_bytes_per_request": round(float(pre.mean()), 1),
            "link_prefill_bytes_per_prompt_token": round(float(pre.mean()) / prompt_tokens, 3),
            "link_decode_bytes_per_request": round(float(dec.mean()), 1),
            "link_decode_bytes_per_decoded_token": round(float(dec.mean()) / steps, 3),
            "sdk_bytes_per_request": round(float(np.mean(out["sdk_bytes"])), 1)}


def lm_stats(out: dict, ref_tokens: np.ndarray, prompt_tokens: int, new_tokens: int) -> dict:
    """Latency (TTFT and total), bytes per phase and greedy agreement of one point's requests;
    ``ref_tokens[i]``: the unsplit model's continuation of prompt i."""
    tot = np.asarray(out["total_ms"], dtype=np.float64)
    ttft = np.asarray(out["ttft_ms"], dtype=np.float64)
    agree = [greedy_agreement(t, ref_tokens[i]) for i, t in zip(out["prompt"], out["tokens"])]
    pct = lambda v, q: round(float(np.percentile(v, q)), 2)  # noqa: E731
    return {"p50_ms": pct(tot, 50), "p95_ms": pct(tot, 95), "mean_ms": round(float(tot.mean()), 2),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95), "requests": int(tot.size),
            "link_bytes_per_request": round(float(out["link_bytes_per_request"]), 1),
            **phase_bytes(out, prompt_tokens, new_tokens),
            "greedy_agreement": round(float(np.mean(agree)), 4), "identical_continuations": round(float(np.mean([a == 1.0 for a in agree])), 4),
            "load_1m": round(os.getloadavg()[0], 2), "agree": agree}


def predict_cloud_only(profile, fleet, wl, prefill_bytes: float, step_bytes: float) -> float:
    """Cloud-only with the cost model's arithmetic: the prompt's ids up (one message of
    ``prefill_bytes``), every decode step's id up (``step_bytes``), the whole model on the cloud
    device (prefill + steps), each message's reply back; every message pays the link's RTT/2 each
    way and its bucket rule (:meth:`LinkProfile.ms_for`)."""
    from splitnet.planner.cost import _block_ms

    from splitnet.bench.e2e_profile import CLOUD

    w, w_embed, w_head = _block_ms(profile, wl)
    compute = (float(w.sum()) + w_embed + w_head) / fleet.device(CLOUD).compute_speed_rel
    link = fleet.links[0]
    up = link.ms_for(prefill_bytes) + wl.decode_steps * link.ms_for(step_bytes)
    back = wl.messages * link.ms_for(float(profile.head.out_bytes_per_token))
    return compute + up + back


def predict_options(profile, fleet, wl, options: Sequence[dict], cloud_bytes: tuple[float, float], floor: float,
                    offsets_ms: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """{option name: {"predicted_ms", "allowed"}} (``allowed``: the codec's profile fidelity keeps
    ``floor``); ``offsets_ms`` by kind, as :func:`splitnet.bench.e2e_profile.calibration_offsets`."""
    from splitnet.bench.e2e_profile import CLOUD, EDGE, option_name
    from splitnet.planner.cost import Assignment, evaluate

    off = offsets_ms or {}
    L = profile.num_blocks
    out: dict[str, dict[str, Any]] = {}
    for o in options:
        name = option_name(o["kind"], o.get("cut"), o.get("setting"))
        if o["kind"] == "edge":
            ms, ok = evaluate(profile, fleet, wl, Assignment([(EDGE, 0, L)], [])).latency_ms, True
        elif o["kind"] == "cloud":
            ms, ok = predict_cloud_only(profile, fleet, wl, *cloud_bytes), True
        else:
            ms = evaluate(profile, fleet, wl, Assignment([(EDGE, 0, o["cut"]), (CLOUD, o["cut"], L)], [o["setting"]])).latency_ms
            ok = bool(profile.cut_codec_cost(o["cut"] - 1, profile.codec(o["setting"]))["fidelity"] >= floor - 1e-12)
        out[name] = {"predicted_ms": float(ms) + off.get(o["kind"], 0.0), "allowed": ok}
    return out


def planner_goal(compared: Sequence[dict]) -> dict:
    """The issue's planner bars over the sweep: the choice within 10 % of the best measured option
    at every point, and the predictions' MAPE <= 15 % (over every option and over the choices)."""
    from splitnet.bench.e2e_profile import summarize_planner

    s = summarize_planner(compared)
    return {"bar": f"at every point the planner's choice within {GOAL_CHOICE_WITHIN:.0%} of the best measured option (p50 total); "
                   f"predicted latency within {GOAL_MAPE_PCT:g} % MAPE of measured",
            "choice_within_10pct_at_every_point": bool(s["all_points_within_10pct"]),
            "mape_all_options_within_15pct": bool(s["mape_pct_all_options"] is not None and s["mape_pct_all_options"] <= GOAL_MAPE_PCT),
            "mape_planner_choice_within_15pct": bool(s["mape_pct_planner_choice"] is not None and s["mape_pct_planner_choice"] <= GOAL_MAPE_PCT),
            "met": bool(s["all_points_within_10pct"] and s["mape_pct_all_options"] is not None and s["mape_pct_all_options"] <= GOAL_MAPE_PCT)}


# ---------------------------------------------------------------------------- profiles (in process)
def _prefill_and_steps(stage, x0, steps_in, repeats: int) -> tuple[float, float]:
    """Median ms of ``stage`` on the prefill input ``x0`` (a fresh cache each time) and the mean ms
    of the one-token steps ``steps_in`` after it (median over ``repeats`` runs)."""
    import torch

    pre, step = [], []
    with torch.no_grad():
        for _ in range(repeats):
            cache = stage.new_cache()
            t0 = time.perf_counter()
            stage(x0, cache)
            pre.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            for x in steps_in:
                stage(x, cache)
            step.append((time.perf_counter() - t0) * 1e3 / max(1, len(steps_in)))
    return float(np.median(pre)), float(np.median(step))


def measure_lm_compute(bm, prompt: np.ndarray, tokens: np.ndarray, repeats: int = PROFILE_REPEATS) -> dict:
    """Per-block prefill ms (the prompt) and decode-step ms (the mean over the continuation's
    steps) of ``bm`` in the calling thread's affinity; block 0 includes the embedding and the last
    block the final norm and LM head (the model's stages). Also the whole request: the full model's
    prefill + every step, as the edge-only client runs it."""
    import torch

    ids = torch.from_numpy(np.ascontiguousarray(prompt[None], dtype=np.int64))
    step_ids = [torch.tensor([[int(t)]], dtype=torch.int64) for t in tokens[:-1]]
    x0, xs = {"input_ids": ids}, [{"input_ids": t} for t in step_ids]
    pre, step = [], []
    with torch.no_grad():
        for i in range(bm.num_blocks):
            st = bm.stage(i, i + 1)
            a, b = _prefill_and_steps(st, x0, xs, repeats)
            pre.append(a)
            step.append(b)
            if i + 1 < bm.num_blocks:  # the next block's inputs: this block's outputs
                cache = st.new_cache()
                h0 = st(x0, cache)["hidden"]
                hs = [st(x, cache)["hidden"] for x in xs]
                x0, xs = {"hidden": h0}, [{"hidden": h} for h in hs]
        full = bm.full()
        a, b = _prefill_and_steps(full, {"input_ids": ids}, [{"input_ids": t} for t in step_ids], repeats)
    return {"prefill_block_ms": normalize_blocks(pre, a), "step_block_ms": normalize_blocks(step, b),
            "block_sum_prefill_ms_as_timed": float(sum(pre)), "block_sum_step_ms_as_timed": float(sum(step)),
            "full_prefill_ms": a, "full_step_ms": b, "full_request_ms": a + len(step_ids) * b}


def normalize_blocks(block_ms: Sequence[float], whole_ms: float) -> list[float]:
    """Per-block times scaled so that they add up to the whole model's: each block timed alone (its
    own stage call) carries the call's fixed cost, which the whole model pays once, so the raw sum
    overstates it (1.4x on stdlib-gpt's decode steps); the blocks keep their shares."""
    total = float(sum(block_ms))
    if total <= 0:
        return [whole_ms / len(block_ms)] * len(block_ms)
    return [float(x) * whole_ms / total for x in block_ms]


def reply_bytes(sdk_bytes_per_request: float, prefill_bytes: float, step_bytes: float, new_tokens: int) -> float:
    """Bytes of one cloud reply: cloud-only's SDK count of a request (every message both ways)
    less its forward messages (the prompt's ids, ``new_tokens - 1`` steps' ids), per message."""
    return max(0.0, (sdk_bytes_per_request - prefill_bytes - (new_tokens - 1) * step_bytes) / new_tokens)


def build_profile(bm, edge_t: dict, prompt_tokens: int, codec_costs: dict[int, dict], codec_bpm: dict[str, float],
                  settings: Sequence[str], reply: float = REPLY_BYTES):
    """The planner's model profile of this run (reference device: core 0 without the quota)."""
    from splitnet.planner.profiles import BlockProfile, CodecOption, ModelProfile

    C = int(bm.arch.config.get("n_embd", 192))
    blocks = [BlockProfile(i, {prompt_tokens: edge_t["prefill_block_ms"][i]}, 0, C, decode_ms=edge_t["step_block_ms"][i],
                           codec_costs=codec_costs.get(i, {})) for i in range(bm.num_blocks)]
    embed = BlockProfile(-1, {prompt_tokens: 0.0}, 0, C, decode_ms=0.0)  # in block 0
    head = BlockProfile(bm.num_blocks, {prompt_tokens: 0.0}, 0, 1, out_bytes_per_token=reply, decode_ms=0.0)  # in the last block
    codecs = (CodecOption("none"),) + tuple(CodecOption(s, bytes_per_message=codec_bpm.get(s, 0.0), fidelity=0.0) for s in settings)
    return ModelProfile(MODEL, "decoder", tuple(blocks), embed, head, reference_device="edge core (core 0), 1 torch thread",
                        return_tokens="last", codecs=codecs, source="measured by splitnet bench e2e --workload lm in this run")


def measure_codec(bm, cut: int, setting: str, codec, prompts: np.ndarray, ref_tokens: np.ndarray, new_tokens: int) -> dict:
    """A codec at ``cut`` in process (:class:`splitnet.bench.lm_split.SplitLM`, the SDK's wire
    format): greedy agreement on ``prompts`` against the unsplit model's ``ref_tokens``, message
    bytes of the prefill and of a decode step, encode / decode ms of a prefill and of one step."""
    import torch

    from splitnet.bench.lm_split import SplitLM, greedy
    from splitnet.planner.profiler import median_ms

    toks, _, sents = greedy(SplitLM(bm, cut, codec), prompts, new_tokens)
    agree = [greedy_agreement(t, r) for t, r in zip(toks, ref_tokens)]
    pre = float(np.mean([s[0].message_nbytes for s in sents]))
    dec = float(np.mean([m.message_nbytes for s in sents for m in s[1:]]))
    pay_pre = float(np.mean([s[0].payload_nbytes for s in sents]))
    pay_dec = float(np.mean([m.payload_nbytes for s in sents for m in s[1:]]))
    with torch.no_grad():
        h = bm.stage(0, cut)({"input_ids": torch.from_numpy(prompts[:1])})["hidden"].float().numpy()
    h1 = np.ascontiguousarray(h[:, -1:])
    if codec is None:
        enc_p = enc_s = dec_p = dec_s = 0.0
    else:
        pp, p1 = codec.encode(h), codec.encode(h1)
        enc_p, enc_s = median_ms(lambda: codec.encode(h), 1, 5), median_ms(lambda: codec.encode(h1), 1, 9)
        dec_p, dec_s = median_ms(lambda: codec.decode(pp), 1, 5), median_ms(lambda: codec.decode(p1), 1, 9)
    return {"cut": cut, "setting": setting, "greedy_agreement": round(float(np.mean(agree)), 4), "prompts": int(len(prompts)),
            "prefill_message_bytes": round(pre, 1), "decode_message_bytes": round(dec, 1),
            "prefill_payload_bytes": round(pay_pre, 1), "decode_payload_bytes": round(pay_dec, 1),
            "encode_prefill_ms": round(enc_p, 4), "encode_step_ms": round(enc_s, 4),
            "decode_prefill_ms": round(dec_p, 4), "decode_step_ms": round(dec_s, 4)}


def codec_costs_of(rows: Sequence[dict], prompt_tokens: int, decode_steps: int) -> tuple[dict[int, dict], dict[str, float]]:
    """The profile rows as the cost model takes them: {block: {setting: costs}} and {setting:
    bytes_per_message} (the mean over the cuts it was measured at: the same codec sends the same
    bytes at every cut of this model, whose cuts all have the same width)."""
    by_block: dict[int, dict] = {}
    bpm: dict[str, list[float]] = {}
    for r in rows:
        bpt, per_msg = message_fit(r["prefill_message_bytes"], r["decode_message_bytes"], prompt_tokens)
        by_block.setdefault(r["cut"] - 1, {})[r["setting"]] = {
            "bytes_per_token": bpt,
            "encode_ms_per_token": per_token_ms(r["encode_prefill_ms"], r["encode_step_ms"], prompt_tokens, decode_steps),
            "decode_ms_per_token": per_token_ms(r["decode_prefill_ms"], r["decode_step_ms"], prompt_tokens, decode_steps),
            "fidelity": min(1.0, max(0.0, r["greedy_agreement"]))}
        bpm.setdefault(r["setting"], []).append(per_msg)
    return by_block, {s: float(np.mean(v)) for s, v in bpm.items()}


# ---------------------------------------------------------------------------- the run
class _LMClient:
    """One e2e_lm_client process in the edge host (see :class:`splitnet.bench.e2e.Driven`)."""

    def __new__(cls, lab, option: str, endpoints: str, cfg: dict, prompts_file: str, group=None):
        from splitnet.bench.e2e import EDGE_CORE, Driven, edge_dev

        cmd = [sys.executable, "-m", "splitnet.bench.e2e_lm_client", "--option", option, "--endpoints", endpoints,
               "--model", MODEL, "--prompts", prompts_file, "--new-tokens", str(cfg["new_tokens"]), "--veth", edge_dev(lab),
               "--cpus", str(EDGE_CORE), "--timeout-s", "120"]
        # a request at the slowest point: the prefill at the link's rate, a round trip per token
        per_request_s = 30.0 + cfg["new_tokens"] * (max(cfg["rtts_ms"]) / 1000.0 + 0.5)
        return Driven(lab, cmd, group, per_request_s=per_request_s)


def _measure(lab, client, requests: int) -> dict:
    from splitnet.bench.e2e import _veth_bytes

    client.run(1)  # warm-up: connections, caches
    before = _veth_bytes(lab)
    out = client.run(requests)
    out["link_bytes_per_request"] = (_veth_bytes(lab) - before) / requests
    return out


def run(args: argparse.Namespace) -> dict:
    from splitnet.bench.e2e import _cpu_groups, check_lab_host

    t_start = time.perf_counter()
    load = {"loadavg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()]}
    cfg = config(args)  # unknown codecs and bad settings fail here
    check_lab_host("splitnet bench e2e --workload lm")
    if args.plot:
        import matplotlib  # noqa: F401 - fail before the work when the plot cannot be drawn
    groups = _cpu_groups(cfg)
    try:
        return _run(args, cfg, t_start, load, *groups)
    finally:
        for g in groups:
            if g is not None:
                g.remove()


def _run(args, cfg: dict, t_start: float, load: dict, g_full, g_edge) -> dict:
    import torch

    from splitnet.bench import e2e as E
    from splitnet.bench import e2e_profile as EP
    from splitnet.bench.lm import _calibration, _fit, _settings
    from splitnet.bench.lm_data import lm_data, python_matches
    from splitnet.bench.lm_split import UnsplitLM, cloud_only_nbytes, greedy
    from splitnet.codecs.store import save_codec
    from splitnet.codecs.vq import faiss_module
    from splitnet.lab.netns import LinkSpec, lab_topology
    from splitnet.model import load_model
    from splitnet.planner.cost import Workload

    torch.set_num_threads(1)
    faiss_module().omp_set_num_threads(1)
    settings = _settings(",".join(cfg["codecs"]))
    bm = load_model(MODEL)
    L = bm.num_blocks
    if any(not 0 < c < L for c in cfg["candidate_cuts"]) or (cfg["cut"] is not None and not 0 < cfg["cut"] < L):
        raise ConfigError(f"cuts must be in 1..{L - 1} for {MODEL}")
    context = int(bm.arch.config.get("n_positions", 256))
    P, N = cfg["prompt_tokens"], cfg["new_tokens"]
    if P + N > context:
        raise ConfigError(f"--prompt-tokens {P} + --new-tokens {N} exceed the model's context of {context}")
    wl = Workload(prefill_tokens=P, decode_steps=N - 1)

    # ---- data: calibration windows from training files; measured + profile prompts from held-out files
    data = lm_data(bm, context_tokens=cfg["window_tokens"], calibration_windows=cfg["calibration_windows"], perplexity_windows=1,
                   prompts=cfg["prompts"] + cfg["profile_prompts"], prompt_tokens=P, seed=cfg["seed"])
    shared = sorted(set(data.calibration_files) & set(data.evaluation_files))
    if shared:  # by construction impossible; checked because every fidelity figure depends on it
        raise ConfigError(f"calibration and evaluation share files {shared[:5]}")
    prompts, prof_prompts = data.prompts[: cfg["prompts"]], data.prompts[cfg["prompts"]:]
    ref_tokens, _, _ = greedy(UnsplitLM(bm), prompts, N)
    ref_prof, _, _ = greedy(UnsplitLM(bm), prof_prompts, N)

    # ---- compute profiles: core 0 whole (the reference), core 0 under the quota, core 1 whole ----
    with EP.pinned({E.EDGE_CORE}), EP.inside(g_full):
        edge_t = measure_lm_compute(bm, prompts[0], ref_tokens[0])
    if g_edge is not None:
        with EP.pinned({E.EDGE_CORE}), EP.inside(g_edge):
            edge_dev_t = measure_lm_compute(bm, prompts[0], ref_tokens[0])
    else:
        edge_dev_t = edge_t
    with EP.pinned({E.CLOUD_CORE}), EP.inside(g_full):
        cloud_t = measure_lm_compute(bm, prompts[0], ref_tokens[0])
    edge_speed = edge_speed_profiled = edge_t["full_request_ms"] / edge_dev_t["full_request_ms"]
    cloud_speed = edge_t["full_request_ms"] / cloud_t["full_request_ms"]

    # ---- codec profiles: stateless codecs at every candidate cut, on the profile prompts ---------
    from splitnet.codecs import make_codec

    def make(name, config):
        return make_codec(name, **{k: v for k, v in config.items() if v is not None})

    stateless = [s for s in settings if not make(s[1], s[2]).needs_fit]
    fitted = [s for s in settings if make(s[1], s[2]).needs_fit]
    rows: list[dict] = []
    with EP.pinned({E.EDGE_CORE}), EP.inside(g_full):
        for cut in cfg["candidate_cuts"]:
            for spec, name, conf, _ in stateless:
                rows.append(measure_codec(bm, cut, spec, make(name, conf), prof_prompts, ref_prof, N))
    names_all = [s for s, _, _, _ in settings]
    by_block, bpm = codec_costs_of(rows, P, N - 1)
    profile = build_profile(bm, edge_t, P, by_block, bpm, names_all)
    cloud_bytes = (float(cloud_only_nbytes(P, 0)), float(np.mean([cloud_only_nbytes(1, P + i) for i in range(N - 1)])))

    # ---- the cut: the planner's choice at the slowest point among stateless codecs keeping the floor
    bw0, rtt0 = min(cfg["bandwidths_mbit_s"]), min(cfg["rtts_ms"])
    planner_cut = None
    if rows:
        fl = EP.fleet_at(bw0, rtt0, cloud_speed, 0.0, edge_speed_rel=edge_speed, burst_bytes=E._burst_bytes(bw0))
        pred = predict_options(profile, fl, wl, [{"kind": "split", "cut": r["cut"], "setting": r["setting"]} for r in rows],
                               cloud_bytes, cfg["fidelity_floor"])
        allowed = [n for n, p in pred.items() if p["allowed"]] or list(pred)
        best = min(allowed, key=lambda n: pred[n]["predicted_ms"])
        planner_cut = {"cut": int(best.split("@")[1].split(":")[0]), "option": best, "predicted_ms": round(pred[best]["predicted_ms"], 2),
                       "any_allowed": any(p["allowed"] for p in pred.values())}
    if cfg["cut"] is None and planner_cut is None:
        raise ConfigError("no stateless codec to choose the cut with: give --cut, or add fp16 / int8")
    cut = cfg["cut"] if cfg["cut"] is not None else planner_cut["cut"]

    # ---- fitted codecs at that cut: on the calibration windows only; saved, served as files ------
    work_dir = tempfile.TemporaryDirectory(prefix="splitnet-e2e-lm-")
    work = Path(work_dir.name)
    prompts_file = str(work / "prompts.npy")
    np.save(prompts_file, np.ascontiguousarray(prompts, dtype=np.int64))
    os.chmod(work, 0o755)
    codec_files: dict[str, str] = {}
    fits = []
    if fitted:
        feats, labels = _calibration(bm, cut, data.calibration)
        for spec, name, conf, anchors in fitted:
            t0 = time.perf_counter()
            codec = _fit(name, conf, anchors, feats, labels, cfg["max_train"])
            fits.append({"setting": spec, "fit_s": round(time.perf_counter() - t0, 2), "calibration_vectors": int(feats.shape[0]),
                         "max_train": cfg["max_train"], "fitted_on": "cut features of the calibration windows (training files) only"})
            path = work / f"{name}-{len(codec_files)}.codec"
            save_codec(codec, path)
            codec_files[spec] = str(path)
            with EP.pinned({E.EDGE_CORE}), EP.inside(g_full):
                rows.append(measure_codec(bm, cut, spec, codec, prof_prompts, ref_prof, N))
        del feats, labels
    for spec, name, conf, _ in stateless:  # a stateless setting with options travels as a codec file too
        if any(v is not None for v in conf.values()):
            path = work / f"{name}-{len(codec_files)}.codec"
            save_codec(make(name, conf), path)
            codec_files[spec] = str(path)
    by_block, bpm = codec_costs_of(rows, P, N - 1)
    profile = build_profile(bm, edge_t, P, by_block, bpm, names_all)
    load["loadavg_1_5_15_before_sweep"] = [round(x, 2) for x in os.getloadavg()]

    # ---- the sweep -----------------------------------------------------------------------------
    options = [{"kind": "cloud"}, {"kind": "edge"}] + [{"kind": "split", "cut": cut, "setting": s} for s in names_all]
    names = [EP.option_name(o["kind"], o.get("cut"), o.get("setting")) for o in options]
    measured: dict[tuple[float, float], dict[str, dict]] = {}
    calib: dict[str, dict] = {}
    extra = ["--insecure", "--max-batch-size", "1", "--batch-wait-ms", "0"]
    with lab_topology(["edge", "cloud"], {("edge", "cloud"): LinkSpec(rate_mbit=0)}, name=f"e2e{os.getpid() % 1000}") as lab:
        for o, name in zip(options, names):
            procs, ep_edge, target = [], "", ""
            if o["kind"] == "cloud":
                p, target = lab.stage_process("cloud", MODEL, (0, L), stage_index=0, extra_args=[*extra, "--cpus", str(E.CLOUD_CORE)])
                E._join(g_full, p)
                procs.append(p)
            elif o["kind"] == "split":
                cfile = codec_files.get(o["setting"])
                p_cloud, target = lab.stage_process("cloud", MODEL, (cut, L), stage_index=1,
                                                    extra_args=[*extra, "--cpus", str(E.CLOUD_CORE), *(["--codec-file", cfile] if cfile else [])])
                p_edge, ep_edge = lab.stage_process("edge", MODEL, (0, cut), stage_index=0,
                                                    extra_args=[*extra, "--cpus", str(E.EDGE_CORE), "--codec-out", cfile or o["setting"]])
                E._join(g_full, p_cloud)
                E._join(g_edge, p_edge)
                procs += [p_cloud, p_edge]
            try:
                if o["kind"] not in calib:  # the calibration point: unshaped, no relay, outside the sweep
                    lab.set_link("edge", "cloud", LinkSpec(rate_mbit=0))
                    ep = f"{ep_edge},{target}" if o["kind"] == "split" else target
                    client = _LMClient(lab, o["kind"], ep, cfg, prompts_file, g_edge)
                    try:
                        n_cal = max(cfg["requests"], E.CALIBRATION_REQUESTS)
                        calib[o["kind"]] = {"option": name, **lm_stats(_measure(lab, client, n_cal), ref_tokens, P, N)}
                    finally:
                        client.close()
                E.sweep_option(lab, cfg, name, target, g_full, procs, measured,
                               lambda far: f"{ep_edge},{far}" if o["kind"] == "split" else far,
                               lambda ep: _LMClient(lab, o["kind"], ep, cfg, prompts_file, g_edge),
                               lambda c: lm_stats(_measure(lab, c, cfg["requests"]), ref_tokens, P, N))
            finally:
                lab.stop(procs)
    load["loadavg_1_5_15_after_sweep"] = [round(x, 2) for x in os.getloadavg()]
    with EP.pinned({E.EDGE_CORE}), EP.inside(g_full):
        load["edge_core_request_ms_profiled"] = round(edge_t["full_request_ms"], 3)
        load["edge_core_request_ms_after_sweep"] = round(measure_lm_compute(bm, prompts[0], ref_tokens[0], 1)["full_request_ms"], 3)

    # ---- calibration: the reply's size, the edge device's speed as served, then per-path offsets -
    reply = REPLY_BYTES
    if "cloud" in calib:
        reply = reply_bytes(calib["cloud"]["sdk_bytes_per_request"], *cloud_bytes, N)
        profile = build_profile(bm, edge_t, P, by_block, bpm, names_all, reply)
    if "edge" in calib:
        edge_speed = edge_t["full_request_ms"] / calib["edge"]["p50_ms"]
    fl0 = EP.fleet_at(1e6, 0.0, cloud_speed, 0.0, edge_speed_rel=edge_speed)
    pred0 = predict_options(profile, fl0, wl, options, cloud_bytes, cfg["fidelity_floor"])
    offsets = EP.calibration_offsets(pred0, {k: c for k, c in calib.items() if k != "edge"})

    agree_all: dict[str, list[float]] = {n: [] for n in names}
    for pt in measured.values():
        for n, m in pt.items():
            agree_all[n].extend(m.pop("agree"))
    for c in calib.values():
        c.pop("agree", None)
    fidelity = {n: round(float(np.mean(v)), 4) if v else None for n, v in agree_all.items()}
    points, compared = [], []
    for (bw, rtt), ms in sorted(measured.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        fl = EP.fleet_at(bw, rtt, cloud_speed, 0.0, edge_speed_rel=edge_speed, burst_bytes=E._burst_bytes(bw))
        pred = predict_options(profile, fl, wl, options, cloud_bytes, cfg["fidelity_floor"], offsets)
        cmp = EP.compare_point(pred, {n: ms[n]["p50_ms"] for n in names}, GOAL_CHOICE_WITHIN)
        compared.append(cmp)
        points.append({"bandwidth_mbit_s": bw, "rtt_ms": rtt,
                       "options": {n: {**ms[n], "predicted_ms": round(pred[n]["predicted_ms"], 2), "allowed": pred[n]["allowed"]} for n in names},
                       "planner": cmp})
    fp16 = next((r for r in rows if r["cut"] == cut and r["setting"] == "fp16"), None)
    split_rows = []
    for s in names_all:
        r = next(x for x in rows if x["cut"] == cut and x["setting"] == s)
        n = EP.option_name("split", cut, s)
        split_rows.append({"option": n, "prefill_message_bytes_per_prompt_token": round(r["prefill_message_bytes"] / P, 3),
                           "decode_message_bytes_per_token": r["decode_message_bytes"],
                           "prefill_payload_bytes_per_prompt_token": round(r["prefill_payload_bytes"] / P, 3),
                           "decode_payload_bytes_per_token": r["decode_payload_bytes"],
                           "prefill_payload_ratio_vs_fp16": round(fp16["prefill_payload_bytes"] / r["prefill_payload_bytes"], 3) if fp16 else None,
                           "decode_payload_ratio_vs_fp16": round(fp16["decode_payload_bytes"] / r["decode_payload_bytes"], 3) if fp16 else None,
                           "greedy_agreement_e2e": fidelity[n], "greedy_agreement_profile": r["greedy_agreement"]})
    argv = sys.argv[1:]
    doc = {
        "workload": "lm",
        "command": "splitnet " + shlex.join(argv) if argv[:2] == ["bench", "e2e"] else None,
        "config": cfg,
        "model": MODEL,
        "split_cut": cut,
        "split_cut_how": "given (--cut)" if cfg["cut"] is not None else
                         f"the planner's choice at {bw0} Mbit/s, {rtt0} ms among the stateless codecs at the candidate cuts keeping the floor",
        "planner_cut_choice": planner_cut,
        "request": f"one held-out prompt of {P} tokens + {N} greedy new tokens (a prefill and {N - 1} decode steps, batch 1, KV caches)",
        "data": {
            "calibration": f"{len(data.calibration)} windows of {cfg['window_tokens']} tokens from the model's TRAINING files "
                           f"(train_lm's split, holdout_every={data.holdout_every}); the fitted codecs see their cut features only",
            "measured_prompts": f"{len(prompts)} prompts of {P} tokens from the model's HELD-OUT files: the timed requests cycle over "
                                "them; fidelity_greedy_e2e is measured on them",
            "profile_prompts": f"{len(prof_prompts)} other prompts (other rows of the same held-out draw) for the codec profile's "
                               "fidelity (the planner's floor); never the calibration text",
            "calibration_files": len(data.calibration_files), "evaluation_files": len(data.evaluation_files),
            "files_shared_by_calibration_and_evaluation": shared, "same_python_as_training": python_matches(data),
        },
        "load": load,
        "edge_scaling": {
            "how": (f"edge = core 0 under a cgroup CPU quota of {cfg['edge_cpu_fraction']:g} of the core ({g_edge.quota_us} us every "
                    f"{g_edge.period_us} us, {g_edge.root}; cpu.shares {E.CGROUP_SHARES}), the vision workload's scheme: every edge "
                    "process joins it (the edge stage, the clients of every option), the relay does not; cloud = core 1 without a "
                    "quota. The planner's reference device is core 0 without the quota (per-block prefill and decode-step times "
                    "edge_core_ms); its edge device has compute_speed_rel = the reference whole-request time / edge-only's p50 at "
                    "the calibration point (as served, outside the sweep)") if g_edge is not None else
                   "edge = core 0, no quota (--edge-cpu-fraction 1); cloud = core 1",
            "edge_cpu_fraction": cfg["edge_cpu_fraction"],
            "cgroups": {"edge": g_edge.describe(), "full": g_full.describe(), "edge_throttling": g_edge.stat()} if g_edge is not None else None,
            "edge_compute_speed_rel": round(edge_speed, 4), "edge_compute_speed_rel_profiled": round(edge_speed_profiled, 4),
            "cloud_compute_speed_rel": round(cloud_speed, 4),
            "edge_core_ms": _round(edge_t), "edge_device_ms_profiled": _round(edge_dev_t), "cloud_core_ms": _round(cloud_t),
        },
        "planner_model": {
            "workload": wl.to_dict(),
            "how": "splitnet.planner.cost.evaluate unchanged: the prefill is one pass of prefill_tokens tokens; each of the "
                   "decode_steps steps pays every block's one-token step time (decode_ms), its cut message (codec encode + bytes "
                   "at the link's goodput beyond the tbf bucket + RTT/2 + decode) and the reply back (RTT/2). Codec bytes: "
                   "bytes_per_token and bytes_per_message fitted exactly to the measured prefill and decode-step message bytes "
                   "(message_fit); codec ms per token = (prefill ms + steps x step ms) / (P + steps). Cloud-only (outside the cost "
                   "model): the ids' messages up, the whole model on the cloud device, each reply back, the same link "
                   "arithmetic. Replies are modelled as reply_bytes (under the bucket: their size does not change the "
                   "prediction at the sweep's bandwidths). Offsets: measured p50 - prediction at the calibration point, per path (split: the first split "
                   "codec measured; cloud-only), per request",
            "cloud_only_message_bytes": {"prefill": cloud_bytes[0], "decode_step": round(cloud_bytes[1], 1)},
            "reply_bytes": round(reply, 1),
            "reply_bytes_how": "cloud-only's SDK byte count per request at the calibration point less its forward messages, "
                               f"per message ({REPLY_BYTES:g} B, a placeholder, for the cut choice before the sweep)",
            "block_times": "each block timed alone as its own stage (block 0 with the embedding, the last with the head), then "
                           "scaled so that the blocks add up to the whole model's prefill and step (normalize_blocks)",
        },
        "calibration_point": {"link": "unshaped, no relay (outside the sweep)", "results": calib,
                              "edge_compute_speed_rel_served": round(edge_speed, 4),
                              "offsets_ms_per_request": {k: round(v, 3) for k, v in offsets.items()}},
        "codec_profile": rows,
        "fits": fits,
        "fidelity_greedy_e2e": fidelity,
        "split_codecs_at_cut": split_rows,
        "points": points,
        "planner_summary": EP.summarize_planner(compared),
        "goal": planner_goal(compared),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    if args.plot:
        from splitnet.bench.e2e_plot import plot_latency

        doc["plot"] = plot_latency(doc, args.plot, title=f"{MODEL}, {P}-token prompt + {N} greedy tokens",
                                   ylabel="p50 latency per request, prompt to last token (ms)")
    work_dir.cleanup()
    return doc


def _round(d: dict) -> dict:
    return {k: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 3) for k, v in d.items()}


def summarize(doc: dict) -> str:
    c = doc["config"]
    lines = [f"e2e bench lm ({'quick' if c['quick'] else 'full'}), {doc['request']}, split at cut {doc['split_cut']}, "
             f"{doc['elapsed_s']:.0f} s"]
    for p in doc["points"]:
        pl = p["planner"]
        lines.append(f"{p['bandwidth_mbit_s']:6.1f} Mbit/s RTT {p['rtt_ms']:4.0f} ms  planner {pl['planner_choice']} "
                     f"(x{pl['choice_over_best']:.2f} of best {pl['measured_best']})")
        for n, o in p["options"].items():
            lines.append(f"    {n:34s} p50 {o['p50_ms']:8.1f}  p95 {o['p95_ms']:8.1f}  ttft {o['ttft_p50_ms']:7.1f}  pred {o['predicted_ms']:8.1f} ms  "
                         f"prefill {o['link_prefill_bytes_per_prompt_token']:7.1f} B/tok  decode {o['link_decode_bytes_per_decoded_token']:7.1f} B/tok  "
                         f"greedy {o['greedy_agreement']:.3f}")
    s = doc["planner_summary"]
    lines.append(f"planner: {s['choice_within_10pct']}/{s['points']} points within 10 %, MAPE {s['mape_pct_all_options']} % (all options), "
                 f"{s['mape_pct_planner_choice']} % (choices); bars met: {doc['goal']['met']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `splitnet bench e2e --workload lm` is the entry point
    from splitnet.bench import e2e

    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    a = p.parse_args(argv)
    a.workload = "lm"
    print(json.dumps(run(a), indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
