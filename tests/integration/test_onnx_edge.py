"""A torch-free edge: the first stage runs on this device with onnxruntime (exported with its
tokenizer), the rest of the model in stage processes; only the cut's features leave the device."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from splitnet.model import load_model
from splitnet.model.onnx_export import export_stage_onnx
from stage_processes import serve_stage

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(240)

TEXTS = ["the edge runs its stage without torch", "features cross the cut", "x"]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "edge0.onnx"
    export_stage_onnx(load_model("minilm", blocks=range(0, 2)), 0, 2, path)
    procs = []
    try:
        for blocks in ("2:4", "4:6"):
            p, ep = serve_stage(blocks, ["--insecure"])
            procs.append((p, ep))
        yield path, [ep for _, ep in procs]
    finally:
        for p, _ in procs:
            p.kill()
            p.wait(timeout=10)


_CLIENT = r"""
import json, sys
sys.modules["torch"] = None  # any torch import on the edge path fails loudly
import splitnet
from splitnet.edge.onnx_stage import OnnxStage
local = OnnxStage(sys.argv[1], threads=1)
with splitnet.connect(sys.argv[2].split(","), local_stage=local, timeout_s=60) as s:
    out = s.infer({"text": json.loads(sys.argv[3])})
    print(json.dumps({"embedding": out["embedding"].tolist(), "stats": {k: s.last_stats[k] for k in ("client_to_stage0_bytes", "local_ms")}}))
"""


def test_edge_stage_on_onnxruntime_without_torch(cloud):
    path, eps = cloud
    r = subprocess.run([sys.executable, "-c", _CLIENT, str(path), ",".join(eps), json.dumps(TEXTS)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    got = np.array(doc["embedding"], dtype=np.float32)
    bm = load_model("minilm")
    ref = bm.full()(bm.tokenize(TEXTS))["embedding"].numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    # what left the device is the cut (hidden states), not token ids
    T = bm.tokenize(TEXTS)["input_ids"].shape[1]
    assert doc["stats"]["client_to_stage0_bytes"] >= len(TEXTS) * T * 384 * 4
    assert doc["stats"]["local_ms"] > 0


def test_local_stage_must_match_the_served_model(cloud, tmp_path):
    import splitnet
    from splitnet.edge.onnx_stage import OnnxStage
    from splitnet.errors import ConfigError, PlanMismatch

    path, eps = cloud
    with pytest.raises(PlanMismatch, match="start at block 2"):
        splitnet.connect(eps[1:], local_stage=OnnxStage(path), timeout_s=30)  # blocks 4:6 after a 0:2 edge stage
    other = tmp_path / "vit.onnx"
    export_stage_onnx(load_model("tiny-vit", blocks=range(0, 1)), 0, 1, other)
    with pytest.raises(PlanMismatch, match="different models"):
        splitnet.connect(eps, local_stage=OnnxStage(other), timeout_s=30)
    with pytest.raises(ConfigError):
        splitnet.connect(eps, local_stage=type("S", (), {"blocks": (2, 4), "kind": "encoder"})(), timeout_s=30)


_GEN_CLIENT = r"""
import json, sys
sys.modules["torch"] = None
import splitnet
from splitnet.edge.onnx_stage import OnnxStage
local = OnnxStage(sys.argv[1], threads=1)
with splitnet.connect(sys.argv[2].split(","), local_stage=local, timeout_s=60) as s:
    r = s.generate(sys.argv[3], 20)
    print(json.dumps({"tokens": r.tokens, "cached": list(local.caches)}))
"""


def test_decoder_edge_stage_with_its_kv_cache_on_onnxruntime(tmp_path):
    """tiny-gpt2 blocks 0:2 on onnxruntime (KV cache fed back as tensors) + 2:4 and 4:6 served:
    greedy tokens, plain and speculative, equal those of the all-torch pipeline."""
    import splitnet
    from splitnet.edge.draft import DraftModel
    from splitnet.edge.onnx_stage import OnnxStage
    from splitnet.runtime.launcher import launch_pipeline

    path = export_stage_onnx(load_model("tiny-gpt2"), 0, 2, tmp_path / "g0.onnx")
    prompt = "def local(stage):\n    return"
    with launch_pipeline("tiny-gpt2", [2, 4]) as pipe:
        with splitnet.connect(pipe.endpoints, timeout_s=30) as s:
            want = s.generate(prompt, 20).tokens
        cloud_eps = pipe.endpoints[1:]
        local = OnnxStage(path, threads=1)
        with splitnet.connect(cloud_eps, local_stage=local, timeout_s=30) as s:
            assert s.generate(prompt, 20).tokens == want
            spec = s.generate(prompt, 20, draft=DraftModel("tiny-gpt2"), speculate_tokens=3)
            assert spec.tokens == want and spec.stats["speculative"]["acceptance"] == 1.0
        assert not local.caches, "released requests must leave no local cache behind"
        r = subprocess.run([sys.executable, "-c", _GEN_CLIENT, str(path), ",".join(cloud_eps), prompt], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout.strip().splitlines()[-1])
        assert doc["tokens"] == want and doc["cached"] == []


def test_local_cut_is_encoded_with_the_local_codec(cloud):
    """The edge encodes what it sends (here fp16): about half the bytes, same embedding within fp16 error."""
    import splitnet
    from splitnet.edge.onnx_stage import OnnxStage

    path, eps = cloud
    sent = {}
    outs = {}
    for codec in ("", "fp16"):
        with splitnet.connect(eps, local_stage=OnnxStage(path, threads=1), local_codec=codec, timeout_s=60) as s:
            outs[codec] = s.infer({"text": TEXTS})["embedding"]
            sent[codec] = s.last_stats["client_to_stage0_bytes"]
    assert sent["fp16"] < 0.55 * sent[""]
    cos = (outs[""] * outs["fp16"]).sum(1) / np.linalg.norm(outs[""], axis=1) / np.linalg.norm(outs["fp16"], axis=1)
    assert cos.min() > 0.999
