"""``splitnet bench chaos --quick``: real stage processes behind link relays, two tenants, nine
fault kinds (a short freeze, kills in decode and in prefill, a kill inside the recovery, a
restart on the same endpoint, a frozen compute thread, a link cut, a one-way partition, a cut
with no recovery possible); the history's invariants and each fault's expected outcome must
hold. Timings are reported, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_quick_chaos_campaign_keeps_every_invariant(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, "-m", "splitnet.cli", "bench", "chaos", "--quick", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=580)
    assert out.exists(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["faults_injected"] == 9, doc["runs"][0]["faults"]
    assert doc["requests"] > 0
    assert doc["lost"] == 0 and doc["duplicated"] == 0, doc["runs"][0]["errors"]
    assert doc["typed_errors"] == doc["typed_errors_expected"], doc["runs"][0]["errors"]  # only the cut with no recovery may fail a request
    assert doc["token_identical"] == doc["requests"] - doc["typed_errors_expected"], doc["runs"][0]["errors"]
    assert doc["untyped_errors"] == 0 and doc["false_failovers"] == 0
    assert doc["history"]["old_epoch_replies_used"] == 0
    assert doc["history"]["steps_taken_twice"] == 0 and doc["history"]["forwards_after_release"] == 0
    run = doc["runs"][0]
    assert not run["outcomes_not_ok"], run["outcomes_not_ok"]  # each fault had the outcome its kind must have
    assert doc["outcomes_ok"] == 9
    assert run["caches_left"] == [0, 0, 0], "a stage kept a released request's cache"
    assert not run["hung_tenants"] and not run["tenant_failures"]
    assert run["replacements"] >= 4, "the kills were not recovered by replacing stages"
    assert doc["invariants_hold"] and proc.returncode == 0
