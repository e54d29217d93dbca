"""The planner's netns prediction mode, small: stages in namespace hosts over tbf-shaped, relay-delayed links."""

from __future__ import annotations

import argparse
import math
import os

import pytest

from splitnet.bench.planner import choose_mode, measure_prediction, netns_configs, netns_runner
from splitnet.lab.netns import list_labs
from splitnet.planner.profiles import load_model_profile

pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def test_auto_mode_picks_netns_as_root():
    mode, why = choose_mode("auto")
    assert mode == "netns", why
    assert choose_mode("loopback")[0] == "loopback"


def test_netns_prediction_small():
    """One 2-host and one 3-host pipeline, a calibration and an evaluated config each (shipped
    profile: no profiling here), 3 timed requests per config."""
    model = load_model_profile("splitnet/planner/data/minilm.yaml")
    configs = netns_configs(small=True)
    assert {len(c.cuts) + 1 for c in configs} == {2, 3} and len(configs) == 4
    res = measure_prediction(configs, netns_runner("minilm", model.num_blocks, warmup_rounds=1), model, repeats=3)
    assert res["configs"] == 2
    assert math.isfinite(res["mape"]) and res["mape"] >= 0
    assert res["worst"]["role"] == "eval"
    for r in res["results"]:
        assert set(r) >= {"cuts", "codecs", "prefill_tokens", "role", "links", "predicted_ms", "measured_ms", "abs_pct_error"}
        assert math.isfinite(r["predicted_ms"]) and r["predicted_ms"] > 0
        rtt = sum(x["rtt_ms"] for x in r["links"][:len(r["cuts"])])  # forward links' RTT/2 plus the way back
        assert r["measured_ms"] >= rtt / 2, r  # the relays really delay
    assert f"pl{os.getpid() % 10**4}" not in {lab["name"] for lab in list_labs()}  # the runner's lab was torn down


def test_cli_args_accept_prediction_mode():
    from splitnet.bench.planner import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--prediction-mode", "netns"]).prediction_mode == "netns"
    with pytest.raises(SystemExit):
        p.parse_args(["--prediction-mode", "wan"])
