"""Embed sentences with the real all-MiniLM-L6-v2 split into 3 stage processes on this host.

    python examples/embed_minilm.py "first sentence" "second sentence"

The stages run as separate processes connected by ZeroMQ (plaintext on 127.0.0.1; see README's
"Serve stages by hand" for CURVE keys across machines). Prints each embedding's norm, the cosine
between the first two sentences and the bytes that crossed each cut.
"""

from __future__ import annotations

import sys

import numpy as np

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.runtime.launcher import launch_pipeline


def main(sentences: list[str]) -> None:
    with launch_pipeline("minilm", [2, 4], codecs=["fp16", "fp16"]) as pipe, \
            splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=60)) as session:
        emb = session.infer({"text": sentences})["embedding"]  # (len(sentences), 384), L2-normalised
        for text, vec in zip(sentences, emb):
            print(f"{np.linalg.norm(vec):.3f}  {vec[:4].round(3)} ...  {text}")
        if len(sentences) > 1:
            print(f"cosine(first, second) = {float(emb[0] @ emb[1]):.4f}")
        print(f"bytes per cut (fp16): {session.last_stats['cut_bytes']}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["Split inference runs a model across devices.", "A model is cut into stages on several machines."])
