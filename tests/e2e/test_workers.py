"""`kpg serve --workers 2` (issue 12): two gateway processes share the gRPC and REST ports, and a caller
cannot tell them apart. Each new connection may land on either worker, so the properties below are
exercised across workers: versions and idempotency of appends, read-your-writes, a reply consumed by one
worker and awaited on the other, metrics added up over both; and the supervisor: a dead worker is
replaced, SIGTERM stops everything within its grace, SIGKILL of the supervisor takes the workers with it,
and a bad definition stops it with exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from kpg import GatewayClient
from kpg.responder import IncomingRequest, serve_requests
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import read_models_pb2 as rm
from kpg.v1 import request_reply_pb2 as rr

from gateway.domain.events import partition_for
from tests.conftest import Backends
from tests.support import GatewayProcess, eventually

pytestmark = pytest.mark.e2e


def _definitions(category: str, prefix: str) -> str:
    return f"""
categories:
  {category}: {{partitions: 3}}
read_models:
  counts:
    category: {category}
    handlers:
      Added: {{increment: {{n: 1}}}}
request_reply:
  topics: ["{prefix}.echo"]
"""


async def ready_pids(rest_url: str) -> set[int]:
    """The pids of the workers that answered ready, over a few fresh connections."""
    pids = set()
    for _ in range(8):
        async with httpx.AsyncClient(base_url=rest_url, timeout=5) as http:  # a new connection each time
            try:
                answer = await http.get("/readyz")
            except httpx.TransportError:
                continue
            if answer.status_code == 200:
                pids.add(int(answer.json()["pid"]))
    return pids


async def wait_for_workers(
    gateway: GatewayProcess, count: int, *, exclude: frozenset[int] | set[int] = frozenset()
) -> set[int]:
    """Wait until `count` distinct workers (none of `exclude`) answer ready; returns their pids."""
    seen: set[int] = set()

    async def all_ready() -> bool:
        assert gateway.process is not None and gateway.process.poll() is None, gateway.log()
        seen.update(await ready_pids(gateway.rest_url) - exclude)
        return len(seen) >= count

    await eventually(all_ready, timeout_s=90, interval_s=0.1)
    return seen


def connections(target: str, count: int) -> list[GatewayClient]:
    """`count` clients, each with a TCP connection of its own (grpc would otherwise share one connection
    among channels to the same target), so that the kernel spreads them over the workers."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [
        GatewayClient(target, channel=grpc.aio.insecure_channel(target, options=options))
        for _ in range(count)
    ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a parent that is gone) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Deployment:
    def __init__(self, backends: Backends, workdir: Path, repo_root: Path) -> None:
        self.category = f"w{uuid.uuid4().hex[:8]}"
        self.prefix = f"wrr{uuid.uuid4().hex[:8]}"
        self.definitions = workdir / "definitions.yaml"
        self.definitions.write_text(_definitions(self.category, self.prefix))
        self.backends = backends
        self.workdir = workdir
        self.repo_root = repo_root

    def gateway(self, definitions: Path | None = None) -> GatewayProcess:
        return GatewayProcess(
            self.workdir,
            env={
                "KPG_KAFKA__BOOTSTRAP_SERVERS": self.backends.bootstrap_servers,
                "KPG_REDIS__URL": self.backends.redis_url,
                "PYTHONPATH": str(self.repo_root),
                # A reply group of its own: the deployment's default one (named after the id in the shared
                # Redis) still lists the members of gateways other tests killed, and a rebalance waits up
                # to their session timeout for them.
                "KPG_REQUEST_REPLY__REPLY_TOPIC": f"{self.prefix}.replies",
                "KPG_REQUEST_REPLY__REPLY_GROUP": f"{self.prefix}.replies",
            },
            args=["--definitions", str(definitions or self.definitions)],
            workers=2,
        )


@pytest.fixture
async def deployment(backends: Backends, tmp_path: Path, repo_root: Path) -> Deployment:
    return Deployment(backends, tmp_path, repo_root)


@pytest.fixture
async def workers(deployment: Deployment) -> AsyncIterator[GatewayProcess]:
    gateway = deployment.gateway().start()
    try:
        await wait_for_workers(gateway, 2)
        yield gateway
    finally:
        gateway.kill()


