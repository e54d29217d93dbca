"""README's keyed ONNX edge snippet, as written: ``connect([...], local_stage=OnnxStage(...),
local_codec="fp16", **keys)`` with ``keys = dict(client_key=..., server_key=...)`` (#19)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from splitnet.model import load_model
from splitnet.model.onnx_export import export_stage_onnx
from splitnet.wire.security import generate_keypair
from stage_processes import serve_stage

pytest.importorskip("onnxruntime")
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def test_readme_keyed_onnx_snippet_runs_as_written(tmp_path, kill_leftovers):
    import splitnet
    from splitnet.edge.onnx_stage import OnnxStage

    generate_keypair(tmp_path, "edge")
    generate_keypair(tmp_path / "allow", "laptop")
    os.replace(tmp_path / "allow" / "laptop.key_secret", tmp_path / "laptop.key_secret")
    path = tmp_path / "edge0.onnx"
    export_stage_onnx(load_model("minilm", blocks=range(0, 2)), 0, 2, path)
    secure = ["--server-key", str(tmp_path / "edge.key_secret"), "--keys-dir", str(tmp_path / "allow")]
    procs = []
    try:
        endpoints = []
        for blocks in ("2:4", "4:6"):
            p, ep = serve_stage(blocks, secure)
            procs.append(p)
            endpoints.append(ep)
        keys = dict(client_key=str(tmp_path / "laptop.key_secret"), server_key=str(tmp_path / "edge.key"))
        with splitnet.connect(endpoints, local_stage=OnnxStage(str(path)), local_codec="fp16", **keys) as session:
            out = session.infer({"text": ["hello"]})
            assert session.config.client_key == keys["client_key"] and session.socket_config.security is not None
        with splitnet.connect(endpoints, local_stage=OnnxStage(str(path)), **keys) as session:
            raw = session.infer({"text": ["hello"]})["embedding"]  # the cut in fp32
        got = out["embedding"]
        assert got.shape == raw.shape == (1, 384)
        cos = float((got * raw).sum() / np.linalg.norm(got) / np.linalg.norm(raw))
        assert cos > 0.999  # fp16 on the cut
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
