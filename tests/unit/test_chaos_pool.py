"""The chaos campaign's recovery hook (StandbyPool.replace) with fake stage processes: which
endpoint a tenant is handed after a restart in place, and that a refusal always holds."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from splitnet.bench.chaos_pool import NoStandby, Served, StandbyPool


def _process(endpoint: str) -> SimpleNamespace:
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return SimpleNamespace(endpoint=endpoint, popen=popen, blocks=(0, 1), pid=popen.pid)


@pytest.fixture
def pool():
    pipe = SimpleNamespace(stages=[_process("tcp://127.0.0.1:1001")])
    p = StandbyPool(pipe, per_stage=0, same_loss_s=6.0)
    p.start()
    made = [pipe.stages[0]]
    yield p, made
    p.close()
    for sp in made + [s.stage for lst in p.ready.values() for s in lst]:
        if sp.popen.poll() is None:
            sp.popen.kill()
        sp.popen.wait(timeout=10)


def _standby(p: StandbyPool, made: list, endpoint: str) -> None:
    sp = _process(endpoint)
    made.append(sp)
    p.ready[0].append(Served(sp))


def _restart_in_place(p: StandbyPool, made: list) -> None:
    old = p.current[0].stage
    new = _process(old.endpoint)
    made.append(new)
    p.restarted_in_place(0, old, new)


def test_a_refused_stage_is_refused_to_a_tenant_that_missed_a_restart_in_place(pool):
    p, made = pool
    p.hook_for(tenant=7)
    _restart_in_place(p, made)  # generation 1, which tenant 7 never asked for
    p.refuse.add(0)
    with pytest.raises(NoStandby):
        p.replace(7, 0)


def test_a_restart_in_place_long_ago_does_not_answer_a_new_loss(pool):
    p, made = pool
    p.hook_for(tenant=7)
    _restart_in_place(p, made)
    _standby(p, made, "tcp://127.0.0.1:1002")
    p.gen_at[0] = time.monotonic() - 60  # the restart was a minute ago: this call is about another loss
    assert p.replace(7, 0) == "tcp://127.0.0.1:1002"
    assert p.replacements == 1


def test_a_tenant_late_to_the_same_loss_gets_the_replacement_already_made(pool):
    p, made = pool
    p.hook_for(tenant=1)
    p.hook_for(tenant=2)
    _standby(p, made, "tcp://127.0.0.1:1002")
    _standby(p, made, "tcp://127.0.0.1:1003")
    assert p.replace(1, 0) == "tcp://127.0.0.1:1002"
    assert p.replace(2, 0) == "tcp://127.0.0.1:1002"  # the same loss: no second standby spent
    assert p.replacements == 1 and len(p.ready[0]) == 1
