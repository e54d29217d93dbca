"""Re-plan on loss: a lost stage's blocks move to a live device of the planner's fleet.

:class:`FleetCoordinator` keeps the fleet (the planner's :class:`~splitnet.planner.profiles.Fleet`:
devices with their speed, memory and links), which device runs each stage, and which devices
are lost. It is a recovery hook (``splitnet.connect(..., recovery=coordinator)``): when the
client's liveness declares stage ``i`` lost, its device counts as lost (a phone that left the
room), and the stage's blocks ``[a, b)`` are placed with the planner's cost model
(:func:`splitnet.planner.cost.evaluate`, lowest predicted latency) on

- a **standby**: a live device that runs no stage, taking stage ``i``'s place in the chain; or
- a **neighbour**: the live device of stage ``i-1`` or ``i+1``, costed as one stage over both
  ranges (its memory must hold both), served by a second process there;

then a stage for exactly ``[a, b)`` is started there (``start_stage``: locally a new
``serve-stage`` process, see :func:`local_starter`; on Kubernetes a replica the cluster runs) and
its endpoint goes back to the client, which starts a new epoch and replays. When no live device
fits, :class:`NoPlacement` (a StageUnavailable) names what is missing (memory, a link, a device
that may host the first stage) at once, without starting anything.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from splitnet.errors import ConfigError, StageUnavailable
from splitnet.planner.cost import Assignment, Workload, evaluate
from splitnet.planner.profiles import Fleet, ModelProfile
from splitnet.runtime.retire import retire

log = logging.getLogger("splitnet.fleet")


class NoPlacement(StageUnavailable):
    """No live device of the fleet can take a lost stage's blocks; the message says why for each."""


@dataclass(frozen=True)
class StagePlacement:
    """Where one stage runs: its index in the chain, the device, its blocks [start, end) and endpoint."""

    index: int
    device: str
    blocks: tuple[int, int]
    endpoint: str = ""


@dataclass(frozen=True)
class Move:
    """One re-placement, for reports: the stage, from which device to which, how, the predicted
    latency of the new chain (ms per request) and how long the move took (s)."""

    index: int
    blocks: tuple[int, int]
    lost_device: str
    device: str
    how: str  # "standby" | "neighbour"
    predicted_latency_ms: float
    took_s: float


StartStage = Callable[[StagePlacement], str]  # start a stage for exactly placement.blocks on placement.device -> endpoint


