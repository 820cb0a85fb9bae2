"""Back-pressure (services/read_lag.py): which read sides hold appends back, and when."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest

from gateway.errors import RateLimited
from gateway.services.read_lag import ReadLag

TP = ("orders.events", 0)


class Sides:
    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}

    async def __call__(
        self, partitions: Collection[tuple[str, int]]
    ) -> Mapping[str, Mapping[tuple[str, int], int]]:
        return {side: {tp: offset for tp in partitions} for side, offset in self.offsets.items()}


async def test_a_read_side_that_was_caught_up_and_falls_behind_holds_appends_back() -> None:
    sides = Sides()
    lag = ReadLag(max_lag=100)
    lag.register(sides)
    sides.offsets = {"the stream index": 50}
    lag.check(TP, 60)
    await lag.refresh()
    lag.check(TP, 200)  # 10 behind when refreshed: within the bound, so it counts from now on
    sides.offsets = {"the stream index": 60}
    await lag.refresh()  # the writer's end was 200 then: 140 behind
    with pytest.raises(RateLimited) as refused:
        lag.check(TP, 200)
    assert refused.value.metadata == {
        "topic": "orders.events",
        "partition": "0",
        "read_side": "the stream index",
        "lag": "140",
        "retry_after_ms": "500",
    }
    sides.offsets = {"the stream index": 150}
    await lag.refresh()
    lag.check(TP, 200)  # caught up to within the bound: appends go through
    await lag.close()


async def test_a_read_side_replaying_history_never_blocks_writers_until_it_has_caught_up() -> None:
    sides = Sides()
    lag = ReadLag(max_lag=100)
    lag.register(sides)
    sides.offsets = {"read model 'new'": 0}
    lag.check(TP, 10_000)
    await lag.refresh()
    lag.check(TP, 10_000)  # 10,000 behind, but it never was within the bound: not counted
    sides.offsets = {"read model 'new'": 9_950}
    await lag.refresh()
    sides.offsets = {"read model 'new'": 9_950}
    lag.check(TP, 20_000)
    await lag.refresh()
    with pytest.raises(RateLimited):
        lag.check(TP, 20_000)
    await lag.close()


async def test_no_bound_means_no_refusal_and_no_refresh() -> None:
    sides = Sides()
    lag = ReadLag(max_lag=0)
    lag.register(sides)
    sides.offsets = {"the stream index": 0}
    lag.check(TP, 1_000_000)
    await lag.close()