async def test_both_workers_answer_and_the_metrics_add_up_over_them(workers: GatewayProcess) -> None:
    async def readyz_count() -> float:
        async with httpx.AsyncClient(base_url=workers.rest_url) as http:
            text = (await http.get("/metrics")).text
        line = 'kpg_requests_total{code="200",rpc="readyz",transport="rest"} '
        return sum(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))

    before = await readyz_count()
    answered: dict[int, int] = {}
    for _ in range(40):
        async with httpx.AsyncClient(base_url=workers.rest_url) as http:  # a new connection each time
            pid = (await http.get("/readyz")).json()["pid"]
            answered[pid] = answered.get(pid, 0) + 1
    assert len(answered) == 2, answered  # the kernel spread the connections over both
    assert await readyz_count() - before == 40  # whichever worker answers the scrape counts both


async def test_the_workers_together_hold_every_partition_of_the_reply_group_once(
    workers: GatewayProcess, deployment: Deployment
) -> None:
    group = f"{deployment.prefix}.replies"
    line = f'kpg_consumer_assigned_partitions{{group="{group}"}} '

    async def held() -> float:
        async with httpx.AsyncClient(base_url=workers.rest_url) as http:
            text = (await http.get("/metrics")).text
        return sum(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))

    async def both_hold_their_share() -> bool:
        return await held() == 6  # the reply topic's partitions, summed over the two workers' members

    await eventually(both_hold_their_share, timeout_s=60, interval_s=0.2)


async def test_appends_across_workers_keep_versions_idempotency_and_read_your_writes(
    workers: GatewayProcess, deployment: Deployment
) -> None:
    category = deployment.category
    clients = connections(workers.target, 8)
    try:

        async def append(i: int) -> es.AppendEventsResponse:
            return await clients[i % 8].events.AppendEvents(
                es.AppendEventsRequest(
                    category=category,
                    stream_id="s-1",
                    events=[es.EventData(type="Added", data=json.dumps({"i": i}).encode())],
                )
            )

        appended = await asyncio.gather(*(append(i) for i in range(40)))
        assert sorted(a.first_version for a in appended) == list(range(1, 41))  # no version twice, no gap

        keyed = es.AppendEventsRequest(
            category=category,
            stream_id="s-2",
            idempotency_key=f"k-{uuid.uuid4()}",
            events=[es.EventData(type="Added", data=b"{}")],
        )
        retries = await asyncio.gather(
            *(c.events.AppendEvents(keyed) for c in clients), return_exceptions=True
        )
        landed = {(r.first_version, r.position) for r in retries if isinstance(r, es.AppendEventsResponse)}
        assert len(landed) == 1, retries  # every worker answered with the one append
        # Anything else may only be "in flight" (the first is still being written), never a second append.
        assert all(
            isinstance(r, es.AppendEventsResponse)
            or (isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.ABORTED)
            for r in retries
        )

        last = max(appended, key=lambda a: a.first_version)
        for client in clients:  # read-your-writes on every connection, whichever worker wrote
            document = await client.read_models.Get(
                rm.GetDocumentRequest(read_model="counts", key="s-1", min_position=last.position)
            )
            assert document.data["n"] == 40
            stream = await client.events.ReadStream(es.ReadStreamRequest(category=category, stream_id="s-1"))
            assert [e.version for e in stream.events] == list(range(1, 41))
    finally:
        for client in clients:
            await client.close()


def streams_per_partition(partitions: int, each: int) -> list[str]:
    """`each` stream ids for every partition of a category with `partitions` partitions."""
    found: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for i in range(10_000):
        stream = f"s-{i}"
        bucket = found[partition_for(stream, partitions)]
        if len(bucket) < each:
            bucket.append(stream)
        if all(len(b) == each for b in found.values()):
            return [s for b in found.values() for s in b]
    raise AssertionError("unreachable")


async def metric_sum(rest_url: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=rest_url) as http:
        text = (await http.get("/metrics")).text
    return sum(float(row.rsplit(" ", 1)[1]) for row in text.splitlines() if row.startswith(name))


