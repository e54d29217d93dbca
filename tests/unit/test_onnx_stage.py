"""ONNX export of encoder and ViT stages, run by onnxruntime, equals the torch stage."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from splitnet.edge.onnx_stage import OnnxStage  # noqa: E402
from splitnet.errors import StageError  # noqa: E402
from splitnet.model import load_model  # noqa: E402
from splitnet.model.onnx_export import export_stage_onnx  # noqa: E402


def test_minilm_first_and_last_stage_in_onnxruntime(tmp_path):
    bm = load_model("minilm")
    first = OnnxStage(export_stage_onnx(bm, 0, 2, tmp_path / "s0.onnx"))
    last = OnnxStage(export_stage_onnx(bm, 2, 6, tmp_path / "s1.onnx"))
    assert first.blocks == (0, 2) and last.blocks == (2, 6) and first.fingerprint == bm.fingerprint()
    texts = ["a batch with a different length than the export example had", "two"]
    batch = bm.tokenize(texts)
    h = first({k: v.numpy() for k, v in batch.items()})
    emb = last(h)["embedding"]
    ref = bm.full()(batch)["embedding"].numpy()
    assert np.abs(emb - ref).max() < 1e-4


def test_onnx_stage_runs_without_torch(tmp_path):
    bm = load_model("tiny-vit")
    path = export_stage_onnx(bm, 0, 3, tmp_path / "vit0.onnx")
    code = (
        "import sys, numpy as np\n"
        "sys.modules['torch'] = None  # any torch import now fails\n"
        "from splitnet.edge.onnx_stage import OnnxStage\n"
        f"s = OnnxStage({str(path)!r})\n"
        "out = s({'pixel_values': np.zeros((1, 3, 32, 32), np.float32)})\n"
        "print(out['hidden'].shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(1, 17, 64)" in r.stdout


def test_decoder_stage_carries_its_kv_cache(tmp_path):
    """A decoder stage's cache goes in as past_* tensors and comes out grown; the runner keeps it
    per request, trims it when asked to continue from an earlier position, and matches torch."""
    import torch

    bm = load_model("tiny-gpt2")
    st = OnnxStage(export_stage_onnx(bm, 0, 2, tmp_path / "g0.onnx"))
    assert st.uses_kv_cache and st.kv_layers == [0, 1] and st.tokenizer is not None
    ref = bm.stage(0, 2)
    cache = ref.new_cache()

    def both(ids, pos=None):
        a = st({"input_ids": np.array(ids)}, request="r", pos=pos)["hidden"]
        if pos is not None and pos < cache.length:
            cache.truncate(pos)
        b = ref({"input_ids": torch.tensor(ids)}, cache)["hidden"].numpy()
        return float(np.abs(a - b).max())

    assert both([[3, 9, 27, 81, 4]], pos=0) < 1e-5  # prefill from an empty cache
    assert both([[11]]) < 1e-5 and both([[12]]) < 1e-5  # one token at a time
    assert st.cache_length("r") == 7
    assert both([[50, 51]], pos=6) < 1e-5 and st.cache_length("r") == 8  # rejected token 12 dropped
    with pytest.raises(StageError, match="position 9"):
        st({"input_ids": np.array([[1]])}, request="r", pos=9)
    with pytest.raises(StageError, match="request id"):
        st({"input_ids": np.array([[1]])})
    st.release("r")
    assert st.cache_length("r") == 0


@pytest.mark.parametrize("model, blocks", [("tiny-llama", (0, 2)), ("tiny-qwen2", (2, 4))])
def test_transformers_layer_decoder_stage_in_onnxruntime(tmp_path, model, blocks):
    """Stages built from transformers' own layers export with their DynamicCache as past/present
    tensors and match torch in onnxruntime: prefill, single tokens, a rewind."""
    import torch

    a, b = blocks
    bm = load_model(model)
    st = OnnxStage(export_stage_onnx(bm, a, b, tmp_path / "s.onnx"))
    assert st.uses_kv_cache and st.kv_layers == list(range(a, b))
    ref = bm.stage(a, b)
    cache = ref.new_cache()
    key = "input_ids" if a == 0 else "hidden"
    rng = np.random.default_rng(0)

    def both(n, pos=None):
        x = rng.integers(0, 200, (1, n)) if a == 0 else rng.standard_normal((1, n, bm.hidden_size)).astype(np.float32)
        out = st({key: x}, request="r", pos=pos)
        if pos is not None and pos < cache.length:
            cache.truncate(pos)
        want = ref({key: torch.tensor(x)}, cache)
        name = "hidden" if "hidden" in want else "logits"
        return float(np.abs(out[name] - want[name].numpy()).max())

    assert both(5, pos=0) < 1e-4
    assert both(1) < 1e-4 and both(1) < 1e-4
    assert both(2, pos=6) < 1e-4 and st.cache_length("r") == 8
