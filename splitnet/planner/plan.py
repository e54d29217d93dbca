"""The plan file: which blocks run where, which codec crosses each cut, and what the planner predicts.

A plan is a YAML (or JSON) document a person can read and edit; :func:`load_plan` validates it and
raises :class:`splitnet.errors.ConfigError` naming the field and the reason. It is the only plan
reader: ``splitnet serve``, ``serve-stage --plan`` and ``connect(plan)`` all go through
:func:`as_plan`. The runtime reads ``plan.stages[i].blocks`` (a half-open ``(start, end)`` block
range), ``.endpoint`` and ``.runtime``, and checks the blocks against the model it loads with
:func:`check_plan_fits_model` before any process starts.

The validation is written out by hand over dataclasses rather than with pydantic: every message
names the field path and the fix (``plan.stages[1].blocks: ...``), cross-field rules (contiguous
stages, one cut per stage boundary, codec_out equal to its cut's codec) are most of the checks,
and the planner builds these records positionally in its hot loops.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from splitnet.documents import read_document
from splitnet.errors import ConfigError

PLAN_VERSION = 1
STAGE_RUNTIMES = ("torch", "onnxruntime")


def check_endpoint(endpoint: Any, where: str) -> str:
    """``endpoint`` if it is ``tcp://HOST:PORT`` (port 1..65535) or ``ipc://PATH``, else a ConfigError."""
    example = "tcp://10.0.0.2:5555"
    if not isinstance(endpoint, str) or not endpoint:
        raise ConfigError(f"{where}: must be an address such as {example}, got {endpoint!r}")
    if endpoint.startswith("ipc://") and len(endpoint) > len("ipc://"):
        return endpoint
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{where}: must be tcp://HOST:PORT with a port in 1..65535 (e.g. {example}), got {endpoint!r}")
    return endpoint


def _req(d: Mapping, key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}.{key}: missing")
    return d[key]


def _check_keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(allowed))}")
    return dict(d)


@dataclass
class StagePlan:
    """Stage ``index`` runs blocks [start, end) on ``device``; ``codec_out`` encodes what it sends on."""

    index: int
    blocks: tuple[int, int]
    device: str
    endpoint: str | None = None
    codec_out: str | None = None
    runtime: str = "torch"

    def __post_init__(self) -> None:
        w = f"stages[{self.index}]"
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ConfigError(f"{w}.index: must be an integer >= 0, got {self.index!r}")
        b = self.blocks
        if not isinstance(b, (list, tuple)) or len(b) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in b):
            raise ConfigError(f"{w}.blocks: must be [start, end) as two integers, got {b!r}")
        if not 0 <= b[0] < b[1]:
            raise ConfigError(f"{w}.blocks: need 0 <= start < end, got {list(b)}")
        self.blocks = (int(b[0]), int(b[1]))
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"{w}.device: must be a device name, got {self.device!r}")
        if self.endpoint is not None:
            check_endpoint(self.endpoint, f"{w}.endpoint")
        if self.runtime not in STAGE_RUNTIMES:
            raise ConfigError(f"{w}.runtime: must be one of {', '.join(STAGE_RUNTIMES)}, got {self.runtime!r}")

    @property
    def start(self) -> int:
        return self.blocks[0]

    @property
    def end(self) -> int:
        return self.blocks[1]

    def to_dict(self) -> dict:
        d = {"index": self.index, "blocks": list(self.blocks), "device": self.device}
        if self.endpoint:
            d["endpoint"] = self.endpoint
        d["codec_out"] = self.codec_out
        if self.runtime != "torch":
            d["runtime"] = self.runtime
        return d


