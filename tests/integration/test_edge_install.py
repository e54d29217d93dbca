"""`pip install 'splitnet[edge]'` into a fresh venv (no system site-packages: nothing leaks from the
full install): no torch there, and its ONNX edge stage drives torch stage processes started from the
full venv. Prints both venv sizes (goal: edge <= 25 % of full).

Slow (pip builds splitnet and installs the base set from the registry or pip's cache); the fast
companion is test_edge_path_without_torch.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from splitnet.model import load_model
from splitnet.model.onnx_export import export_stage_onnx
from stage_processes import serve_stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
NOT_IN_EDGE = ("torch", "transformers", "faiss", "matplotlib", "sklearn")

_CLIENT = r"""
import json, sys
import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.onnx_stage import OnnxStage
with splitnet.connect(sys.argv[2].split(","), local_stage=OnnxStage(sys.argv[1], threads=1), local_codec="fp16",
                      config=ClientConfig(timeout_s=60)) as s:
    out = s.infer({"text": json.loads(sys.argv[3])})
print(json.dumps({"embedding": out["embedding"].tolist(), "splitnet": splitnet.__file__}))
"""


def _size_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venvs") / "edge"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    r = subprocess.run([str(env_dir / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", f"{ROOT}[edge]"],
                       capture_output=True, text=True, timeout=540, cwd=env_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    return env_dir


def test_edge_venv_has_no_torch_and_runs_the_onnx_stage(edge_venv, tmp_path, kill_leftovers):
    py = str(edge_venv / "bin" / "python")
    for mod in NOT_IN_EDGE:
        r = subprocess.run([py, "-c", f"import {mod}"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert r.returncode != 0 and "No module named" in r.stderr, mod
    r = subprocess.run([str(edge_venv / "bin" / "splitnet"), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "serve-stage" in r.stdout, r.stderr[-2000:]

    onnx = tmp_path / "edge0.onnx"
    export_stage_onnx(load_model("minilm", blocks=range(0, 2)), 0, 2, onnx)  # on the full install
    procs = [serve_stage(b, ["--insecure"]) for b in ("2:4", "4:6")]  # torch stages from the full venv
    texts = ["an edge venv without torch", "runs blocks 0:2 on onnxruntime"]
    try:
        r = subprocess.run([py, "-c", _CLIENT, str(onnx), ",".join(ep for _, ep in procs), json.dumps(texts)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=180)
    finally:
        for p, _ in procs:
            p.kill()
            p.wait(timeout=10)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["splitnet"].startswith(str(edge_venv))  # the installed copy, not this checkout
    bm = load_model("minilm")
    ref = bm.full()(bm.tokenize(texts))["embedding"].numpy()
    got = np.array(doc["embedding"], dtype=np.float32)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert got.shape == ref.shape and cos.min() > 0.999

    edge_b, full_b = _size_bytes(edge_venv), _size_bytes(Path(sys.prefix))
    print(f"\nedge venv {edge_b / 2**20:.0f} MiB, full venv {full_b / 2**20:.0f} MiB ({sys.prefix}): "
          f"{100 * edge_b / full_b:.1f} % (goal <= 25 %)")
    assert edge_b <= 0.25 * full_b
