"""From profiles to a :class:`~splitnet.planner.plan.Plan`, and re-planning when the fleet changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

from splitnet.errors import ConfigError
from splitnet.planner.cost import Assignment, Workload, evaluate
from splitnet.planner.plan import CutPlan, Plan, Predicted, StagePlan
from splitnet.planner.profiles import Fleet, LinkProfile, ModelProfile, load_model_profile
from splitnet.planner.solver import solve


def plan_from_assignment(model: ModelProfile, fleet: Fleet, wl: Workload, asg: Assignment,
                         objective: str = "latency", model_profile_file: str | None = None) -> Plan:
    """A plan for a given placement, with the cost model's predictions."""
    ev = evaluate(model, fleet, wl, asg)
    if not ev.feasible:
        raise ConfigError(f"placement is not feasible: {ev.reason}")
    stages, cuts = [], []
    for i, (dev, a, b) in enumerate(asg.stages):
        codec_out = asg.codecs[i] if i < len(asg.codecs) else None
        stages.append(StagePlan(i, (a, b), dev, fleet.device(dev).endpoint, codec_out, fleet.device(dev).runtime))
        if codec_out is not None:
            c = model.codec(codec_out)
            cc = model.cut_codec_cost(b - 1, c)
            cuts.append(CutPlan(b - 1, codec_out, float(cc["bytes_per_token"]), c.codebook_file, c.codebook_hash,
                                dict(c.config)))
    # latency split into the prefill and one decode step, for decoders
    pre = evaluate(model, fleet, dataclasses.replace(wl, decode_steps=0), asg).latency_ms
    per_tok = None
    if wl.decode_steps:
        one = evaluate(model, fleet, dataclasses.replace(wl, decode_steps=1), asg).latency_ms
        per_tok = one - pre
    pred = Predicted(
        per_stage_compute_ms=[float(x) for x in ev.per_stage_compute_ms],
        per_link_ms=[float(x) for x in ev.per_link_ms],
        per_link_bytes=[float(x) for x in ev.per_link_bytes],
        latency_ms=float(ev.latency_ms),
        throughput_rps=float(ev.throughput_rps),
        per_stage_codec_ms=[float(x) for x in ev.per_stage_codec_ms],
        return_ms=float(ev.return_ms),
        return_bytes=float(ev.return_bytes),
        bottleneck=ev.bottleneck,
        prefill_ms=float(pre),
        per_token_ms=None if per_tok is None else float(per_tok),
    )
    return Plan(model.model, model.model_hash, model.num_blocks, stages, cuts, pred, objective, wl.to_dict(),
                fleet.name, model_profile_file)


def make_plan(model: ModelProfile, fleet: Fleet, wl: Workload | None = None, objective: str = "latency",
              mode: str = "auto", model_profile_file: str | None = None) -> Plan:
    """The optimal plan for ``objective`` (raises InfeasibleError naming what does not fit)."""
    wl = wl or Workload()
    sol = solve(model, fleet, wl, objective, mode)
    return plan_from_assignment(model, fleet, wl, sol.assignment, objective, model_profile_file)


def _as_link(x: Any) -> LinkProfile:
    if isinstance(x, LinkProfile):
        return x
    if isinstance(x, Mapping):
        return LinkProfile.from_dict(x, "changed_links[]")
    raise ConfigError(f"changed_links: expected LinkProfile or a mapping, got {type(x).__name__}")


def replan(plan: Plan, fleet: Fleet, failed_devices: Iterable[str] = (), changed_links: Iterable[Any] = (),
           model: ModelProfile | None = None, objective: str | None = None, mode: str = "auto") -> Plan:
    """Re-solve ``plan`` after devices fail or links change.

    The workload and objective come from the plan unless given. The model profile comes from
    ``model`` or from the file the plan names (``model_profile_file``). Devices that keep a stage keep
    their endpoints. Raises InfeasibleError when the survivors cannot hold the model.
    """
    if model is None:
        if not plan.model_profile_file:
            raise ConfigError("replan: the plan names no model_profile_file; pass model=ModelProfile")
        model = load_model_profile(plan.model_profile_file)
    if plan.model_hash and model.model_hash and plan.model_hash != model.model_hash:
        raise ConfigError(f"replan: the model profile's hash {model.model_hash} differs from the plan's {plan.model_hash}")
    if model.num_blocks != plan.num_blocks:
        raise ConfigError(f"replan: the model profile has {model.num_blocks} blocks, the plan {plan.num_blocks}")
    new_fleet = fleet.without(list(failed_devices)).with_links([_as_link(x) for x in changed_links])
    # keep endpoints the running plan already uses (fleet files may not carry them)
    known = {s.device: s.endpoint for s in plan.stages if s.endpoint}
    devs = tuple(d if d.endpoint or d.name not in known else dataclasses.replace(d, endpoint=known[d.name])
                 for d in new_fleet.devices)
    new_fleet = Fleet(devs, new_fleet.links, new_fleet.name)
    wl = Workload(**plan.workload) if plan.workload else Workload()
    return make_plan(model, new_fleet, wl, objective or plan.objective, mode, plan.model_profile_file)


def default_profile_path(model: str) -> Path | None:
    """The example profile shipped for a built-in model name, if any."""
    p = Path(__file__).parent / "data" / f"{model}.yaml"
    return p if p.is_file() else None
