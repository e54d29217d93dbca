"""What ``Session.infer`` accepts, checked before any work: the keys each model kind takes.

A wrong call (``infer("hello")``, a misspelt key, a missing one, a value that is not numeric)
raises :class:`~splitnet.errors.ConfigError` at once, naming the keys the pipeline expects,
instead of a TypeError from deep inside a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from splitnet.errors import ConfigError


@dataclass(frozen=True)
class InputSpec:
    """The inputs of one model kind: one of ``required_any`` must be present, ``optional`` may
    be, and ``text`` tells whether ``{"text": ...}`` (tokenized here) works."""

    required_any: tuple[str, ...]
    optional: tuple[str, ...] = ()
    text: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return self.required_any + self.optional


INPUTS_BY_KIND: dict[str, InputSpec] = {
    "decoder": InputSpec(("input_ids",), ("attention_mask",), text=True),
    "encoder": InputSpec(("input_ids",), ("attention_mask", "token_type_ids"), text=True),
    "vision": InputSpec(("pixel_values",)),
    "sequential": InputSpec(("x", "hidden")),
}


def _describe(kind: str, spec: InputSpec) -> str:
    text = ", or {'text': [...]} (with 'max_length')" if spec.text else ""
    need = " or ".join(repr(k) for k in spec.required_any)
    extra = f" (optional: {', '.join(repr(k) for k in spec.optional)})" if spec.optional else ""
    return f"this pipeline serves a {kind} model: pass {need}{extra} as arrays{text}"


def check_infer_inputs(inputs: Any, kind: str) -> dict[str, Any]:
    """A checked copy of ``inputs`` for a pipeline of model ``kind``; ConfigError otherwise."""
    spec = INPUTS_BY_KIND.get(kind)
    if not isinstance(inputs, Mapping):
        hint = _describe(kind, spec) if spec is not None else "pass a mapping of input name -> array"
        raise ConfigError(f"infer() takes a mapping of model inputs, got {type(inputs).__name__}; {hint}")
    inputs = dict(inputs)
    if spec is None:
        return inputs
    if "text" in inputs:
        if not spec.text:
            raise ConfigError(f"{{'text': ...}} needs a text model; {_describe(kind, spec)}")
        texts = inputs["text"]
        if not (isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts))):
            raise ConfigError("inputs['text'] must be a string or a non-empty list of strings")
        unknown = sorted(set(inputs) - {"text", "max_length"})
        if unknown:
            raise ConfigError(f"with 'text', only 'max_length' may be given too, got {unknown}")
        return inputs
    unknown = sorted(set(inputs) - set(spec.keys))
    if unknown:
        raise ConfigError(f"unknown input key(s) {unknown}; {_describe(kind, spec)}")
    if not any(k in inputs for k in spec.required_any):
        raise ConfigError(f"missing input {' or '.join(repr(k) for k in spec.required_any)}; {_describe(kind, spec)}")
    for name, value in inputs.items():
        if hasattr(value, "detach") and hasattr(value, "dtype"):  # a torch tensor: the wire encodes it as it is
            continue
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf" or arr.ndim < 1:
            raise ConfigError(f"input {name!r} must be a numeric array (numpy or torch), got {type(value).__name__} of dtype {arr.dtype}")
        inputs[name] = arr
    return inputs


__all__ = ["INPUTS_BY_KIND", "InputSpec", "check_infer_inputs"]
