"""Run an exported stage with onnxruntime: numpy in, numpy out, no torch import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from splitnet.errors import ModelLoadError, StageError


class OnnxStage:
    """A stage exported by :func:`splitnet.model.onnx_export.export_stage_onnx`.

    Attributes mirror what a torch stage worker reports: ``model``, ``fingerprint``, ``kind``,
    ``blocks`` and ``num_blocks``.
    """

    def __init__(self, path: str | Path, *, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ModelLoadError("onnxruntime is not installed: pip install onnxruntime") from e
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"ONNX stage file {path} does not exist; export it with `splitnet export-onnx`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "splitnet.blocks" not in meta:
            raise ModelLoadError(f"{path} was not exported by splitnet (no splitnet.* metadata)")
        self.model = meta["splitnet.model"]
        self.fingerprint = meta["splitnet.fingerprint"]
        self.kind = meta["splitnet.kind"]
        self.blocks = tuple(json.loads(meta["splitnet.blocks"]))
        self.num_blocks = int(meta["splitnet.num_blocks"])
        self._out_names = json.loads(meta["splitnet.outputs"])
        self._inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.tokenizer = _tokenizer(meta, path)

    @property
    def is_first(self) -> bool:
        return self.blocks[0] == 0

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(set(self._inputs) - set(inputs))
        if missing:
            raise StageError(f"ONNX stage {self.blocks} needs inputs {missing}, got {sorted(inputs)}")
        feed = {}
        for name, typ in self._inputs.items():
            arr = np.asarray(inputs[name])
            want = np.int64 if "int64" in typ else np.float32 if "float" in typ else arr.dtype
            feed[name] = np.ascontiguousarray(arr, dtype=want)
        outs = self.session.run(list(self._out_names), feed)
        return {self._out_names[k]: v for k, v in zip(self._out_names, outs)}


def _tokenizer(meta: Mapping[str, str], path: Path):
    """The tokenizer exported with a first stage (torch-free), or None."""
    spec = meta.get("splitnet.tokenizer", "")
    if spec == "bytes":
        from splitnet.model.tokenizer import ByteTokenizer

        return ByteTokenizer()
    if spec.startswith("file:"):
        from splitnet.model.tokenizer import HFTokenizer

        f = path.with_name(spec[len("file:"):])
        if not f.is_file():
            raise ModelLoadError(f"{path} expects its tokenizer at {f}; copy it along with the .onnx file")
        return HFTokenizer(f, pad_id=int(meta.get("splitnet.pad_id", "0")))
    return None
