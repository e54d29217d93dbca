"""The chaos campaign's recovery hook: warm standby stage processes, each behind a link relay.

:class:`StandbyPool` keeps ``per_stage`` ready ``serve-stage`` processes per stage (started in
the background, several at once) and, with relays on, puts a :class:`~splitnet.lab.relay.RelayProcess`
on 127.0.0.1 in front of every stage process, standbys included: the clients connect to the
relays, and since a forward's ``route`` is the clients' endpoints, stage i-1 reaches stage i
through the same relay, and the last stage's results come back over it. Cutting or partitioning
stage i's relay therefore cuts every link into stage i (the client's and the upstream stage's);
an :class:`~splitnet.lab.relay.Impairment` on every relay adds delay, jitter and loss to every link.

Each tenant gets its own hook (:meth:`StandbyPool.hook_for`): when the tenant's liveness declares
stage ``i`` lost, the hook trusts it, unless another tenant already replaced that stage since
this tenant last got it, within :data:`SAME_LOSS_S` (then the live replacement is handed out):
the condemned process is killed, its relay closed, and a standby takes its place. A stage the
campaign refuses (a recovery-impossible fault) raises :class:`NoStandby` for every tenant.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from splitnet.errors import StageUnavailable


@dataclass
class Served:
    """A stage process and the relay in front of it (None without relays)."""

    stage: Any  # splitnet.runtime.launcher.StageProcess
    relay: Any = None  # splitnet.lab.relay.RelayProcess

    @property
    def endpoint(self) -> str:
        return self.relay.endpoint if self.relay is not None else self.stage.endpoint

    def close(self, after_s: float = 0.0) -> None:
        """Close the relay and stop the process: killed now (``after_s`` 0, and waited for), or
        stopped now and killed ``after_s`` later (:func:`splitnet.runtime.retire.retire`)."""
        from splitnet.runtime.retire import retire

        if self.relay is not None:
            self.relay.close()
            self.relay = None
        killer = retire(self.stage.popen, after_s)
        if killer is not None:
            killer.join()


#: how long after a stage's replacement another tenant's hook call for it is taken to be about
#: the same loss (the tenants' detections of one loss spread over about a window, <= 3 s at
#: defaults, and a hook waits for a restart in place under way): it is handed that replacement
SAME_LOSS_S = 6.0


class NoStandby(StageUnavailable):
    """The campaign refuses to replace a stage (a fault with no recovery possible)."""


class StandbyPool:
    """Warm standbys per stage, relays in front of every stage, and the tenants' recovery hooks."""

    def __init__(self, pipe: Any, per_stage: int, *, relays: bool = False, impairment: Any = None, start_workers: int = 2,
                 refill_delay_s: float = 0.0, retire_delay_s: float = 0.0, same_loss_s: float = SAME_LOSS_S):
        self.pipe = pipe
        self.same_loss_s = same_loss_s
        self.retire_delay_s = retire_delay_s
        self.refill_delay_s = refill_delay_s
        self._last_replace = 0.0  # monotonic time of the last standby handed out
        self.per_stage = per_stage
        self.relays = relays
        self.impairment = impairment
        self.current: dict[int, Served] = {}
        self.ready: dict[int, list[Served]] = {i: [] for i in range(len(pipe.stages))}
        self.locks = {i: threading.Lock() for i in self.ready}
        self.gen = {i: 0 for i in self.ready}  # replacements of each stage so far (a restart in place counts)
        self.gen_at = {i: 0.0 for i in self.ready}  # when each stage's current generation began (monotonic)
        self._seen: dict[tuple[int, int], int] = {}  # (tenant, stage) -> the generation that tenant was last given
        self.kill_next: dict[int, int] = {}  # stage -> replacements to kill right after handing them out
        self.refuse: set[int] = set()  # stages no replacement may take (recovery impossible)
        self.in_place: dict[int, threading.Event] = {}
        self.cold_start_s: list[float] = []
        self.replacements = 0
        self._pool_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._starting: dict[int, int] = {}
        self._retiring: list[threading.Thread] = []
        # several starts at once: a stage process spends most of its start-up importing and loading
        self._threads = [threading.Thread(target=self._refill, name=f"chaos-standbys-{k}", daemon=True) for k in range(max(1, start_workers))]

    # ------------------------------------------------------------------ set-up --------------
    def _relay(self, target: str) -> Any:
        from splitnet.lab.relay import RelayProcess

        return RelayProcess.start("127.0.0.1", target, self.impairment) if self.relays else None

    def start(self) -> None:
        for i, sp in enumerate(self.pipe.stages):
            self.current[i] = Served(sp, self._relay(sp.endpoint))
        if self.per_stage > 0:  # one standby per stage at once; the refill threads start the rest
            with ThreadPoolExecutor(max_workers=len(self.ready)) as pool:
                for i, served in zip(self.ready, pool.map(self._spawn, self.ready)):
                    self.ready[i].append(served)
        for th in self._threads:
            th.start()

    @property
    def endpoints(self) -> list[str]:
        """What the clients connect to: each current stage's relay (or the stage itself)."""
        return [self.current[i].endpoint for i in sorted(self.current)]

    def served(self, i: int) -> Served:
        return self.current[i]

    def _spawn(self, i: int) -> Served:
        t0 = time.monotonic()
        sp = self.pipe.start_stage(i, self.pipe.stages[i].blocks)
        self.cold_start_s.append(time.monotonic() - t0)
        try:
            return Served(sp, self._relay(sp.endpoint))
        except BaseException:
            sp.popen.kill()
            raise

    def _refill(self) -> None:
        while not self._stop.is_set():
            with self._pool_lock:
                short = [i for i, lst in self.ready.items() if len(lst) + self._starting.get(i, 0) < self.per_stage]
                if short:
                    self._starting[short[0]] = self._starting.get(short[0], 0) + 1
            wait_s = self._last_replace + self.refill_delay_s - time.monotonic()
            if short and wait_s > 0:
                with self._pool_lock:
                    self._starting[short[0]] -= 1
                self._stop.wait(wait_s)
                continue
            if not short:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                served = self._spawn(short[0])
            except Exception:  # noqa: BLE001 - a standby that failed to start is tried again
                time.sleep(1.0)
                served = None
            with self._pool_lock:
                self._starting[short[0]] -= 1
                if served is not None:
                    self.ready[short[0]].append(served)

    def all_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if all(len(lst) >= self.per_stage for lst in self.ready.values()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    # ------------------------------------------------------------------ the hooks -----------
    def hook_for(self, tenant: int) -> Callable[[int], str]:
        """The recovery hook of one tenant's session (call before it connects)."""
        for i in self.gen:
            self._seen[(tenant, i)] = self.gen[i]
        return lambda i: self.replace(tenant, i)

    def replace(self, tenant: int, i: int) -> str:
        with self.locks[i]:
            waiting = self.in_place.get(i)
            if waiting is not None and not self.ready[i]:
                waiting.wait(120)  # a restart on the same endpoint is under way and no standby is ready: that is the replacement
            if i in self.refuse:  # before the check below: a generation this tenant missed is no way round a refusal
                raise NoStandby(f"no device may take stage {i}'s blocks now (the campaign's recovery-impossible fault)")
            if self.gen[i] > self._seen.get((tenant, i), 0):
                self._seen[(tenant, i)] = self.gen[i]
                if time.monotonic() - self.gen_at[i] <= self.same_loss_s:
                    return self.current[i].endpoint  # another tenant replaced it since this one got it (the same loss)
                # a generation this tenant never asked for (a restart in place its session simply
                # reconnected to) and long enough ago that this call is about a new loss: replace
            old = self.current[i]
            with self._pool_lock:
                served = self.ready[i].pop(0) if self.ready[i] else None
                self._last_replace = time.monotonic()
            if served is None:
                served = self._spawn(i)
            self._wake.set()
            # condemned (dead, frozen or cut off): the replacement takes its blocks now, and the old
            # process and relay are stopped beside it (a real hook hands out a warm standby at once;
            # stopping a frozen process or a cut relay is the fleet's business, not the client's wait)
            retire = threading.Thread(target=old.close, args=(self.retire_delay_s,), name=f"chaos-retire-{i}", daemon=True)
            retire.start()
            self._retiring.append(retire)
            self.current[i] = served
            self.pipe.stages[i] = served.stage
            self.gen[i] += 1
            self.gen_at[i] = time.monotonic()
            self._seen[(tenant, i)] = self.gen[i]
            self.replacements += 1
            if self.kill_next.get(i, 0) > 0:
                self.kill_next[i] -= 1
                served.close()  # a fault inside the recovery: the replacement (its host: process and port) dies before the handshake
            return served.endpoint

    def restarted_in_place(self, i: int, old: Any, new: Any) -> None:
        """Stage ``i``'s process ``old`` was restarted on its own endpoint as ``new``. Behind
        the same relay it is the stage again, unless a warm standby took the stage's place
        meanwhile (a tenant's hook did not wait for the restart): then ``new`` is one more
        standby, behind a relay of its own (the old one was stopped with ``old``)."""
        with self._pool_lock:
            if self.current[i].stage is old:
                self.current[i] = Served(new, self.current[i].relay)
                self.pipe.stages[i] = new
                self.gen[i] += 1
                self.gen_at[i] = time.monotonic()
                return
        served = Served(new, self._relay(new.endpoint))
        with self._pool_lock:
            self.ready[i].append(served)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for th in self._retiring:
            th.join(timeout=15)
        for th in self._threads:
            th.join(timeout=60)
        for lst in self.ready.values():
            for served in lst:
                served.close()
        for served in self.current.values():
            if served.relay is not None:
                served.relay.close()


__all__ = ["NoStandby", "Served", "StandbyPool"]
