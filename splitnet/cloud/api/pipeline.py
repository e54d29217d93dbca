"""What the API knows about the pipeline it serves: model, kind, context, tokenizer, template.

Read once at start from the first session's handshake (every stage's ``info``) and the model
directory (tokenizer, end-of-text ids, chat template), so a request is checked (kind, context
length) before it takes a session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitnet.cloud.api.chat_template import ChatTemplate, load_chat_template
from splitnet.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class PipelineFacts:
    model: str  # what the stages report (built-in name or directory)
    served_name: str
    kind: str  # "decoder" | "encoder" | "vision" | ...
    fingerprint: str
    max_positions: int | None
    num_stages: int
    tokenizer: Any
    eos_ids: frozenset[int]
    chat_template: ChatTemplate
    model_dir: str
    endpoints: tuple[str, ...] = ()
    vocab_size: int | None = None


def _eos_ids(model_dir: Path, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        f = model_dir / name
        if f.is_file():
            try:
                v = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError):
                continue
            ids.update([v] if isinstance(v, int) else [x for x in (v or []) if isinstance(x, int)])
    if isinstance(getattr(tokenizer, "eos_id", None), int):
        ids.add(tokenizer.eos_id)
    return frozenset(ids)


def read_facts(session: Any, served_name: str = "", model_dir: str = "") -> PipelineFacts:
    """The facts of the pipeline ``session`` is connected to; ``model_dir`` overrides where the
    tokenizer and chat template are read (needed when the stages' model path does not exist here)."""
    from splitnet.model.loading import _tokenizer_for, resolve_model_dir
    from splitnet.model.weights import read_config

    first = session.stages[0]
    model = str(first["model"])
    try:
        d = Path(model_dir) if model_dir else resolve_model_dir(model)
    except ModelLoadError as e:
        raise ConfigError(f"the stages serve model {model!r}, which is not a built-in or a directory on this machine; "
                          "pass --model-dir with a copy of its config.json and tokenizer files") from e
    if not (d / "config.json").is_file():
        raise ConfigError(f"--model-dir {d} has no config.json")
    model_config = read_config(d)
    tokenizer = _tokenizer_for(model_config, d)
    kind = str(first["kind"])
    if tokenizer is None and kind in ("decoder", "encoder"):
        raise ConfigError(f"model {model!r} has no tokenizer (tokenizer.json) in {d}; the API needs one to turn text into tokens")
    limit = first.get("max_positions")
    return PipelineFacts(
        model=model,
        served_name=served_name or (Path(model).name if "/" in model else model),
        kind=kind,
        fingerprint=str(first.get("fingerprint", "")),
        max_positions=limit if isinstance(limit, int) else None,
        num_stages=len(session.stages),
        tokenizer=tokenizer,
        eos_ids=_eos_ids(d, tokenizer) if kind == "decoder" else frozenset(),
        chat_template=load_chat_template(d),
        model_dir=str(d),
        endpoints=tuple(session.endpoints),
        vocab_size=model_config.get("vocab_size") if isinstance(model_config.get("vocab_size"), int) else None,
    )
