"""The planner: profiles of devices, links and blocks -> an optimal Plan (cuts, placement, codec per cut).

Quick use::

    from splitnet.planner import load_fleet, load_model_profile, make_plan, Workload
    plan = make_plan(load_model_profile("minilm.yaml"), load_fleet("fleet.yaml"), Workload(prefill_tokens=128))
    plan.save("plan.yaml")

Nothing here opens a socket; profiling (which runs the model) lives in :mod:`splitnet.planner.profiler`.
"""

from splitnet.planner.cost import Assignment, Evaluation, Workload, evaluate, tables
from splitnet.planner.plan import CutPlan, Plan, Predicted, StagePlan, load_plan
from splitnet.planner.planning import make_plan, plan_from_assignment, replan
from splitnet.planner.profiles import (
    DEFAULT_CODECS,
    BlockProfile,
    CodecOption,
    DeviceProfile,
    Fleet,
    LinkProfile,
    ModelProfile,
    load_fleet,
    load_model_profile,
    save_fleet,
    save_model_profile,
)
from splitnet.planner.solver import InfeasibleError, Solution, brute_force, solve, solve_tables

__all__ = [
    "DEFAULT_CODECS", "Assignment", "BlockProfile", "CodecOption", "CutPlan", "DeviceProfile", "Evaluation", "Fleet",
    "InfeasibleError", "LinkProfile", "ModelProfile", "Plan", "Predicted", "Solution", "StagePlan", "Workload",
    "brute_force", "evaluate", "load_fleet", "load_model_profile", "load_plan", "make_plan", "plan_from_assignment",
    "replan", "save_fleet", "save_model_profile", "solve", "solve_tables", "tables",
]
