"""Random heterogeneous planning instances, for checking the solvers and timing them."""

from __future__ import annotations

import random

from splitnet.planner.cost import Workload
from splitnet.planner.profiles import BlockProfile, CodecOption, DeviceProfile, Fleet, LinkProfile, ModelProfile

MIB = 2**20


def random_instance(rng: random.Random, devices: int, blocks: int, codecs: int = 3,
                    link_prob: float = 0.85, tight_memory: bool = True) -> tuple[ModelProfile, Fleet, Workload]:
    """A model of ``blocks`` blocks with uneven costs and feature sizes, ``devices`` devices of mixed
    speed and memory, sparse links, and ``codecs`` codec options of varying size, cost and fidelity."""
    blks = []
    for i in range(blocks):
        ms = rng.uniform(0.2, 6.0)
        blks.append(BlockProfile(i, {1: ms * 0.05, 128: ms}, param_bytes=int(rng.uniform(2, 40) * MIB),
                                 out_channels=rng.choice([64, 128, 256, 384, 768, 1024]),
                                 decode_ms=ms * rng.uniform(0.02, 0.1),
                                 kv_bytes_per_token=rng.choice([0.0, 0.0, 2048.0])))
    embed = BlockProfile(-1, {128: rng.uniform(0.1, 2.0)}, param_bytes=int(rng.uniform(5, 60) * MIB), out_channels=384)
    head = BlockProfile(blocks, {128: rng.uniform(0.1, 3.0)}, param_bytes=int(rng.uniform(1, 60) * MIB),
                        out_channels=rng.choice([2, 384, 1000]))
    pool = [
        CodecOption("none", 32, fidelity=1.0),
        CodecOption("fp16", 16, fidelity=0.99999, encode_ms_per_token=rng.uniform(0, 0.002),
                    decode_ms_per_token=rng.uniform(0, 0.002)),
        CodecOption("int8", 8, bytes_per_token_extra=4, fidelity=0.9999, encode_ms_per_token=rng.uniform(0, 0.01),
                    decode_ms_per_token=rng.uniform(0, 0.005)),
        CodecOption("int4", 4, bytes_per_token_extra=4, fidelity=0.992, encode_ms_per_token=rng.uniform(0, 0.02),
                    decode_ms_per_token=rng.uniform(0, 0.01)),
        CodecOption("vq", 12 / 384, bytes_per_message=40, fidelity=rng.uniform(0.85, 0.99),
                    encode_ms_per_token=rng.uniform(0.005, 0.05), decode_ms_per_token=rng.uniform(0, 0.01)),
    ]
    chosen = [pool[0]] + rng.sample(pool[1:], max(0, min(codecs, len(pool)) - 1))
    # measured per-cut overrides on a few cuts, as a profiler would give
    for b in rng.sample(range(blocks), min(blocks, 3)):
        c = rng.choice(chosen)
        blks[b] = BlockProfile(b, blks[b].prefill_ms_by_tokens, blks[b].param_bytes, blks[b].out_channels,
                               decode_ms=blks[b].decode_ms, kv_bytes_per_token=blks[b].kv_bytes_per_token,
                               codec_costs={c.name: {"bytes_per_token": rng.uniform(1, 800),
                                                     "fidelity": rng.uniform(0.9, 1.0)}})
    model = ModelProfile("synthetic", rng.choice(["encoder", "decoder"]), tuple(blks), embed, head,
                         model_hash="synthetic", return_tokens=rng.choice(["all", "last"]), codecs=tuple(chosen))
    total = sum(b.param_bytes for b in blks) + embed.param_bytes + head.param_bytes
    devs = []
    for d in range(devices):
        frac = rng.uniform(0.2, 1.2) if tight_memory else 10.0
        devs.append(DeviceProfile(f"d{d}", compute_speed_rel=rng.choice([0.1, 0.3, 1.0, 3.0, 10.0, 30.0]),
                                  memory_bytes=max(1, int(total * frac)), can_host_first_stage=(d == 0 or rng.random() < 0.3),
                                  stage_overhead_ms=rng.choice([0.0, 0.2, 1.0])))
    links = []
    for i in range(devices):
        for j in range(i + 1, devices):
            if rng.random() < link_prob:
                sym = rng.random() < 0.7
                links.append(LinkProfile(f"d{i}", f"d{j}", rng.choice([1, 5, 15, 100, 1000]), rng.uniform(0, 80),
                                         overhead_ms=rng.choice([0.0, 0.3]), symmetric=sym,
                                         bytes_per_message=rng.choice([0.0, 0.0, 171.0])))
                if not sym:
                    links.append(LinkProfile(f"d{j}", f"d{i}", rng.choice([1, 5, 15, 100, 1000]), rng.uniform(0, 80),
                                             symmetric=False))
    fleet = Fleet(tuple(devs), tuple(links), "synthetic")
    wl = Workload(prefill_tokens=rng.choice([1, 16, 128, 512]), decode_steps=rng.choice([0, 0, 4, 32]),
                  fidelity_floor=rng.choice([0.0, 0.0, 0.95, 0.999]))
    return model, fleet, wl
