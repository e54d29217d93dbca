"""The edge path with torch, transformers, faiss and matplotlib import-blocked (a meta-path finder):
the CLI's help and edge commands, the codecs an edge encodes and decodes with numpy, a fitted codec
file, the tokenizer, and an ONNX edge stage driving torch stage processes.

The fast companion of test_edge_install.py (which builds a real `splitnet[edge]` venv)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from splitnet.codecs import make_codec, save_codec
from splitnet.model import load_model
from splitnet.model.onnx_export import export_stage_onnx
from stage_processes import serve_stage

pytestmark = pytest.mark.timeout(240)
BLOCKED = ("torch", "transformers", "faiss", "matplotlib")

_BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{{name}} is blocked: not part of the edge install", name=name)
            return None

    for m in list(sys.modules):
        if m.split(".")[0] in BLOCKED:
            del sys.modules[m]
    sys.meta_path.insert(0, _Blocked())
""")


def _run(code: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKER + textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_blocker_blocks():
    r = _run("import torch")
    assert r.returncode != 0 and "torch is blocked" in r.stderr


def test_cli_help_and_edge_commands_without_torch(tmp_path):
    r = _run("""
        import sys
        from splitnet.cli import main
        for argv in (["--help"], ["serve", "--help"], ["status", "--help"], ["export-onnx", "--help"], ["keys", "gen", "--out", sys.argv[1], "--name", "phone"]):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's --help
                code = e.code
            assert code == 0, (argv, code)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print("ok")
    """, str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok") and (tmp_path / "keys" / "phone.key_secret").is_file()


def test_edge_codecs_and_a_fitted_codec_file_with_numpy_only(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2048, 32)).astype(np.float32)
    fitted = make_codec("alignedvq", stages=2, nbits=6)
    fitted.fit(feats, progress=False)
    path = tmp_path / "avq.safetensors"
    save_codec(fitted, path)
    expected = fitted.decode(fitted.encode(feats[:64]))
    np.save(tmp_path / "x.npy", feats[:64])
    np.save(tmp_path / "expected.npy", expected)
    r = _run("""
        import sys
        import numpy as np
        from splitnet.codecs import load_codec, make_codec
        from splitnet.runtime.cut_codec import CutCodecs
        x = np.load(sys.argv[1] + "/x.npy")
        for name, tol in (("fp16", 1e-3), ("int8", 0.05), ("int4", 0.5)):
            c = make_codec(name)
            y = c.decode(c.encode(x))
            assert y.shape == x.shape and float(np.abs(y - x).max()) < tol * float(np.abs(x).max()), name
        avq = load_codec(sys.argv[1] + "/avq.safetensors")
        got = avq.decode(avq.encode(x))
        assert np.allclose(got, np.load(sys.argv[1] + "/expected.npy"), atol=1e-5)
        tensors, meta = CutCodecs("fp16").encode({"hidden": x[None]})
        assert "codecs" in meta or meta
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print("ok")
    """, str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


@pytest.fixture(scope="module")
def onnx_edge(tmp_path_factory):
    path = tmp_path_factory.mktemp("edge") / "edge0.onnx"
    export_stage_onnx(load_model("minilm", blocks=range(0, 2)), 0, 2, path)
    procs = []
    try:
        for blocks in ("2:4", "4:6"):
            procs.append(serve_stage(blocks, ["--insecure"]))
        yield path, [ep for _, ep in procs]
    finally:
        for p, _ in procs:
            p.kill()
            p.wait(timeout=10)


def test_onnx_edge_stage_against_torch_stages_without_torch(onnx_edge):
    path, eps = onnx_edge
    texts = ["the phone runs blocks 0:2 on onnxruntime", "fp16 crosses the cut"]
    r = _run("""
        import json, sys
        import splitnet
        from splitnet.edge.config import ClientConfig
        from splitnet.edge.onnx_stage import OnnxStage
        local = OnnxStage(sys.argv[1], threads=1)
        with splitnet.connect(sys.argv[2].split(","), local_stage=local, local_codec="fp16", config=ClientConfig(timeout_s=60)) as s:
            out = s.infer({"text": json.loads(sys.argv[3])})
            sent = s.last_stats["client_to_stage0_bytes"]
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print(json.dumps({"embedding": out["embedding"].tolist(), "sent": sent}))
    """, str(path), ",".join(eps), json.dumps(texts))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    bm = load_model("minilm")
    ref = bm.full()(bm.tokenize(texts))["embedding"].numpy()
    got = np.array(doc["embedding"], dtype=np.float32)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert got.shape == ref.shape and cos.min() > 0.999  # fp16 on the cut
    real_tokens = int(bm.tokenize(texts)["attention_mask"].sum())  # padding never crosses the cut
    # fp16 hidden states of the real tokens left the device (not token ids, not fp32)
    assert real_tokens * 384 * 2 <= doc["sent"] < real_tokens * 384 * 4
