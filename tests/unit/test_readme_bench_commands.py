"""README's headline bench commands sit in a ```text block (benches of minutes, not run by
tests/integration/test_readme.py); they must still parse with the CLI as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from splitnet.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


def _text_block_commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"^```text\n(.*?)^```", README.read_text(), re.S | re.M):
        for line in block.splitlines():
            words = shlex.split(line)
            while words and ("=" in words[0] or words[0] == "sudo"):  # env assignments, sudo
                words = words[1:]
            if words and words[0] == "splitnet":
                out.append(words[1:])
    return out


def test_readme_text_block_bench_commands_parse():
    cmds = _text_block_commands()
    assert {c[1] for c in cmds if c[0] == "bench"} >= {"vision", "e2e"}
    parser = build_parser()
    for words in cmds:
        args = parser.parse_args(words)  # SystemExit (a failure) on an unknown flag
        assert getattr(args, "func", None), words