@dataclass
class CutPlan:
    """The cut after block ``after_block``: codec, its fitted codebook (if any) and the wire cost."""

    after_block: int
    codec: str
    bytes_per_token: float
    codebook_file: str | None = None
    codebook_hash: str | None = None
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = f"cuts[after_block={self.after_block}]"
        if isinstance(self.after_block, bool) or not isinstance(self.after_block, int) or self.after_block < 0:
            raise ConfigError(f"{w}.after_block: must be an integer >= 0, got {self.after_block!r}")
        if not isinstance(self.codec, str) or not self.codec:
            raise ConfigError(f"{w}.codec: must be a codec name, got {self.codec!r}")
        if isinstance(self.bytes_per_token, bool) or not isinstance(self.bytes_per_token, (int, float)) \
                or self.bytes_per_token < 0:
            raise ConfigError(f"{w}.bytes_per_token: must be a number >= 0, got {self.bytes_per_token!r}")
        if (self.codebook_file is None) != (self.codebook_hash is None):
            raise ConfigError(f"{w}: codebook_file and codebook_hash go together (the runtime checks the hash)")
        if not isinstance(self.config, Mapping):
            raise ConfigError(f"{w}.config: must be a mapping of codec options")

    def to_dict(self) -> dict:
        d = {"after_block": self.after_block, "codec": self.codec, "bytes_per_token": round(self.bytes_per_token, 3),
             "codebook_file": self.codebook_file, "codebook_hash": self.codebook_hash}
        if self.config:
            d["config"] = dict(self.config)
        return d


