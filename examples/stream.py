"""Stream tokens as they arrive from a decoder split into stage processes.

    python examples/stream.py [--model tiny-gpt2] [--prompt "for i in"] [--tokens 16]

``stream`` yields a TokenChunk per token (id, offset, the text it completes), then the same
GenerationResult ``generate`` returns.
"""

from __future__ import annotations

import argparse
import sys

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.generation import GenerationResult, TokenChunk
from splitnet.runtime.launcher import launch_pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-gpt2")
    ap.add_argument("--prompt", default="for i in")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    with launch_pipeline(args.model, num_stages=3) as pipe, \
            splitnet.connect(pipe.endpoints, config=ClientConfig(timeout_s=60)) as session:
        streamed = []
        for event in session.stream(args.prompt, args.tokens):
            if isinstance(event, TokenChunk):
                streamed.append(event.token)
                sys.stdout.write(repr(event.text)[1:-1] if event.text is not None else f"<{event.token}>")
                sys.stdout.flush()
            elif isinstance(event, GenerationResult):
                print(f"\n{len(event.tokens)} tokens streamed ({event.finish_reason}); same as the result: {streamed == event.tokens}")


if __name__ == "__main__":
    main()
