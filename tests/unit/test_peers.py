"""Calls between workers (adapters/peers.py) over real unix sockets: results and errors arrive as raised,
a call is either not sent (PeerUnreachable: do it yourself) or its outcome is unknown, calls run
concurrently, and nothing but the gateway's own records can be unpickled."""

from __future__ import annotations

import asyncio
import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from gateway.adapters.peers import Peers, PeerServer, PeerUnreachable, _loads, socket_path
from gateway.domain.events import AppendRequest, AppendResult, Expectation, Expected, NewEvent
from gateway.errors import BackendUnavailable, Reason, WrongExpectedVersion

REQUEST = AppendRequest(
    category="orders",
    stream_id="o-1",
    events=(NewEvent("e-1", "Placed", b'{"n": 1}', metadata={"k": "v"}),),
    expected=Expected(Expectation.EXACT, 3),
    idempotency_key="key",
)


async def serve(tmp_path: Path, handlers: dict[str, Any]) -> PeerServer:
    server = PeerServer(socket_path(tmp_path, 1), handlers)
    await server.start()
    return server


async def test_a_call_carries_the_gateways_records_both_ways(tmp_path: Path) -> None:
    seen: list[AppendRequest] = []

    async def append(request: AppendRequest) -> AppendResult:
        seen.append(request)
        return AppendResult(4, 4, "orders.events", 2, 10, 10, "pos")

    server = await serve(tmp_path, {"append": append})
    peers = Peers(tmp_path, 0, 2)
    try:
        assert await peers.call(1, "append", REQUEST, 5) == AppendResult(
            4, 4, "orders.events", 2, 10, 10, "pos"
        )
        assert seen == [REQUEST]
        assert oct(os.stat(socket_path(tmp_path, 1)).st_mode & 0o777) == "0o600"
    finally:
        await peers.close()
        await server.close()


async def test_errors_arrive_with_their_class_reason_and_metadata(tmp_path: Path) -> None:
    async def append(request: AppendRequest) -> AppendResult:
        if request.stream_id == "boom":
            raise RuntimeError("a bug")
        raise WrongExpectedVersion("at 7, expected 3", metadata={"actual": "7", "expected": "3"})

    server = await serve(tmp_path, {"append": append})
    peers = Peers(tmp_path, 0, 2)
    try:
        with pytest.raises(WrongExpectedVersion) as raised:
            await peers.call(1, "append", REQUEST, 5)
        assert (raised.value.reason, raised.value.message) == (
            Reason.WRONG_EXPECTED_VERSION,
            "at 7, expected 3",
        )
        assert raised.value.metadata == {"actual": "7", "expected": "3"}
        # Anything else the handler raises is UNAVAILABLE, and the connection goes on serving.
        with pytest.raises(BackendUnavailable, match="a bug"):
            await peers.call(1, "append", AppendRequest("orders", "boom", REQUEST.events), 5)
        with pytest.raises(WrongExpectedVersion):
            await peers.call(1, "append", REQUEST, 5)
    finally:
        await peers.close()
        await server.close()


async def test_a_call_that_cannot_be_sent_is_unreachable(tmp_path: Path) -> None:
    peers = Peers(tmp_path, 0, 2)
    with pytest.raises(PeerUnreachable):  # no socket at all
        await peers.call(1, "append", REQUEST, 5)
    server = await serve(tmp_path, {})
    await server.close()  # a socket file nobody listens on (a worker that died) ...
    socket_path(tmp_path, 1).touch()
    with pytest.raises(PeerUnreachable):
        await Peers(tmp_path, 0, 2).call(1, "append", REQUEST, 5)


async def test_a_peer_that_dies_mid_call_leaves_the_outcome_unknown(tmp_path: Path) -> None:
    started = asyncio.Event()

    async def append(request: AppendRequest) -> AppendResult:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    server = await serve(tmp_path, {"append": append})
    peers = Peers(tmp_path, 0, 2)
    try:
        call = asyncio.create_task(peers.call(1, "append", REQUEST, 30))
        await asyncio.wait_for(started.wait(), 5)
        await server.close()
        with pytest.raises(BackendUnavailable, match="may or may not"):  # not PeerUnreachable
            await asyncio.wait_for(call, 5)
        with pytest.raises(BackendUnavailable, match=r"within 0\.2s"):
            server = await serve(tmp_path, {"append": append})
            await peers.call(1, "append", REQUEST, 0.2)
    finally:
        await peers.close()
        await server.close()


async def test_calls_on_one_connection_are_handled_concurrently(tmp_path: Path) -> None:
    running = peak = 0

    async def append(request: AppendRequest) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return request.stream_id

    server = await serve(tmp_path, {"append": append})
    peers = Peers(tmp_path, 0, 2)
    try:
        answers = await asyncio.gather(
            *(peers.call(1, "append", AppendRequest("c", f"s-{i}", REQUEST.events), 5) for i in range(20))
        )
        assert answers == [f"s-{i}" for i in range(20)]  # each answer to its own call
        assert peak > 1
    finally:
        await peers.close()
        await server.close()


def test_only_the_gateways_own_records_can_be_unpickled() -> None:
    assert _loads(pickle.dumps((1, "append", REQUEST))) == (1, "append", REQUEST)
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system"):
        _loads(pickle.dumps(os.system))


def test_owners_are_spread_and_agreed_on() -> None:
    workers = [Peers(Path("/nowhere"), i, 2) for i in range(2)]
    owners = [workers[0].owner(f"orders.events/{p}") for p in range(60)]
    assert owners == [workers[1].owner(f"orders.events/{p}") for p in range(60)]
    assert 20 <= owners.count(0) <= 40
