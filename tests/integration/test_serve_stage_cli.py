"""`splitnet serve-stage` started by hand: READY line, serving, clean exit on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

import splitnet
from splitnet.model import load_model

pytestmark = pytest.mark.timeout(120)


def _start(blocks: str, index: int) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "splitnet.cli", "serve-stage", "--model", "minilm", "--blocks", blocks, "--bind", "tcp://127.0.0.1:0", "--stage-index", str(index), "--insecure"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline()  # blocks until READY (the process prints it once bound and loaded)
    assert line.startswith("READY "), (line, p.poll(), p.stderr.read() if p.poll() is not None else "")
    return p, line.split()[1]


def test_serve_stage_by_hand_then_sigterm(kill_leftovers):
    procs = []
    try:
        a, ep_a = _start("0:3", 0)
        procs.append(a)
        b, ep_b = _start("3:6", 1)
        procs.append(b)
        with splitnet.connect([ep_a, ep_b], timeout_s=30) as s:
            out = s.infer({"text": ["started by hand"]})["embedding"]
        bm = load_model("minilm")
        ref = bm.full()(bm.tokenize(["started by hand"]))["embedding"].numpy()
        assert np.abs(out - ref).max() < 1e-4
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            code = p.wait(timeout=20)
            assert code == 0, (code, p.stderr.read()[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_serve_stage_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "splitnet.cli", "serve-stage", "--model", "minilm", "--blocks", "4:2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "empty or negative" in r.stdout + r.stderr
