"""Ablations behind the transform codec at an EfficientNet-Lite0 cut, and where its flips fall.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/vision_frontier/cache_features.py --per-source 90 --cuts 15
    OMP_NUM_THREADS=1 .venv/bin/python experiments/vision_frontier/ablations.py --cut 15 \
        --out benchmarks/results/vision-2core-vm-2026-12-02-ablations.json

On the cached features of the bench's crops (the same seeded 1,170 crops and split as
``splitnet bench vision --per-source 90``), held-out fidelity of:

- the product codec (``splitnet.codecs.transform``) with one part switched off at a time: the
  spatial DCT, the Fisher metric, the per-frequency steps; real payload bytes (``Payload.nbytes``);
- studies the product does not ship, in numpy, with *estimated* bytes (the ideal static code length
  of calibration-fitted per-coefficient histograms, + 58 B of payload framing, the transform codec's
  measured overhead): a per-channel scalar quantizer with entropy coding (the "learned int"
  quantizer), MSE-optimal (centroid) reconstruction, and a learned cloud-side decoder correction
  (per-coefficient gains + a bias map, 18.8k parameters, trained on the calibration crops for the
  output KL through the frozen tail);
- where top-1 flips fall: the unsplit model's top-1 minus top-2 probability on the flipped crops,
  for JPEG q90 (cloud-only) and for transform codecs near the bar's bytes.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

MARGIN_BINS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.01)
FRAMING_B = 58


def load(cut: int, ps: int, root: str) -> dict:
    d = np.load(f"{root}/feat-ps{ps}-cut{cut}.npz")
    return {k: d[k] for k in d.files}


def tail_logits(tail, feats: np.ndarray) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(feats), 64):
            out.append(tail({"hidden": torch.from_numpy(np.ascontiguousarray(feats[i : i + 64], dtype=np.float32))})["logits"])
    return torch.cat(out).float()


def measures(ref: torch.Tensor, test: torch.Tensor) -> dict:
    from splitnet.codecs.fidelity import classifier_agreement

    f = classifier_agreement(ref, test)
    p = ref.softmax(-1)
    top2 = p.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy()
    flip = (ref.argmax(-1) != test.argmax(-1)).numpy()
    hist = np.histogram(margin[flip], bins=MARGIN_BINS)[0]
    f["flips"] = int(flip.sum())
    f["flips_by_unsplit_margin"] = {f"{lo:.2f}-{min(hi, 1.0):.2f}": int(n) for lo, hi, n in zip(MARGIN_BINS, MARGIN_BINS[1:], hist)}
    f["crops_by_unsplit_margin"] = {f"{lo:.2f}-{min(hi, 1.0):.2f}": int(n) for lo, hi, n in
                                    zip(MARGIN_BINS, MARGIN_BINS[1:], np.histogram(margin, bins=MARGIN_BINS)[0])}
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()}


def entropy_bytes(q_cal: np.ndarray, q_held: np.ndarray) -> float:
    """Mean ideal bytes per held row under per-column histograms of q_cal (+0.5 smoothing), + framing."""
    bits = np.zeros(q_held.shape[0])
    for j in range(q_cal.shape[1]):
        lo = int(min(q_cal[:, j].min(), q_held[:, j].min()))
        hi = int(max(q_cal[:, j].max(), q_held[:, j].max()))
        cnt = np.bincount(q_cal[:, j] - lo, minlength=hi - lo + 1).astype(np.float64) + 0.5
        bits -= np.log2(cnt[q_held[:, j] - lo] / cnt.sum())
    return float(bits.mean() / 8 + FRAMING_B)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cut", type=int, default=15)
    ap.add_argument("--per-source", type=int, default=90)
    ap.add_argument("--features", default="/tmp/vision")
    ap.add_argument("--fisher-samples", type=int, default=4)
    ap.add_argument("--decoder-steps", type=int, default=300)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from splitnet.bench.environment import environment
    from splitnet.codecs import make_codec
    from splitnet.codecs.sensitivity import _tail_logits, output_fisher
    from splitnet.model import load_model

    t0 = time.time()
    D = load(a.cut, a.per_source, a.features)
    cal, held = D["cal"], D["held"]
    ref = torch.from_numpy(D["held_logits"]).float()
    jm = float(D["jpeg_bytes"].mean())
    bm = load_model("efficientnet-lite0")
    tail = bm.stage(a.cut, bm.num_blocks)
    rows: list[dict] = []

    def add(what: str, nbytes: float, decoded: np.ndarray, estimated: bool):
        f = measures(ref, tail_logits(tail, decoded))
        rows.append({"what": what, "bytes_per_image": round(nbytes, 1), "pct_of_jpeg_q90": round(100 * nbytes / jm, 2),
                     "bytes_estimated": estimated, "fidelity": f})
        print(f"{what:58s} {nbytes:8.1f} B {100 * nbytes / jm:6.2f}%  top1 {f['top1_agreement']:.4f}  "
              f"conf {f['top1_agreement_confident']:.4f}  KL {f['kl_mean']:.5f}  {time.time() - t0:.0f}s", flush=True)

    rows.append({"what": "cloud-only JPEG q90", "bytes_per_image": round(jm, 1), "pct_of_jpeg_q90": 100.0, "bytes_estimated": False,
                 "fidelity": measures(ref, torch.from_numpy(D["held_jpeg_logits"]).float())})
    sens = output_fisher(bm, a.cut, cal, samples=a.fisher_samples)

    # the product codec, one part off at a time (real bytes)
    settings = [("transform step=1.5 (all parts)", {"step": 1.5}, True),
                ("transform step=2.5 (all parts)", {"step": 2.5}, True),
                ("transform step=5 (all parts)", {"step": 5.0}, True),
                ("transform step=8 (all parts)", {"step": 8.0}, True),
                ("  no per-frequency steps (frequency_alpha=0), step=1.5", {"step": 1.5, "frequency_alpha": 0.0}, True),
                ("  no Fisher metric (metric=mse), step=1.5", {"step": 1.5, "metric": "mse"}, False),
                ("  no Fisher metric (metric=mse), step=2.5", {"step": 2.5, "metric": "mse"}, False),
                ("  no spatial DCT (spatial=none), step=1.5", {"step": 1.5, "spatial": "none"}, True),
                ("  no spatial DCT (spatial=none), step=3", {"step": 3.0, "spatial": "none"}, True)]
    for what, cfg, fisher in settings:
        c = make_codec("transform", **cfg)
        kw = {}
        if fisher:
            kw = {"channel_metric": sens.channel_metric, **({"frequency_weights": sens.frequency_weights} if c.spatial == "dct" else {})}
        c.fit(cal if c.spatial == "dct" else cal.reshape(-1, cal.shape[-1]), progress=False, **kw)
        payloads = [c.encode(held[i : i + 1]) for i in range(len(held))]
        dec = np.concatenate([c.decode(p).reshape(1, *held.shape[1:]) for p in payloads])
        add(what, float(np.mean([p.nbytes for p in payloads])), dec, False)

    # studies not in the product (estimated bytes)
    x_cal = cal.reshape(-1, cal.shape[-1]).astype(np.float64)
    x_held = held.reshape(-1, held.shape[-1]).astype(np.float64)
    mu, sd = x_cal.mean(0), x_cal.std(0)
    for step in (1.0, 2.0):
        qc = np.rint((x_cal - mu) / (step * sd)).astype(np.int64)
        qh = np.rint((x_held - mu) / (step * sd)).astype(np.int64)
        nb = entropy_bytes(qc.reshape(len(cal), -1), qh.reshape(len(held), -1))
        add(f"study: per-channel uniform int, entropy-coded, step={step} sd", nb, (qh * step * sd + mu).reshape(held.shape), True)

    c = make_codec("transform", step=1.5).fit(cal, progress=False, channel_metric=sens.channel_metric, frequency_weights=sens.frequency_weights)
    nb_real = float(np.mean([c.encode(held[i : i + 1]).nbytes for i in range(len(held))]))
    coef_cal = c._coefficients(cal.reshape(-1, cal.shape[-1]))
    q_cal, q_held = c.levels(cal), c.levels(held)
    off = np.zeros(q_cal.shape[1:] + (4,))
    for lvl in (1, 2, 3):
        m = np.abs(q_cal) == lvl
        n = m.sum(0)
        off[..., lvl] = np.where(n >= 5, (np.abs(coef_cal) * m).sum(0) / np.maximum(n, 1) - lvl, 0.0)
    aq = np.minimum(np.abs(q_held), 3)
    adj = np.take_along_axis(np.broadcast_to(off, (len(q_held),) + off.shape), aq[..., None], -1)[..., 0] * (np.abs(q_held) <= 3)
    add("study: transform step=1.5 + centroid (MSE-optimal) reconstruction", nb_real,
        c._reconstruct((q_held + np.sign(q_held) * adj).astype(np.float32)).reshape(held.shape), False)

    # learned cloud-side decoder correction, trained on the calibration crops for the output KL
    for p_ in tail.parameters():
        p_.requires_grad_(False)
    dct = torch.from_numpy(c._dct).float()
    steps_t, syn, mean_t = (torch.from_numpy(v).float() for v in (c.steps, c.synthesis, c.mean))
    gain = torch.zeros(*c.steps.shape, requires_grad=True)
    bias = torch.zeros(*held.shape[1:], requires_grad=True)
    side = dct.shape[0]

    def decode_t(q):
        z = (q * steps_t * (1 + gain)) @ syn
        z = torch.einsum("ui,vj,nuvk->nijk", dct, dct, z.reshape(-1, side, side, z.shape[-1])).reshape(z.shape)
        return z + mean_t + bias

    ref_cal = torch.from_numpy(D["cal_logits"]).float().log_softmax(-1)
    qc_t = torch.from_numpy(q_cal).float()
    opt = torch.optim.Adam([gain, bias], lr=0.01)
    g = torch.Generator().manual_seed(0)
    for it in range(a.decoder_steps):
        idx = torch.randint(0, len(qc_t), (64,), generator=g)
        lq = _tail_logits(tail, decode_t(qc_t[idx])).log_softmax(-1)
        lp = ref_cal[idx]
        loss = (lp.exp() * (lp - lq)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        dec = decode_t(torch.from_numpy(q_held).float()).numpy()
    add(f"study: transform step=1.5 + learned decoder gains/bias ({a.decoder_steps} steps, cal KL {float(loss.detach()):.4f})", nb_real, dec, False)

    doc = {"command": "OMP_NUM_THREADS=1 .venv/bin/python experiments/vision_frontier/ablations.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None and k != "out"),
           "environment": environment(), "cut": a.cut, "calibration_crops": len(cal), "held_out_crops": len(held),
           "jpeg_q90_bytes_mean": round(jm, 1), "rows": rows, "elapsed_s": round(time.time() - t0, 1)}
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
