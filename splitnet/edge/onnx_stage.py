"""Run an exported stage with onnxruntime: numpy in, numpy out, no torch import.

A decoder stage keeps one KV cache per request here (numpy arrays fed back as ``past_*``
inputs); ``pos`` says where a call's tokens start, so a cache is trimmed when the client rejected
speculative tokens, and a request is forgotten with :meth:`OnnxStage.release`."""

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
        self.tokenizer = _tokenizer(meta, path)
        self.kv_layers: list[int] = json.loads(meta.get("splitnet.kv_layers", "[]"))
        graph_inputs = self.session.get_inputs()
        self._past = {i.name: i.shape for i in graph_inputs if i.name.startswith("past_")}  # the KV cache, fed back
        self._inputs = {i.name: i.type for i in graph_inputs if i.name not in self._past}  # what callers pass
        self._present = [o.name for o in self.session.get_outputs() if o.name.startswith("present_")]
        self.caches: dict[str, list[np.ndarray]] = {}
        self.max_requests = 64

    @property
    def is_first(self) -> bool:
        return self.blocks[0] == 0

    @property
    def uses_kv_cache(self) -> bool:
        return bool(self.kv_layers)

    def cache_length(self, request: str) -> int:
        c = self.caches.get(request)
        return int(c[0].shape[2]) if c else 0

    def release(self, request: str) -> None:
        self.caches.pop(request, None)

    def __call__(self, inputs: Mapping[str, np.ndarray], *, request: str | None = None, pos: int | None = None) -> dict[str, np.ndarray]:
        """Outputs of the stage for ``inputs``; a decoder stage extends ``request``'s cache from
        position ``pos`` (default: its end; earlier positions are dropped first)."""
        if not self.kv_layers:
            return self._run(inputs, {})
        if request is None:
            raise StageError("a decoder stage needs a request id to keep its KV cache under")
        batch = int(np.asarray(next(iter(inputs.values()))).shape[0])
        cache = self.caches.get(request)
        if cache is None:
            if len(self.caches) >= self.max_requests:
                self.caches.pop(next(iter(self.caches)))
            cache = [np.zeros((batch, int(s[1]), 0, int(s[3])), np.float32) for s in self._past.values()]
        length = int(cache[0].shape[2])
        if pos is not None and pos != length:
            if not 0 <= pos < length:
                raise StageError(f"request {request!r} continues at position {pos} but the local cache holds {length}; replay it from its first token")
            cache = [c[:, :, :pos] for c in cache]
        outs = self._run(inputs, dict(zip(self._past, cache)))
        self.caches[request] = [outs.pop(n) for n in self._present]
        return outs

    def _run(self, inputs: Mapping[str, np.ndarray], past: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(set(self._inputs) - set(inputs))
        if missing:
            raise StageError(f"ONNX stage {self.blocks} needs inputs {missing}, got {sorted(inputs)}")
        feed = {}
        for name, typ in self._inputs.items():
            arr = np.asarray(inputs[name])
            want = np.int64 if "int64" in typ else np.float32 if "float" in typ else arr.dtype
            feed[name] = np.ascontiguousarray(arr, dtype=want)
        feed.update(past)
        names = list(self._out_names) + self._present
        outs = self.session.run(names, feed)
        return {self._out_names.get(k, k): v for k, v in zip(names, outs)}


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
