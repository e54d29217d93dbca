"""The client's reply store (bounded, epoch-aware), recovery budget, recovery procedure and
incremental text: pure units, no sockets."""

from __future__ import annotations

import threading
import time

import pytest

from splitnet.edge.generation import IncrementalText, RecoveryBudget
from splitnet.edge.recovery import StageRecovery, replace_in_parallel
from splitnet.errors import LimitExceeded, StageError, StageUnavailable, UnknownRequest
from splitnet.wire import Message, error_message
from splitnet.edge.replies import ReplyStore


def _result(req: str, seq: int = 0, epoch: int = 0) -> Message:
    return Message(kind="result", req=req, seq=seq, epoch=epoch)


def test_old_epoch_replies_are_dropped():
    store = ReplyStore()
    store.open("a")
    store.epoch = 2
    assert not store.put(_result("a", epoch=1), 10)
    assert store.take({("a", 0)}) is None and store.counts.stale_epoch == 1
    assert store.put(_result("a", epoch=2), 10)
    key, msg, nbytes = store.take({("a", 0)})
    assert key == ("a", 0) and msg.epoch == 2 and nbytes == 10


def test_replies_of_released_or_unknown_requests_are_not_kept():
    store = ReplyStore()
    store.open("a")
    store.put(_result("a", 3), 1)
    store.release("a")
    assert len(store) == 0
    assert not store.put(_result("a", 4), 1) and not store.put(_result("never-opened"), 1)
    assert store.counts.unknown_request == 2 and len(store) == 0


def test_the_store_is_bounded_with_a_typed_error():
    store = ReplyStore(max_entries=3)
    store.open("a")
    for seq in range(3):
        store.put(_result("a", seq), 1)
    with pytest.raises(LimitExceeded, match="max_pending_replies=3"):
        store.put(_result("a", 3), 1)
    assert len(store) == 3 and store.counts.most_held == 3


def test_stale_replies_of_many_abandoned_requests_never_pile_up():
    store = ReplyStore(max_entries=8)
    for i in range(1000):  # a request per fault, released and replaced, its late replies arriving after
        req = f"r{i}"
        store.open(req)
        store.put(_result(req), 1)
        store.take({(req, 0)})
        store.release(req)
        store.put(_result(req, 1), 1)  # late
        store.put(error_message(req, 2, 0, "unknown_request", "gone"), 1)
    assert len(store) == 0 and store.counts.most_held == 1 and store.counts.unknown_request == 2000


def test_the_first_error_of_a_request_is_raised_and_later_ones_dropped():
    store = ReplyStore()
    store.open("a")
    store.put(error_message("a", 1, 0, "limit", "chunk 1 too long", stage=0), 1)
    for seq in range(2, 70):
        store.put(error_message("a", seq, 0, "unknown_request", "no cache", stage=0), 1)
    assert len(store) == 1 and store.counts.extra_errors == 68
    with pytest.raises(LimitExceeded, match="stage 0: chunk 1 too long"):
        store.take({("a", 69)})  # waiting for the last chunk: the cause comes out, not UnknownRequest
    with pytest.raises(StageError):
        s2 = ReplyStore()
        s2.open("b")
        s2.put(error_message("b", 0, 0, "stage", "boom"), 1)
        s2.take({("b", 0)})


def test_budget_is_spent_and_refilled_by_progress():
    cause = StageUnavailable("down")
    b = RecoveryBudget(2, refill_tokens=10)
    b.spend(cause)
    b.spend(cause)
    with pytest.raises(StageUnavailable):
        b.spend(cause)
    b.progress(9)
    with pytest.raises(StageUnavailable):
        b.spend(cause)
    b.progress(1)  # 10 tokens since the last recovery: one back
    b.spend(cause)
    b.progress(1000)
    assert b.left == 2  # never above the maximum
    never = RecoveryBudget(1, refill_tokens=0)
    never.spend(cause)
    never.progress(10**6)
    with pytest.raises(StageUnavailable):
        never.spend(cause)


class _FakeSession:
    """What StageRecovery drives, recorded."""

    def __init__(self, silent: list[list[int]], handshakes: list[Exception | None]):
        self.silent, self.handshakes = silent, handshakes
        self.replaced: list[tuple[int, str]] = []
        self.epoch = 0

    def silent_stages(self, suspects=()):  # the scripted answer; the real links also count silent suspects dead
        return self.silent.pop(0) if self.silent else []

    def replace(self, i, ep):
        self.replaced.append((i, ep))

    def new_epoch(self):
        self.epoch += 1
        return self.epoch

    def handshake(self):
        err = self.handshakes.pop(0) if self.handshakes else None
        if err is not None:
            raise err


def _recovery(fake: _FakeSession, hook) -> StageRecovery:
    return StageRecovery(hook, fake.silent_stages, fake.replace, fake.new_epoch, fake.handshake, backoff_s=0.001)


