"""`kpg serve` runs on uvloop by default (KPG_EVENT_LOOP), asyncio's own loop on request."""

import asyncio

import pytest

from gateway.__main__ import run_on_loop
from gateway.settings import Settings


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_the_gateway_runs_on_the_loop_asked_for(kind: str) -> None:
    ran_on: list[str] = []

    async def main() -> None:
        ran_on.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_on_loop(main(), kind)
    assert ran_on == [kind]


def test_uvloop_is_the_default() -> None:
    assert Settings().event_loop == "uvloop"
