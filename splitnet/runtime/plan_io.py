"""What the runtime reads from a plan file: per-stage model, blocks, endpoint and cut codec.

The plan format itself belongs to :mod:`splitnet.planner.plan`; this module reads only the
fields the runtime needs from a YAML/JSON file, a mapping, or a plan object with ``to_dict()``,
and checks them so that a hand-edited plan fails with a clear message.
"""

from __future__ import annotations

from typing import Any

from splitnet.documents import read_document
from splitnet.errors import ConfigError, PlanMismatch


def plan_document(plan: Any) -> dict:
    """A plan as a mapping: given as a dict, an object with to_dict(), or a YAML/JSON file."""
    if isinstance(plan, dict):
        return plan
    if hasattr(plan, "to_dict"):
        return plan.to_dict()
    doc = read_document(plan, "plan")
    if not isinstance(doc, dict):
        raise ConfigError(f"plan file {plan} is not a mapping")
    return doc


def plan_stages(doc: dict) -> list[dict]:
    stages = doc.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("plan has no 'stages' list")
    expected = 0
    for i, s in enumerate(stages):
        blocks = s.get("blocks") if isinstance(s, dict) else None
        if not (isinstance(blocks, (list, tuple)) and len(blocks) == 2 and all(isinstance(b, int) for b in blocks)):
            raise ConfigError(f"plan stage {i}: 'blocks' must be [start, end)")
        if blocks[0] != expected:
            raise PlanMismatch(f"plan stage {i} starts at block {blocks[0]}, expected {expected}: stages must be contiguous")
        expected = blocks[1]
    return stages


def endpoints_from_plan(plan: Any) -> list[str]:
    """Stage endpoints, in order, from a plan whose stages have ``endpoint`` set."""
    stages = plan_stages(plan_document(plan))
    missing = [i for i, s in enumerate(stages) if not s.get("endpoint")]
    if missing:
        raise ConfigError(f"plan stages {missing} have no 'endpoint'; fill them in (tcp://host:port of each serve-stage)")
    return [s["endpoint"] for s in stages]


def model_hash_from_plan(plan: Any) -> str:
    """The model fingerprint a plan was made for ("" if it does not say)."""
    return str(plan_document(plan).get("model_hash") or "")


def _cut_codecs(doc: dict) -> dict[int, dict]:
    """Cut codecs keyed by the block after which the cut lies."""
    out = {}
    for c in doc.get("cuts") or []:
        if isinstance(c, dict) and isinstance(c.get("after_block"), int):
            out[c["after_block"]] = c
    return out


def stage_from_plan(plan: Any, index: int | None) -> dict:
    """Model, blocks, bind address and codecs for stage ``index`` of a plan."""
    doc = plan_document(plan)
    stages = plan_stages(doc)
    if index is None or not 0 <= index < len(stages):
        raise ConfigError(f"--stage must be an index in 0..{len(stages) - 1} of the plan")
    s = stages[index]
    model = doc.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("path")
    cuts = _cut_codecs(doc)
    start, end = s["blocks"]
    out_cut = cuts.get(end - 1, {})
    in_cut = cuts.get(start - 1, {})
    codec_out = s.get("codec_out") or out_cut.get("codebook_file") or out_cut.get("codec") or ""
    if codec_out in ("raw", "fp32", "none"):
        codec_out = ""
    codec_files = [f for f in (in_cut.get("codebook_file"),) if f]
    endpoint = s.get("bind") or s.get("endpoint") or ""
    bind = ""
    if endpoint.startswith("tcp://"):
        port = endpoint.rsplit(":", 1)[-1]
        bind = f"tcp://0.0.0.0:{port}"
    return {"model": model, "blocks": [start, end], "bind": bind, "codec_out": codec_out, "codec_files": codec_files}
