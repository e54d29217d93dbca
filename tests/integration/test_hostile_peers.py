"""Every attack of the security review against live stage processes (splitnet.bench.attacks), at
the test suite's sizes: on CurveZMQ each is refused, the stages live and a legitimate client gets
the right embedding after it; on plaintext (--insecure) the transport-independent ones are refused
too, and the key-dependent ones are shown to work there (the harness can see an attack succeed)."""

from __future__ import annotations

import pytest

from splitnet.bench.attacks import ATTACKS, HostileLab
from splitnet.bench.hostile import _TRANSPORT_INDEPENDENT, attack_sizes, run_attack

pytestmark = pytest.mark.timeout(240)

SIZES = attack_sizes(quick=True)


@pytest.fixture(scope="module")
def curve_lab():
    lab = HostileLab("curvezmq")
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def plain_lab():
    lab = HostileLab("plaintext")
    yield lab
    lab.close()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_refused_on_curvezmq(curve_lab, attack):
    row = run_attack(curve_lab, attack, SIZES)
    assert row["refused"], row
    assert row["stage_alive"], row
    assert row["legit_client_ok"], row


@pytest.mark.parametrize("attack", _TRANSPORT_INDEPENDENT)
def test_transport_independent_refused_on_plaintext(plain_lab, attack):
    row = run_attack(plain_lab, attack, SIZES)
    assert row["refused"] and row["stage_alive"] and row["legit_client_ok"], row


@pytest.mark.parametrize("attack", ["replay_new_connection", "routing_id_squatting", "forged_plaintext_error"])
def test_key_dependent_attacks_work_without_keys(plain_lab, attack):
    """Without keys nothing can stop these: the harness must see them succeed, or it proves nothing."""
    row = run_attack(plain_lab, attack, SIZES)
    assert not row["refused"], row
    assert row["stage_alive"], row
