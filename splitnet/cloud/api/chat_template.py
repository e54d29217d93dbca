"""Chat messages -> one prompt string: the model directory's own chat template, or a plain fallback.

Where a template is found (first hit wins, as transformers looks):
``chat_template.jinja``, ``chat_template.json`` (``{"chat_template": ...}``), then
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{"name", "template"}``
from which ``"default"`` is taken). It is rendered the way transformers renders it: jinja2's
*sandboxed* environment (a template is data from a model directory, it must not reach Python
objects), ``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``tojson`` that
keeps non-ASCII, ``raise_exception`` and ``strftime_now`` helpers, and the tokenizer's special
tokens (``bos_token``, ``eos_token``, ...) as variables, with ``add_generation_prompt=True``.

Without a template, :data:`FALLBACK_FORMAT` is used: one ``<role>: <content>`` line per
message, then ``assistant:`` for the model to continue (documented in docs/api.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from splitnet.errors import ConfigError

FALLBACK_FORMAT = "{role}: {content}\n"
FALLBACK_GENERATION_PROMPT = "assistant:"

_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may refer to (``source`` says where it came from)."""

    template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)
    source: str = "fallback"

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt for ``messages`` (``[{"role": ..., "content": ...}]``), ready for generation."""
        if self.template is None:
            return "".join(FALLBACK_FORMAT.format(role=m["role"], content=m.get("content") or "") for m in messages) + FALLBACK_GENERATION_PROMPT
        from jinja2.exceptions import TemplateError

        try:
            compiled = _environment().from_string(self.template)
            return compiled.render(messages=list(messages), add_generation_prompt=True, **self.special_tokens)
        except TemplateError as e:
            raise ConfigError(f"the chat template from {self.source} failed on these messages: {e}") from e


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON ({e}); fix or remove it") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return doc


def load_chat_template(model_dir: str | Path | None) -> ChatTemplate:
    """The chat template of the model in ``model_dir`` (None or no template: the fallback)."""
    if model_dir is None:
        return ChatTemplate(None)
    d = Path(model_dir)
    tok_config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    special = {k: t for k in _SPECIAL_TOKENS if (t := _token_text(tok_config.get(k))) is not None}
    if (d / "chat_template.jinja").is_file():
        return ChatTemplate((d / "chat_template.jinja").read_text(encoding="utf-8"), special, str(d / "chat_template.jinja"))
    if (d / "chat_template.json").is_file():
        t = _read_json(d / "chat_template.json").get("chat_template")
        if isinstance(t, str):
            return ChatTemplate(t, special, str(d / "chat_template.json"))
    t = tok_config.get("chat_template")
    if isinstance(t, list):  # named templates: transformers uses "default"
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    if isinstance(t, str) and t:
        return ChatTemplate(t, special, str(d / "tokenizer_config.json"))
    return ChatTemplate(None, special)