@dataclass
class Predicted:
    """What the cost model predicts, per request (ms) unless stated."""

    per_stage_compute_ms: list[float]
    per_link_ms: list[float]
    per_link_bytes: list[float]
    latency_ms: float
    throughput_rps: float
    per_stage_codec_ms: list[float] = field(default_factory=list)
    return_ms: float = 0.0
    return_bytes: float = 0.0
    bottleneck: str = ""
    prefill_ms: float | None = None
    per_token_ms: float | None = None

    def __post_init__(self) -> None:
        for f in ("latency_ms", "throughput_rps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ConfigError(f"predicted.{f}: must be a number >= 0, got {v!r}")
        for f in ("per_stage_compute_ms", "per_link_ms", "per_link_bytes", "per_stage_codec_ms"):
            v = getattr(self, f)
            if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ConfigError(f"predicted.{f}: must be a list of numbers, got {v!r}")

    def to_dict(self) -> dict:
        def r(x):
            return round(float(x), 4) if isinstance(x, float) else x

        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            d[f.name] = [r(x) for x in v] if isinstance(v, list) else r(v)
        return d


@dataclass
class Plan:
    """A placement of a model's blocks on devices, with codecs per cut and predictions."""

    model: str
    model_hash: str
    num_blocks: int
    stages: list[StagePlan]
    cuts: list[CutPlan]
    predicted: Predicted | None = None
    objective: str = "latency"
    workload: dict = field(default_factory=dict)
    fleet: str = ""
    model_profile_file: str | None = None
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"plan.model: must be a model name, got {self.model!r}")
        if not isinstance(self.model_hash, str):
            raise ConfigError(f"plan.model_hash: must be a string, got {self.model_hash!r}")
        if self.version != PLAN_VERSION:
            raise ConfigError(f"plan.version: this splitnet reads plan version {PLAN_VERSION}, got {self.version!r}")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise ConfigError(f"plan.num_blocks: must be an integer >= 1, got {self.num_blocks!r}")
        if not self.stages:
            raise ConfigError("plan.stages: at least one stage is needed")
        pos = 0
        for i, s in enumerate(self.stages):
            if s.index != i:
                raise ConfigError(f"plan.stages[{i}].index: stages must be numbered 0.. in order, got {s.index}")
            if s.blocks[0] != pos:
                raise ConfigError(f"plan.stages[{i}].blocks: starts at block {s.blocks[0]} but the previous stage "
                                  f"ends at {pos}; stages must cover the blocks contiguously")
            pos = s.blocks[1]
        if pos != self.num_blocks:
            raise ConfigError(f"plan.stages: the last stage ends at block {pos}, the model has {self.num_blocks} blocks")
        devs = [s.device for s in self.stages]
        if len(set(devs)) != len(devs):
            raise ConfigError(f"plan.stages: a device hosts more than one stage: {devs}")
        if len(self.cuts) != len(self.stages) - 1:
            raise ConfigError(f"plan.cuts: {len(self.stages)} stages need {len(self.stages) - 1} cuts, got {len(self.cuts)}")
        for i, c in enumerate(self.cuts):
            s = self.stages[i]
            if c.after_block != s.blocks[1] - 1:
                raise ConfigError(f"plan.cuts[{i}].after_block: is {c.after_block} but stage {i} ends after block "
                                  f"{s.blocks[1] - 1}")
            if s.codec_out is None:
                s.codec_out = c.codec
            elif s.codec_out != c.codec:
                raise ConfigError(f"plan.stages[{i}].codec_out: is {s.codec_out!r} but cuts[{i}].codec is {c.codec!r}")
        if self.stages[-1].codec_out is not None:
            raise ConfigError("plan.stages[-1].codec_out: the last stage has no cut after it; leave it empty")

    # -- convenience for the runtime
    @property
    def cut_points(self) -> list[int]:
        """Block indices where a new stage starts (the launcher's ``cuts``)."""
        return [s.blocks[0] for s in self.stages[1:]]

    @property
    def endpoints(self) -> list[str | None]:
        return [s.endpoint for s in self.stages]

    # -- (de)serialisation
    def to_dict(self) -> dict:
        d = {"version": self.version, "model": self.model, "model_hash": self.model_hash,
             "num_blocks": self.num_blocks, "objective": self.objective, "fleet": self.fleet,
             "workload": dict(self.workload)}
        if self.model_profile_file:
            d["model_profile_file"] = self.model_profile_file
        d["stages"] = [s.to_dict() for s in self.stages]
        d["cuts"] = [c.to_dict() for c in self.cuts]
        if self.predicted is not None:
            d["predicted"] = self.predicted.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Plan":
        d = _check_keys(d, {f.name for f in dataclasses.fields(cls)}, "plan")
        stages_raw = _req(d, "stages", "plan")
        cuts_raw = d.get("cuts") or []
        if not isinstance(stages_raw, list):
            raise ConfigError("plan.stages: must be a list")
        if not isinstance(cuts_raw, list):
            raise ConfigError("plan.cuts: must be a list")
        stage_keys = {f.name for f in dataclasses.fields(StagePlan)}
        cut_keys = {f.name for f in dataclasses.fields(CutPlan)}
        pred_keys = {f.name for f in dataclasses.fields(Predicted)}
        stages = []
        for i, s in enumerate(stages_raw):
            s = _check_keys(s, stage_keys, f"plan.stages[{i}]")
            for k in ("index", "blocks", "device"):
                _req(s, k, f"plan.stages[{i}]")
            stages.append(StagePlan(**s))
        cuts = []
        for i, c in enumerate(cuts_raw):
            c = _check_keys(c, cut_keys, f"plan.cuts[{i}]")
            for k in ("after_block", "codec", "bytes_per_token"):
                _req(c, k, f"plan.cuts[{i}]")
            cuts.append(CutPlan(**{k: v for k, v in c.items() if not (k == "config" and v is None)}))
        pred = None
        if d.get("predicted") is not None:
            p = _check_keys(d["predicted"], pred_keys, "plan.predicted")
            try:
                pred = Predicted(**p)
            except TypeError as e:
                raise ConfigError(f"plan.predicted: {e}") from e
        d["stages"], d["cuts"], d["predicted"] = stages, cuts, pred
        for k in ("model", "num_blocks"):
            _req(d, k, "plan")
        d.setdefault("model_hash", "")
        d["workload"] = d.get("workload") or {}
        return cls(**d)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        if p.suffix == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            p.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def as_plan(plan: "Plan | Mapping | str | Path") -> Plan:
    """A validated :class:`Plan` from a Plan, a mapping (a parsed document) or a YAML/JSON file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return Plan.from_dict(plan)
    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    if hasattr(plan, "to_dict"):
        return Plan.from_dict(plan.to_dict())
    raise ConfigError(f"a plan is a Plan, a mapping or a YAML/JSON file path, got {type(plan).__name__}")


def check_plan_fits_model(plan: Plan, model_blocks: int, model_name: str | None = None) -> None:
    """Refuse a plan whose stages reach past the ``model_blocks`` blocks the model really has
    (before any stage process starts; a stage asked for missing blocks cannot load)."""
    name = model_name or plan.model
    for s in plan.stages:
        if s.end > model_blocks:
            raise ConfigError(f"plan stage {s.index} (device {s.device}) asks for blocks {list(s.blocks)}, but model "
                              f"{name} has {model_blocks} blocks (0..{model_blocks - 1}); fix stages[{s.index}].blocks "
                              f"or re-run `splitnet plan` for this model")
    if plan.num_blocks != model_blocks:
        raise ConfigError(f"plan.num_blocks is {plan.num_blocks}, but model {name} has {model_blocks} blocks; "
                          "re-run `splitnet plan` for this model")


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file (YAML, or JSON when the name ends in .json)."""
    p = Path(path)
    data = read_document(p, "plan")
    try:
        return Plan.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
