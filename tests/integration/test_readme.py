"""README.md runs as written: every shell command and Python snippet is extracted and run, in order,
in a fresh directory (with this checkout's examples/, deploy/ and venv linked in, as in a clone).

A command is skipped or changed only by a rule below, with its reason printed. Servers
(`serve-stage`, `serve --device cloud`) run in the background until the end, so the snippets after
them reach them. The fast test classifies every block and parses every command with the CLI; the
slow one runs them all (a few minutes: demos and stage processes)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitnet.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.prefix)


@dataclass(frozen=True)
class Rule:
    prefix: str  # the command as written starts with this
    action: str  # "skip", "replace" or "background"
    reason: str
    replacement: str = ""
    ready: str = ""  # for background: the stdout line that says it is up


RULES = [
    Rule("python3 -m venv .venv && .venv/bin/pip install -e '.[full]' && .venv/bin/splitnet demo", "replace",
         "the test runs inside the venv this line creates; only its `splitnet demo` runs", ".venv/bin/splitnet demo"),
    Rule("python3 -m venv .venv && .venv/bin/pip install -e '.[full,test]'", "skip",
         "the CI command itself: installs and runs this suite (.ci/run)"),
    Rule("pip install 'splitnet[edge]'", "skip", "tests/integration/test_edge_install.py (slow) builds that venv from the registry"),
    Rule(".venv/bin/splitnet bench wire --json", "replace", "a benchmark: run with its small flags",
         ".venv/bin/splitnet bench wire --json --rtt-iters 20 --tput-messages 8 --repeats 1"),
    Rule("splitnet serve-stage", "background", "a server: runs until the end of the README", ready="READY"),
    Rule("splitnet serve --plan plan.yaml --device cloud", "background", "a server: runs until the end of the README",
         ready="serving"),
    Rule("docker compose", "skip", "no Docker engine here; tests/unit/test_compose_file.py checks docker-compose.yml"),
    Rule("kubectl apply", "skip", "no cluster here; tests/unit/test_k8s_manifests.py validates deploy/k8s"),
]


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"^```(bash|python)\n(.*?)^```", README.read_text(), re.S | re.M)


def _commands(text: str) -> list[str]:
    """Shell commands of a bash block: continuation lines joined, blank lines dropped."""
    return [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip() and not c.strip().startswith("#")]


def _rule(cmd: str) -> Rule | None:
    return next((r for r in RULES if cmd.startswith(r.prefix)), None)


def _steps() -> list[tuple[str, str, Rule | None]]:
    steps = []
    for lang, text in _blocks():
        if lang == "python":
            steps.append(("python", text, None))
        else:
            steps += [("bash", c, _rule(c)) for c in _commands(text)]
    return steps


def test_every_block_is_run_or_skipped_for_a_reason_and_parses():
    steps = _steps()
    assert sum(lang == "python" for lang, _, _ in steps) >= 5 and sum(lang == "bash" for lang, _, _ in steps) >= 15
    parser = build_parser()
    for lang, text, rule in steps:
        if lang == "python":
            compile(text, "README.md", "exec")
            continue
        if rule is not None:
            assert rule.reason
            if rule.action == "skip":
                print(f"skipped: {text}\n  because {rule.reason}")
                continue
        for part in (rule.replacement if rule and rule.replacement else text).split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] in ("splitnet", ".venv/bin/splitnet"):
                args = parser.parse_args(words[1:])  # SystemExit (a failure) on an unknown flag
                assert getattr(args, "func", None), part
    used = {r.prefix for _, _, r in steps if r is not None}
    assert used == {r.prefix for r in RULES}, "a rule matches nothing in README.md: drop it"


def _wait_ready(p: subprocess.Popen, ready: str, cmd: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"{cmd} exited ({p.poll()}) before {ready!r}")
        if line.startswith(ready):
            return
    raise AssertionError(f"{cmd}: no {ready!r} within {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_readme_runs_as_written(tmp_path, kill_leftovers):
    for name in ("examples", "deploy"):  # what a clone has next to README.md
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / ".venv").symlink_to(VENV)
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    background: list[subprocess.Popen] = []
    try:
        for i, (lang, text, rule) in enumerate(_steps()):
            if lang == "python":
                r = subprocess.run([sys.executable, "-c", text], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=300)
                assert r.returncode == 0, f"README python snippet {i} failed:\n{text}\n{r.stderr[-3000:]}"
                continue
            cmd = text
            if rule is not None:
                print(f"{rule.action}: {text}\n  because {rule.reason}")
                if rule.action == "skip":
                    continue
                cmd = rule.replacement or text
            if rule is not None and rule.action == "background":
                p = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
                background.append(p)
                _wait_ready(p, rule.ready, cmd)
                continue
            r = subprocess.run(["bash", "-ec", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"README command failed: {cmd}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
            assert "Traceback" not in r.stderr, cmd
        assert (tmp_path / "edge" / "phone.client.json").is_file() and (tmp_path / "edge0.onnx").is_file()
        assert all(p.poll() is None for p in background), "a README server died"
    finally:
        for p in background:
            p.send_signal(signal.SIGTERM)
        for p in background:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