async def test_each_partition_is_written_by_its_owner_while_connections_land_on_both_workers(
    workers: GatewayProcess, deployment: Deployment
) -> None:
    streams = streams_per_partition(3, 4)
    clients = connections(workers.target, 16)  # all on one worker: 1 in 30,000
    takeovers = "kpg_writer_takeover_seconds_count"
    before = await metric_sum(workers.rest_url, takeovers)
    try:

        async def caller(n: int) -> list[int]:
            versions = []
            for round_ in range(15):  # ~3 s of appends to every partition from both workers
                stream = streams[(n + round_) % len(streams)]
                answer = await clients[n].events.AppendEvents(
                    es.AppendEventsRequest(
                        category=deployment.category,
                        stream_id=stream,
                        events=[es.EventData(type="Added", data=b"{}")],
                    )
                )
                versions.append(answer.first_version)
                await asyncio.sleep(0.2)
            return versions

        appended = await asyncio.gather(*(caller(n) for n in range(16)))
    finally:
        for client in clients:
            await client.close()
    assert sum(len(v) for v in appended) == 16 * 15
    # Without forwarding, the two workers would take each partition from each other every ~0.1 s
    # (dozens of takeovers); with it, each partition's owner takes it once (twice at most, after a pause).
    taken = await metric_sum(workers.rest_url, takeovers) - before
    assert 1 <= taken <= 6, taken
    async with GatewayClient(workers.target) as client:
        for stream in streams:
            read = await client.events.ReadStream(
                es.ReadStreamRequest(category=deployment.category, stream_id=stream)
            )
            assert [e.version for e in read.events] == list(range(1, len(read.events) + 1))


async def test_appends_to_a_dead_workers_partitions_are_written_by_the_survivor(
    workers: GatewayProcess, deployment: Deployment
) -> None:
    streams = streams_per_partition(3, 1)
    async with GatewayClient(workers.target) as client:
        for stream in streams:  # every partition gets a writer, in whichever worker owns it
            await client.events.AppendEvents(
                es.AppendEventsRequest(
                    category=deployment.category,
                    stream_id=stream,
                    events=[es.EventData(type="Added", data=b"{}")],
                )
            )
    first = await wait_for_workers(workers, 2)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    async def dead() -> bool:  # and its listening sockets closed: no connection lands there any more
        return not alive(victim)

    await eventually(dead, timeout_s=10)
    # An append forwarded at the very moment the owner died may or may not have been written: that one is
    # UNAVAILABLE (retry with an idempotency key). Let the survivor see the connection close first.
    await asyncio.sleep(0.3)
    # Until the supervisor replaces it (after 1 s), the survivor serves every connection; the appends it
    # would forward to the victim it writes itself, once the victim's lease has expired.
    async with GatewayClient(workers.target) as client:
        for round_ in range(2, 5):
            for stream in streams:
                answer = await client.events.AppendEvents(
                    es.AppendEventsRequest(
                        category=deployment.category,
                        stream_id=stream,
                        expected_version=round_ - 1,
                        events=[es.EventData(type="Added", data=b"{}")],
                    ),
                    timeout=30,
                    wait_for_ready=True,  # a connection the kernel gave the dying worker is retried
                )
                assert answer.first_version == round_
    await wait_for_workers(workers, 2, exclude={victim})
    async with GatewayClient(workers.target) as client:  # and the owner takes its partitions back
        for stream in streams:
            answer = await client.events.AppendEvents(
                es.AppendEventsRequest(
                    category=deployment.category,
                    stream_id=stream,
                    expected_version=4,
                    events=[es.EventData(type="Added", data=b"{}")],
                ),
                timeout=30,
                wait_for_ready=True,
            )
            assert answer.first_version == 5


async def test_a_reply_reaches_its_caller_whichever_worker_consumes_it(
    workers: GatewayProcess, deployment: Deployment
) -> None:
    topic = f"{deployment.prefix}.echo"
    ready = asyncio.Event()

    async def echo(request: IncomingRequest) -> bytes:
        return b"re:" + request.payload

    responder = asyncio.create_task(
        serve_requests(
            topic, echo, bootstrap_servers=deployment.backends.bootstrap_servers, group_id=topic, ready=ready
        )
    )
    clients = connections(workers.target, 8)
    try:
        await asyncio.wait_for(ready.wait(), 60)
        replies = await asyncio.gather(
            *(
                clients[i % 8].requests.Request(
                    rr.RequestMessage(topic=topic, payload=b"%d" % i, timeout_ms=10_000)
                )
                for i in range(40)
            )
        )
        assert [r.payload for r in replies] == [b"re:%d" % i for i in range(40)]
        # Submitted through one connection, fetched through the others.
        submitted = await clients[0].requests.SubmitRequest(rr.RequestMessage(topic=topic, payload=b"async"))
        for client in clients:
            reply = await client.requests.GetReply(
                rr.GetReplyRequest(correlation_id=submitted.correlation_id, wait_timeout_ms=10_000)
            )
            assert (reply.status, reply.payload) == (rr.REPLY_STATUS_REPLIED, b"re:async")
    finally:
        responder.cancel()
        await asyncio.gather(responder, return_exceptions=True)
        for client in clients:
            await client.close()


