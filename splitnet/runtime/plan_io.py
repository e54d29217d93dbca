"""What the runtime takes from a plan: per-stage model, blocks, endpoint, runtime and cut codecs.

There is one plan reader, :func:`splitnet.planner.plan.as_plan` (validated: unknown fields,
versions, gaps between stages and cut mismatches are refused naming the field); this module only
turns a validated plan into what ``serve``, ``serve-stage`` and ``connect`` need, and fills stage
endpoints from a fleet file. It imports neither torch nor the planner's solvers (edge clients read
plans too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from splitnet.errors import ConfigError
from splitnet.planner.plan import Plan, as_plan

RAW_CODECS = ("raw", "fp32", "none")


@dataclass(frozen=True)
class StageLaunch:
    """What one ``serve-stage`` process of a plan needs."""

    index: int
    model: str
    start_block: int
    end_block: int
    device: str
    runtime: str
    endpoint: str  # "" when the plan does not say
    bind: str  # tcp://0.0.0.0:PORT from the endpoint ("" when there is none)
    codec_out: str  # registry name or codec file; "" sends raw
    codec_files: tuple[str, ...]  # fitted codecs this stage decodes its input with


def missing_endpoint_message(plan: Plan, index: int, plan_path: str | Path | None = None) -> str:
    s = plan.stages[index]
    where = f" of {plan_path}" if plan_path else ""
    return (f"plan stage {index} (device {s.device}, blocks {s.start}:{s.end}){where} has no endpoint; add "
            f"`endpoint: tcp://HOST:PORT` to device {s.device} in the fleet file and pass it with --devices FLEET "
            f"(or re-run `splitnet plan --devices FLEET`), or set stages[{index}].endpoint in the plan file")


def endpoints_from_plan(plan: Any) -> list[str]:
    """Stage endpoints, in order, from a plan whose stages have ``endpoint`` set."""
    p = as_plan(plan)
    for i, s in enumerate(p.stages):
        if not s.endpoint:
            raise ConfigError(missing_endpoint_message(p, i, plan if isinstance(plan, (str, Path)) else None))
    return [s.endpoint for s in p.stages]  # type: ignore[misc]


def model_hash_from_plan(plan: Any) -> str:
    """The model fingerprint a plan was made for ("" if it does not say)."""
    return as_plan(plan).model_hash


def fill_endpoints(plan: Plan, fleet_path: str | Path) -> Plan:
    """``plan`` with every stage that has no endpoint given its device's ``endpoint`` from the fleet
    file (endpoints already in the plan win); a device the fleet does not know is refused."""
    from splitnet.planner.profiles import load_fleet

    fleet = load_fleet(fleet_path)
    known = {d.name: d for d in fleet.devices}
    stages = []
    for s in plan.stages:
        dev = known.get(s.device)
        if dev is None:
            raise ConfigError(f"plan stage {s.index} runs on device {s.device!r}, which fleet {fleet_path} does not "
                              f"list (its devices: {', '.join(sorted(known))})")
        stages.append(replace(s, endpoint=s.endpoint or dev.endpoint, runtime=dev.runtime if s.runtime == "torch" else s.runtime))
    return replace(plan, stages=stages)


def stage_launches(plan: Plan) -> list[StageLaunch]:
    """Every stage of ``plan`` as a :class:`StageLaunch` (binds on all interfaces at the endpoint's port)."""
    cuts = {c.after_block: c for c in plan.cuts}
    out = []
    for s in plan.stages:
        out_cut, in_cut = cuts.get(s.end - 1), cuts.get(s.start - 1)
        codec_out = ""
        if out_cut is not None:
            codec_out = out_cut.codebook_file or out_cut.codec
        if codec_out in RAW_CODECS:
            codec_out = ""
        bind = ""
        if s.endpoint and s.endpoint.startswith("tcp://"):
            bind = f"tcp://0.0.0.0:{s.endpoint.rsplit(':', 1)[-1]}"
        elif s.endpoint:
            bind = s.endpoint
        out.append(StageLaunch(
            index=s.index, model=plan.model, start_block=s.start, end_block=s.end, device=s.device, runtime=s.runtime,
            endpoint=s.endpoint or "", bind=bind, codec_out=codec_out,
            codec_files=tuple(f for f in ((in_cut.codebook_file if in_cut else None),) if f),
        ))
    return out


def stage_from_plan(plan: Any, index: int | None) -> StageLaunch:
    """Model, blocks, bind address and codecs for stage ``index`` of a plan."""
    launches = stage_launches(as_plan(plan))
    if index is None or not 0 <= index < len(launches):
        raise ConfigError(f"--stage must be an index in 0..{len(launches) - 1} of the plan, got {index}")
    return launches[index]
