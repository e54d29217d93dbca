"""Does standardising or whitening the channels before VQ help at an EfficientNet-Lite0 cut?

    OMP_NUM_THREADS=1 .venv/bin/python experiments/vision_frontier/vq_whitening.py --cut 15 \
        --out benchmarks/results/vision-2core-vm-2026-12-02-vq-whitening.json

rvq 4 x 8 bit (246 B per image, the same payload in each case) fitted on the cached calibration
features (cache_features.py) as they are, per-channel standardised, and PCA-whitened (the
receiver undoes the transform after decoding); held-out top-1 / confident top-1 / KL through the
real tail.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cut", type=int, default=15)
    ap.add_argument("--per-source", type=int, default=90)
    ap.add_argument("--features", default="/tmp/vision")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    from splitnet.bench.environment import environment
    from splitnet.codecs import make_codec
    from splitnet.codecs.fidelity import classifier_agreement
    from splitnet.model import load_model

    d = np.load(f"{a.features}/feat-ps{a.per_source}-cut{a.cut}.npz")
    cal, held = d["cal"], d["held"]
    ref = torch.from_numpy(d["held_logits"]).float()
    bm = load_model("efficientnet-lite0")
    tail = bm.stage(a.cut, bm.num_blocks)
    c_ = cal.shape[-1]
    xc, xh = cal.reshape(-1, c_).astype(np.float64), held.reshape(-1, c_).astype(np.float64)
    mu, sd = xc.mean(0), xc.std(0) + 1e-6
    ev, vecs = np.linalg.eigh(np.cov((xc - mu).T))
    w = vecs / np.sqrt(ev + 1e-6)
    w_inv = np.linalg.pinv(w)
    rows = []
    for name, fwd, inv in [("as is", lambda x: x, lambda z: z),
                           ("per-channel standardised", lambda x: (x - mu) / sd, lambda z: z * sd + mu),
                           ("PCA-whitened", lambda x: (x - mu) @ w, lambda z: z @ w_inv + mu)]:
        codec = make_codec("rvq", stages=4, nbits=8).fit(np.ascontiguousarray(fwd(xc), dtype=np.float32), progress=False)
        payloads = [codec.encode(np.ascontiguousarray(fwd(xh[i * held.shape[1] : (i + 1) * held.shape[1]]), dtype=np.float32))
                    for i in range(len(held))]
        dec = np.stack([inv(codec.decode(p)) for p in payloads]).astype(np.float32)
        with torch.no_grad():
            out = torch.cat([tail({"hidden": torch.from_numpy(dec[i : i + 64])})["logits"] for i in range(0, len(dec), 64)]).float()
        f = classifier_agreement(ref, out)
        rows.append({"features": name, "codec": "rvq:stages=4,nbits=8", "bytes_per_image": float(np.mean([p.nbytes for p in payloads])),
                     "fidelity": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in f.items()}})
        print(name, rows[-1]["bytes_per_image"], round(f["top1_agreement"], 4), round(f["top1_agreement_confident"], 4), round(f["kl_mean"], 4), flush=True)
    if a.out:
        doc = {"command": f"OMP_NUM_THREADS=1 .venv/bin/python experiments/vision_frontier/vq_whitening.py --cut {a.cut} --per-source {a.per_source}",
               "environment": environment(), "cut": a.cut, "calibration_crops": len(cal), "held_out_crops": len(held), "rows": rows}
        with open(a.out, "w") as fh:
            fh.write(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