def test_a_fault_during_recovery_is_retried_within_the_budget():
    fake = _FakeSession(silent=[[1], [1]], handshakes=[StageUnavailable("new stage died during the handshake"), None])
    n = iter(range(10))
    rec = _recovery(fake, lambda i: f"tcp://127.0.0.1:{7000 + next(n)}")
    budget = RecoveryBudget(3)
    rec(StageUnavailable("stage 1 silent"), budget)
    assert fake.replaced == [(1, "tcp://127.0.0.1:7000"), (1, "tcp://127.0.0.1:7001")]
    assert budget.used == 2 and rec.records[-1].attempts == 2 and rec.records[-1].replaced == [1]


def test_a_hook_that_keeps_failing_ends_when_the_budget_does():
    fake = _FakeSession(silent=[[0]] * 10, handshakes=[])

    def hook(i):
        raise RuntimeError("no capacity")

    with pytest.raises(StageUnavailable, match="no capacity") as info:
        _recovery(fake, hook)(StageUnavailable("stage 0 silent"), RecoveryBudget(3))
    assert "3 attempts" in str(info.value) and fake.replaced == []


def test_recoveries_that_change_nothing_are_spaced_out(monkeypatch):
    """A hop that is reconnecting (every stage answers, none replaced; the one behind it maybe
    restarted in place) fails a resume at once again: the second such recovery in a row waits, the next twice as long; one that replaces
    a stage starts the count again."""
    import splitnet.edge.recovery as recovery

    slept: list[float] = []
    monkeypatch.setattr(recovery.time, "sleep", slept.append)
    fake = _FakeSession(silent=[[], [], [], [1], []], handshakes=[])
    # stage 1 answers from a new process each time (restarted in place): not a replacement, so no progress
    rec = StageRecovery(lambda i: "tcp://127.0.0.1:7100", fake.silent_stages, fake.replace, fake.new_epoch, lambda: [1],
                        backoff_s=0.1, max_backoff_s=2.0)
    hop = StageUnavailable("stage 1: stage 0 could not reach the next stage")
    for _ in range(3):
        rec(hop, RecoveryBudget(10))
    assert slept == [0.1, 0.2]  # the first at once: the hop may be back already
    rec(StageUnavailable("stage 1 silent"), RecoveryBudget(10))  # replaced: no wait, and the count restarts
    rec(hop, RecoveryBudget(10))
    assert slept == [0.1, 0.2] and fake.replaced == [(1, "tcp://127.0.0.1:7100")]


def test_without_a_hook_a_lost_stage_is_raised_and_a_lost_cache_only_spends():
    fake = _FakeSession(silent=[], handshakes=[])
    rec = _recovery(fake, None)
    with pytest.raises(StageUnavailable, match="gone"):
        rec(StageUnavailable("gone"), RecoveryBudget(3))
    b = RecoveryBudget(1)
    rec(UnknownRequest("no cache"), b)
    assert b.left == 0 and fake.epoch == 0


def test_hooks_for_several_stages_run_in_parallel():
    inside, peak, lock = [0], [0], threading.Lock()
    barrier = threading.Barrier(3, timeout=5)

    def hook(i):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        barrier.wait()  # only passes when all three hooks run at once
        with lock:
            inside[0] -= 1
        return f"tcp://127.0.0.1:{8000 + i}"

    assert replace_in_parallel(hook, [0, 2, 3]) == {0: "tcp://127.0.0.1:8000", 2: "tcp://127.0.0.1:8002", 3: "tcp://127.0.0.1:8003"}
    assert peak[0] == 3


def test_a_failing_hook_among_several_names_its_stage():
    def hook(i):
        if i == 2:
            time.sleep(0.01)
            raise OSError("host unreachable")
        return "tcp://127.0.0.1:1"

    with pytest.raises(StageUnavailable, match="stage 2 .*host unreachable"):
        replace_in_parallel(hook, [1, 2])


class _ByteTokenizer:
    """Each token is one byte of UTF-8 (multi-byte characters span tokens)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_text_concatenates_to_the_whole_and_waits_for_whole_characters():
    tokens = list("héllo → wörld".encode())
    inc = IncrementalText(_ByteTokenizer())
    deltas = [inc.push(tokens[:n + 1], final=n == len(tokens) - 1) for n in range(len(tokens))]
    assert "".join(deltas) == "héllo → wörld"
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # the first byte of a multi-byte character gives no text yet


def test_a_failed_resume_is_forgiven_once_per_spent_recovery():
    cause = StageUnavailable("down")
    b = RecoveryBudget(1)
    b.forgive_next()  # nothing spent yet: nothing to continue
    b.spend(cause)
    b.forgive_next()
    b.forgive_next()  # once, however often it is asked
    b.spend(UnknownRequest("the resume met an empty stage"))  # free: it continues the recovery just spent
    assert (b.left, b.used, b.forgiven) == (0, 1, 1)
    b.forgive_next()  # no recovery spent since the last forgiveness
    with pytest.raises(UnknownRequest):
        b.spend(UnknownRequest("again"))


def test_a_stages_unknown_request_comes_back_as_itself_not_as_caches_lost():
    from splitnet.errors import CachesLost, error_from_code

    e = error_from_code(UnknownRequest.code, "request r step 0 starts at position 28 but this stage's cache holds 0")
    assert type(e) is UnknownRequest
    assert type(error_from_code(CachesLost.code, "x")) is CachesLost
