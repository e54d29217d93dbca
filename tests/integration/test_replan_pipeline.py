"""Re-plan on loss with real stage processes (#18): the middle stage's device is lost in the
middle of a generation; its blocks move to a standby device of the fleet (a new process holding
exactly those blocks) and the generation finishes with the fault-free tokens. With no device
that fits, the generation ends in a typed error that names what is missing."""

from __future__ import annotations

import itertools
import time

import pytest

import splitnet
from splitnet.edge.config import ClientConfig
from splitnet.edge.generation import TokenChunk
from splitnet.errors import StageUnavailable
from splitnet.planner.profiles import BlockProfile, DeviceProfile, Fleet, LinkProfile, ModelProfile
from splitnet.runtime.fleet import FleetCoordinator, StagePlacement, local_starter
from splitnet.runtime.launcher import launch_pipeline

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

FAST = ClientConfig(timeout_s=30, connect_timeout_s=20, heartbeat_interval_s=0.3, heartbeat_liveness=3, prefill_chunk_tokens=8)
PROMPT = list(b"def replan(fleet):\n    return")
MIB = 2**20


def tiny_gpt2_profile() -> ModelProfile:
    """tiny-gpt2 as the planner sees it (6 blocks); the memory figures are set so a device of
    40 MiB holds one stage and no more."""
    blocks = tuple(BlockProfile(i, {1: 0.1, 128: 2.0}, param_bytes=10 * MIB, out_channels=128, decode_ms=0.2) for i in range(6))
    return ModelProfile("tiny-gpt2", "decoder", blocks, BlockProfile(-1, {128: 0.1}, param_bytes=4 * MIB, out_channels=128),
                        BlockProfile(6, {128: 0.1}, param_bytes=4 * MIB, out_channels=257))


def fleet(*devices: tuple[str, int]) -> Fleet:
    devs = [DeviceProfile(n, 1.0, mib * MIB, can_host_first_stage=(n == "phone")) for n, mib in devices]
    return Fleet(devs, [LinkProfile(a.name, b.name, 1000.0, 1.0) for a, b in itertools.combinations(devs, 2)], "lab")


@pytest.fixture(scope="module")
def pipe():
    with launch_pipeline("tiny-gpt2", [2, 4]) as p:
        yield p


@pytest.fixture(scope="module")
def expected(pipe):
    with splitnet.connect(pipe.endpoints, config=FAST) as s:
        return s.generate(PROMPT, 16).tokens


def chain(pipe) -> list[StagePlacement]:
    return [StagePlacement(i, dev, tuple(st.blocks), st.endpoint) for i, (dev, st) in enumerate(zip(("phone", "laptop", "cloud"), pipe.stages))]


def test_a_lost_device_s_blocks_move_to_the_standby_and_generation_finishes(pipe, expected):
    coord = FleetCoordinator(fleet(("phone", 40), ("laptop", 40), ("cloud", 40), ("jetson", 60)), tiny_gpt2_profile(), chain(pipe),
                             local_starter(pipe))
    old_pid = pipe.stages[1].pid
    got: list[int] = []
    with splitnet.connect(pipe.endpoints, config=FAST, recovery=coord) as s:
        for ev in s.stream(PROMPT, 16):
            if isinstance(ev, TokenChunk):
                got.append(ev.token)
                if len(got) == 5:
                    pipe.kill_stage(1)  # the laptop leaves
        assert got == expected, "tokens differ from the fault-free run, or one came twice"
        [move] = coord.moves
        assert (move.lost_device, move.device, move.how, move.blocks) == ("laptop", "jetson", "standby", (2, 4))
        info = s.refresh()[1]
        assert info["blocks"] == [2, 4] and info["pid"] != old_pid, "the new stage must hold exactly the lost blocks"
        assert coord.stages[1].endpoint == s.endpoints[1] and [r["replaced"] for r in s.recoveries] == [[1]]


def test_no_device_that_fits_ends_in_a_typed_error_naming_the_memory(pipe, expected):
    coord = FleetCoordinator(fleet(("phone", 40), ("laptop", 40), ("cloud", 40), ("tiny", 8)), tiny_gpt2_profile(), chain(pipe),
                             local_starter(pipe))
    seen: list[int] = []
    with splitnet.connect(pipe.endpoints, config=FAST, recovery=coord) as s:
        t_kill = [0.0]

        def on_token(i: int, tok: int) -> None:
            seen.append(tok)
            if len(seen) == 3:
                pipe.kill_stage(1)
                t_kill[0] = time.monotonic()

        with pytest.raises(StageUnavailable) as e:
            s.generate_many([PROMPT], 16, on_token=on_token)
        waited = time.monotonic() - t_kill[0]
    msg = str(e.value)
    assert "no live device can take it" in msg and "MiB" in msg and "tiny (standby)" in msg, msg
    assert waited < FAST.timeout_s, "the error came from a timeout, not from the placement"
    assert not coord.moves and seen == expected[:3]
