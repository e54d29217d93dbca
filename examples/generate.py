"""Greedy generation through a decoder split into stage processes with KV caches.

    python examples/generate.py [--model tiny-gpt2] [--prompt "def main():"] [--tokens 24]

``tiny-gpt2`` is a GPT-2 architecture with seeded random weights (no download): its text is
noise, but every token equals what the unsplit model would produce. Use ``--model stdlib-gpt``
after ``splitnet train-lm`` for a model that writes Python, or a Hugging Face directory.
"""

from __future__ import annotations

import argparse

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.runtime.launcher import launch_pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--prompt", default="def main():")
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    with launch_pipeline(args.model, num_stages=2) as pipe, \
            splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=60)) as session:
        result = session.generate(args.prompt, args.tokens)  # a GenerationResult
        print(f"prompt      {args.prompt!r} ({len(result.prompt_ids)} tokens)")
        print(f"tokens      {result.tokens}")
        print(f"text        {result.text!r}")
        print(f"finish      {result.finish_reason}; first token {result.ttft_ms:.0f} ms, all {result.latency_ms:.0f} ms")
        many = session.generate_many([args.prompt, "import os"], 8)  # decode pipelined across sequences
        for r in many:
            print(f"many[{r.index}]     {r.tokens}")


if __name__ == "__main__":
    main()