class FleetCoordinator:
    """The fleet, the stages' placement and the devices' liveness; a recovery hook that re-plans.

    Args:
        fleet: the planner's fleet (devices in chain order, links).
        model: the model's profile (block costs and memory), as for ``splitnet plan``.
        stages: the running chain, one :class:`StagePlacement` per stage (with endpoints).
        start_stage: starts a stage for exactly a placement's blocks on its device; returns its endpoint.
        workload: what one request asks (memory of the KV caches, costs), as for the planner.
        codecs: codec name per cut (default: raw, ``"none"``).
        deadline_s: a start that takes longer raises StageUnavailable (the client then retries
            within its recovery budget).
        device_alive: optional check whether a device is still there (e.g. its node agent answers);
            without it, the device of a lost stage counts as lost.
    """

    def __init__(
        self,
        fleet: Fleet,
        model: ModelProfile,
        stages: Sequence[StagePlacement],
        start_stage: StartStage,
        *,
        workload: Workload | None = None,
        codecs: Sequence[str] | None = None,
        deadline_s: float = 120.0,
        device_alive: Callable[[str], bool] | None = None,
    ):
        if not stages:
            raise ConfigError("FleetCoordinator needs the running stages")
        bounds = [s.blocks for s in stages]
        if bounds[0][0] != 0 or bounds[-1][1] != model.num_blocks or any(bounds[i][1] != bounds[i + 1][0] for i in range(len(bounds) - 1)):
            raise ConfigError(f"stages {bounds} must cover blocks 0..{model.num_blocks} of {model.model} in order")
        for s in stages:
            fleet.device(s.device)  # a ConfigError naming the known devices
        if deadline_s <= 0:
            raise ConfigError("FleetCoordinator.deadline_s must be positive")
        self.fleet = fleet
        self.model = model
        self.workload = workload or Workload()
        self.codecs = list(codecs) if codecs is not None else ["none"] * (len(stages) - 1)
        if len(self.codecs) != len(stages) - 1:
            raise ConfigError(f"{len(self.codecs)} codecs given for {len(stages) - 1} cuts")
        self.stages = [replace(s, index=i) for i, s in enumerate(stages)]
        self.start_stage = start_stage
        self.deadline_s = deadline_s
        self.device_alive = device_alive
        self.lost: set[str] = set()
        self.moves: list[Move] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ liveness -----------
    def mark_lost(self, device: str) -> None:
        self.fleet.device(device)
        self.lost.add(device)

    def mark_live(self, device: str) -> None:
        self.fleet.device(device)
        self.lost.discard(device)

    @property
    def endpoints(self) -> list[str]:
        return [s.endpoint for s in self.stages]

    # ------------------------------------------------------------------ placement ----------
    def _chain(self, index: int, device: str, how: str) -> tuple[Assignment, str]:
        """The assignment the cost model judges for stage ``index`` on ``device``."""
        st = [(s.device, s.blocks[0], s.blocks[1]) for s in self.stages]
        codecs = list(self.codecs)
        if how == "standby":
            st[index] = (device, st[index][1], st[index][2])
            return Assignment(st, codecs), device
        j = index - 1 if index > 0 and self.stages[index - 1].device == device else index + 1
        lo, hi = min(index, j), max(index, j)
        merged = (device, st[lo][1], st[hi][2])  # one stage over both ranges on the neighbour's device
        return Assignment(st[:lo] + [merged] + st[hi + 1:], codecs[:lo] + codecs[hi:]), device

    def place(self, index: int) -> tuple[StagePlacement, str, float]:
        """The best live device for stage ``index``'s blocks: ``(placement, how, predicted ms)``;
        NoPlacement naming every candidate's problem when there is none."""
        if not 0 <= index < len(self.stages):
            raise ConfigError(f"stage {index}: the chain has stages 0..{len(self.stages) - 1}")
        lost = self.stages[index]
        hosting = {s.device for s in self.stages}
        live = [d for d in self.fleet.devices if d.name not in self.lost]
        candidates: list[tuple[str, str]] = [(d.name, "standby") for d in live if d.name not in hosting]
        for j in (index - 1, index + 1):
            if 0 <= j < len(self.stages) and self.stages[j].device not in self.lost and self.stages[j].device != lost.device:
                candidates.append((self.stages[j].device, "neighbour"))
        why: list[str] = []
        best: tuple[float, str, str] | None = None
        for device, how in candidates:
            asg, _ = self._chain(index, device, how)
            try:
                ev = evaluate(self.model, self.fleet, self.workload, asg)  # lost devices are never candidates
            except ConfigError as e:
                why.append(f"{device} ({how}): {e}")
                continue
            if not ev.feasible:
                why.append(f"{device} ({how}): {ev.reason}")
                continue
            if best is None or ev.latency_ms < best[0]:
                best = (ev.latency_ms, device, how)
        a, b = lost.blocks
        if best is None:
            detail = "; ".join(why) if why else "no live device besides the lost ones"
            raise NoPlacement(
                f"stage {index} (blocks [{a},{b}) of {self.model.model}) lost with device {lost.device}: no live device can take it "
                f"(lost: {', '.join(sorted(self.lost)) or 'none'}); {detail}. Add a standby device with the memory to the fleet, "
                "or bring a lost device back"
            )
        return StagePlacement(index, best[1], (a, b)), best[2], best[0]

    # ------------------------------------------------------------------ the hook -----------
    def __call__(self, index: int) -> str:
        """Recovery hook: stage ``index`` is lost; re-place its blocks and return the new endpoint."""
        with self._lock:
            t0 = time.monotonic()
            old = self.stages[index]
            if self.device_alive is None or not self.device_alive(old.device):
                self.lost.add(old.device)
            target, how, predicted = self.place(index)
            result: list[Any] = []

            def start() -> None:
                try:
                    result.append(self.start_stage(target))
                except BaseException as e:  # noqa: BLE001 - handed to the caller below
                    result.append(e)

            th = threading.Thread(target=start, name=f"splitnet-fleet-start-{index}", daemon=True)
            th.start()
            th.join(self.deadline_s)
            if not result:
                raise StageUnavailable(f"stage {index}'s blocks [{target.blocks[0]},{target.blocks[1]}) did not start on {target.device} "
                                       f"within {self.deadline_s:g} s")
            if isinstance(result[0], BaseException):
                raise StageUnavailable(f"starting stage {index} on {target.device} failed: {result[0]}") from result[0]
            endpoint = str(result[0])
            self.stages[index] = replace(target, endpoint=endpoint)
            self.moves.append(Move(index, target.blocks, old.device, target.device, how, round(predicted, 3), round(time.monotonic() - t0, 3)))
            log.warning("stage %d (blocks %s) moved from lost %s to %s (%s)", index, target.blocks, old.device, target.device, how)
            return endpoint


def local_starter(pipe: Any) -> StartStage:
    """``start_stage`` for a :class:`~splitnet.runtime.launcher.LocalPipeline`: every device is
    this host; a new ``serve-stage`` process loads exactly the placement's blocks and takes the
    stage's place in ``pipe.stages`` (the old process, if still running, is stopped at once and
    killed :data:`~splitnet.runtime.retire.RETIRE_AFTER_S` later)."""

    def start(p: StagePlacement) -> str:
        new = pipe.start_stage(p.index, p.blocks)
        retire(pipe.stages[p.index].popen)  # stopped now, killed after the replay (splitnet.runtime.retire)
        pipe.stages[p.index] = new
        return new.endpoint

    return start


__all__ = ["FleetCoordinator", "Move", "NoPlacement", "StagePlacement", "local_starter"]