async def test_a_reply_consumed_by_the_other_worker_is_handed_over_not_waited_for_through_redis(
    workers: GatewayProcess, deployment: Deployment
) -> None:
    """Calls spread over both workers (fresh connections each round), replies over both workers' reply
    partitions: the worker that consumes a reply for its sibling's call hands it over its unix socket."""
    topic = f"{deployment.prefix}.echo"
    ready = asyncio.Event()

    async def echo(request: IncomingRequest) -> bytes:
        return b"re:" + request.payload

    async def handed_over() -> float:
        async with httpx.AsyncClient(base_url=workers.rest_url) as http:
            text = (await http.get("/metrics")).text
        line = 'kpg_request_reply_handed_over_total{waiting="true"} '
        return sum(float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line))

    responder = asyncio.create_task(
        serve_requests(
            topic, echo, bootstrap_servers=deployment.backends.bootstrap_servers, group_id=topic, ready=ready
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 60)
        for _ in range(10):
            clients = connections(workers.target, 8)
            try:
                replies = await asyncio.gather(
                    *(
                        clients[i % 8].requests.Request(
                            rr.RequestMessage(topic=topic, payload=b"%d" % i, timeout_ms=10_000)
                        )
                        for i in range(24)
                    )
                )
            finally:
                for client in clients:
                    await client.close()
            assert [r.payload for r in replies] == [b"re:%d" % i for i in range(24)]
            if await handed_over() > 0:
                break
        assert await handed_over() > 0, "no reply was handed to the sibling worker whose call waited for it"
    finally:
        responder.cancel()
        await asyncio.gather(responder, return_exceptions=True)


async def test_the_supervisor_replaces_a_dead_worker_and_stops_within_its_grace(
    workers: GatewayProcess,
) -> None:
    first = await wait_for_workers(workers, 2)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    await wait_for_workers(workers, 1, exclude=first)  # a new worker, with a new pid, answers
    later = await wait_for_workers(workers, 2, exclude={victim})
    assert workers.terminate(timeout_s=40) == 0
    assert not any(alive(pid) for pid in later | first)


async def test_workers_die_with_a_killed_supervisor(workers: GatewayProcess) -> None:
    pids = await wait_for_workers(workers, 2)
    workers.kill()  # SIGKILL: no chance to stop anything

    async def gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await eventually(gone, timeout_s=10)


async def test_a_bad_definition_in_a_worker_stops_the_supervisor_with_exit_code_2(
    deployment: Deployment, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        f"categories:\n  {deployment.category}: {{}}\n"
        f"read_models:\n  m:\n    category: {deployment.category}\n    python: tests.e2e.nowhere:nothing\n"
    )
    gateway = deployment.gateway(broken).start()
    try:
        assert gateway.process is not None
        code = await asyncio.to_thread(gateway.process.wait, 60)
    finally:
        gateway.kill()
    assert code == 2, gateway.log()
    assert "tests.e2e.nowhere" in gateway.log()


async def test_a_taken_port_stops_the_supervisor_with_a_clear_error(deployment: Deployment) -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: no worker can share its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, log = await _exit_of(deployment, ["--grpc-port", str(port)])
    assert code == 1, log
    assert f"cannot bind gRPC to 127.0.0.1:{port}" in log


@pytest.mark.parametrize("taken", ["grpc", "rest"])
async def test_a_port_another_supervisor_serves_is_a_clear_error(
    workers: GatewayProcess, deployment: Deployment, taken: str
) -> None:
    # Its workers bind with SO_REUSEPORT, which would let this second deployment bind the same port too.
    port = workers.grpc_port if taken == "grpc" else workers.rest_port
    code, log = await _exit_of(deployment, [f"--{taken}-port", str(port)])
    assert code == 1, log
    name = "gRPC" if taken == "grpc" else "REST"
    assert f"cannot bind {name} to 127.0.0.1:{port}: served by another kpg serve (pid " in log
    assert await ready_pids(workers.rest_url), "the first deployment still serves"


async def _exit_of(deployment: Deployment, args: list[str]) -> tuple[int, str]:
    """Start a deployment's gateway with `args` added, expecting it to exit: its exit code and log."""
    gateway = deployment.gateway()
    gateway.args += args
    gateway.start()
    try:
        assert gateway.process is not None
        return await asyncio.to_thread(gateway.process.wait, 60), gateway.log()
    finally:
        gateway.kill()
