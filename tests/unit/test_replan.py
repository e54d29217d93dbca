"""Re-plan on loss (#18): where the planner's cost model puts a lost stage's blocks (a standby,
or a neighbour with the memory), and the typed error naming what is missing when nothing fits."""

from __future__ import annotations

import itertools
import time

import pytest

from splitnet.errors import ConfigError, StageUnavailable
from splitnet.planner.profiles import BlockProfile, DeviceProfile, Fleet, LinkProfile, ModelProfile
from splitnet.runtime.fleet import FleetCoordinator, NoPlacement, StagePlacement

MIB = 2**20


def model(blocks: int = 6, block_mib: int = 10) -> ModelProfile:
    blks = tuple(BlockProfile(i, {1: 0.1, 128: 2.0}, param_bytes=block_mib * MIB, out_channels=128, decode_ms=0.2) for i in range(blocks))
    return ModelProfile("toy", "decoder", blks, BlockProfile(-1, {128: 0.1}, param_bytes=4 * MIB, out_channels=128),
                        BlockProfile(blocks, {128: 0.1}, param_bytes=4 * MIB, out_channels=257))


def fleet(*devices: DeviceProfile) -> Fleet:
    links = [LinkProfile(a.name, b.name, 1000.0, 1.0) for a, b in itertools.combinations(devices, 2)]
    return Fleet(devices, links, "test")


def dev(name: str, mib: int, speed: float = 1.0, first: bool = False) -> DeviceProfile:
    return DeviceProfile(name, speed, mib * MIB, can_host_first_stage=first)


CHAIN = [StagePlacement(0, "phone", (0, 2), "tcp://a"), StagePlacement(1, "laptop", (2, 4), "tcp://b"), StagePlacement(2, "cloud", (4, 6), "tcp://c")]


def coordinator(f: Fleet, start=lambda p: f"tcp://{p.device}-{p.blocks[0]}-{p.blocks[1]}", **kw) -> FleetCoordinator:
    return FleetCoordinator(f, model(), CHAIN, start, **kw)


def test_a_lost_middle_stage_goes_to_the_standby_with_exactly_its_blocks():
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 40), dev("cloud", 40), dev("jetson", 60, speed=3.0)))
    assert c(1) == "tcp://jetson-2-4"
    assert c.stages[1] == StagePlacement(1, "jetson", (2, 4), "tcp://jetson-2-4")
    assert c.lost == {"laptop"}
    [move] = c.moves
    assert (move.lost_device, move.device, move.how, move.blocks) == ("laptop", "jetson", "standby", (2, 4))


def test_without_a_standby_the_blocks_merge_into_the_neighbour_that_has_the_memory():
    # phone holds its 28 MiB stage and cannot add 20 MiB; cloud (24 MiB used) has room for both
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 40), dev("cloud", 100)))
    placement, how, _ = c.place(1)
    assert (placement.device, placement.blocks, how) == ("cloud", (2, 4), "neighbour")


def test_the_cost_model_picks_the_faster_of_two_fits():
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 40), dev("cloud", 100, speed=50.0), dev("slowbox", 100, speed=0.2)))
    assert c.place(1)[0].device == "cloud"


def test_no_device_with_the_memory_is_a_typed_error_naming_it():
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 40), dev("cloud", 40), dev("tiny", 8)))
    t0 = time.monotonic()
    with pytest.raises(NoPlacement) as e:
        c(1)
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert "blocks [2,4)" in msg and "laptop" in msg and "tiny (standby)" in msg and "MiB" in msg and "cloud (neighbour)" in msg
    assert isinstance(e.value, StageUnavailable) and c.stages[1].device == "laptop" and not c.moves


def test_the_first_stage_needs_a_device_that_may_host_it():
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 100), dev("cloud", 40), dev("jetson", 100)))
    with pytest.raises(NoPlacement, match="may not host the first stage"):
        c(0)


def test_a_lost_device_is_not_used_again_and_a_second_loss_moves_on():
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 40), dev("cloud", 40), dev("jetson", 60), dev("nuc", 60)))
    first = c(1)
    second = c(1)
    assert first != second and c.lost == {"laptop", c.moves[0].device}
    assert c.stages[1].device not in c.lost and c.stages[1].blocks == (2, 4)


def test_a_start_past_the_deadline_is_stage_unavailable():
    c = coordinator(fleet(dev("phone", 40, first=True), dev("laptop", 40), dev("cloud", 40), dev("jetson", 60)),
                    start=lambda p: time.sleep(3) or "tcp://late", deadline_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(StageUnavailable, match="did not start on jetson within 0.3 s"):
        c(1)
    assert time.monotonic() - t0 < 2.0


def test_stages_must_cover_the_model():
    with pytest.raises(ConfigError, match="cover blocks 0..6"):
        FleetCoordinator(fleet(dev("phone", 40, first=True)), model(), CHAIN[:2], lambda p: "")
