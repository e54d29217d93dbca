import pytest

from splitnet.errors import ProtocolError, StaleEpoch, error_from_code
from splitnet.runtime.request_ledger import RequestLedger


def test_older_epochs_are_refused_newer_ones_adopted():
    led = RequestLedger()
    led.check_epoch("a", 0)
    led.check_epoch("a", 2)
    with pytest.raises(StaleEpoch, match="epoch 1 arrived after epoch 2"):
        led.check_epoch("a", 1)
    led.check_epoch("a", 2)  # the same epoch again is fine
    led.check_epoch("b", 0)  # epochs are per request


def test_cancel_covers_steps_received_up_to_its_time_only():
    led = RequestLedger()
    led.cancel("a", 10.0)
    assert led.is_cancelled("a", 9.5) and led.is_cancelled("a", 10.0)
    assert not led.is_cancelled("a", 10.5)  # sent after the release: a new life of the id
    assert not led.is_cancelled("b", 1.0)
    led.cancel("a", 5.0)  # an older cancel never shrinks a newer one
    assert led.is_cancelled("a", 9.0)


def test_the_ledger_is_bounded():
    led = RequestLedger(max_entries=8)
    for i in range(1000):
        led.check_epoch(f"r{i}", 0)
        led.cancel(f"r{i}", 1.0)
    assert len(led) == 16
    assert led.is_cancelled("r999", 0.5) and not led.is_cancelled("r0", 0.5)


def test_stale_epoch_travels_as_a_typed_error():
    e = error_from_code(StaleEpoch.code, "x")
    assert isinstance(e, StaleEpoch) and isinstance(e, ProtocolError)
