"""request-reply through running gateways: a Python responder (kpg.responder), a Spring-style one, two
instances sharing the correlation state in Redis, timeouts and late replies."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
import httpx
import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from kpg import GatewayClient, error_details
from kpg.responder import IncomingRequest, Response, serve_requests
from kpg.v1 import request_reply_pb2 as rr
from redis.asyncio import Redis

from tests.conftest import Backends
from tests.support import SERVING, GatewayProcess, eventually, wait_for_health

pytestmark = pytest.mark.e2e

REPLY_TTL_MS = 1500


@dataclass
class Setup:
    prefix: str
    backends: Backends
    workdir: Path
    definitions: Path
    gateways: list[GatewayProcess] = field(default_factory=list)
    responders: list[asyncio.Task[None]] = field(default_factory=list)

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    async def gateway(self) -> GatewayProcess:
        process = GatewayProcess(
            self.workdir / f"gw{len(self.gateways)}",
            env={
                "KPG_KAFKA__BOOTSTRAP_SERVERS": self.backends.bootstrap_servers,
                "KPG_REDIS__URL": self.backends.redis_url,
                # A reply topic and group of this test's own: gateways killed by other tests stay members of
                # a shared group until their session times out.
                "KPG_REQUEST_REPLY__REPLY_TOPIC": self.topic("replies"),
                "KPG_REQUEST_REPLY__REPLY_GROUP": f"{self.prefix}-replies",
                "KPG_REQUEST_REPLY__REPLY_TTL_MS": str(REPLY_TTL_MS),
                "KPG_REQUEST_REPLY__MAX_PAYLOAD_BYTES": "10000",
            },
            args=["--definitions", str(self.definitions)],
        ).start()
        self.gateways.append(process)
        await wait_for_health(process.target, SERVING, process=process)
        return process

    async def responder(
        self,
        name: str,
        handler: Callable[[IncomingRequest], Awaitable[bytes | Response]],
        *,
        skip_expired: bool = True,
    ) -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(
            serve_requests(
                self.topic(name),
                handler,
                bootstrap_servers=self.backends.bootstrap_servers,
                group_id=f"{self.prefix}-{name}-responder",
                ready=ready,
                skip_expired=skip_expired,
            )
        )
        self.responders.append(task)
        await asyncio.wait_for(ready.wait(), 60)


@pytest.fixture
async def setup(backends: Backends, tmp_path: Path) -> AsyncIterator[Setup]:
    prefix = f"rr{uuid.uuid4().hex[:8]}"
    definitions = tmp_path / "definitions.yaml"
    topics = ["echo", "slow", "spring"]
    definitions.write_text(
        "request_reply:\n  topics: ["
        + ", ".join(f"{prefix}.{t}" for t in topics)
        + f', "{prefix}.maybe-*"]\n'
    )
    setup = Setup(prefix, backends, tmp_path, definitions)
    try:
        yield setup
    finally:
        for task in setup.responders:
            task.cancel()
        await asyncio.gather(*setup.responders, return_exceptions=True)
        for gateway in setup.gateways:
            gateway.kill()


async def _echo(request: IncomingRequest) -> Response:
    return Response(b"re:" + request.payload, {"answered-by": "echo"})


def _stored(metrics: str, outcome: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'kpg_request_reply_replies_total{{outcome="{outcome}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _metrics(gateway: GatewayProcess) -> str:
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        return (await http.get("/metrics")).text


async def test_1000_concurrent_requests_through_two_gateways_each_get_their_own_reply(setup: Setup) -> None:
    first, second = await setup.gateway(), await setup.gateway()
    await setup.responder("echo", _echo)
    await eventually(lambda: asyncio.to_thread(_both_consume_replies, setup), timeout_s=60, interval_s=0.5)
    async with GatewayClient(first.target) as a, GatewayClient(second.target) as b:

        async def call(n: int) -> tuple[int, rr.ReplyMessage]:
            client = a if n % 2 else b
            reply = await client.requests.Request(
                rr.RequestMessage(
                    topic=setup.topic("echo"),
                    key=f"k{n}".encode(),
                    payload=f"n={n}".encode(),
                    timeout_ms=30_000,
                )
            )
            return n, reply

        results = await asyncio.gather(*(call(n) for n in range(1000)))
    for n, reply in results:
        assert reply.status == rr.REPLY_STATUS_REPLIED
        assert reply.payload == f"re:n={n}".encode()  # its own reply: none crossed, none lost
        assert reply.headers["answered-by"] == "echo" and reply.reply_topic == setup.topic("replies")
    assert len({reply.correlation_id for _, reply in results}) == 1000
    stored = [_stored(await _metrics(g), "stored") for g in (first, second)]
    # Both instances consumed replies, and each caller still got its own: replies crossed instances via Redis.
    assert sum(stored) == 1000 and all(s > 0 for s in stored), stored


def _both_consume_replies(setup: Setup) -> bool:
    """The shared reply group has two members, each with reply partitions (the rebalance is over)."""
    admin = AdminClient({"bootstrap.servers": setup.backends.bootstrap_servers})
    group = f"{setup.prefix}-replies"
    description = admin.describe_consumer_groups([group])[group].result(10)
    members = [m for m in description.members if m.assignment.topic_partitions]
    return len(members) == 2


async def test_a_late_reply_is_dropped_counted_and_leaves_nothing_in_redis(setup: Setup) -> None:
    gateway = await setup.gateway()

    async def slow(request: IncomingRequest) -> bytes:
        await asyncio.sleep(1.5)
        return b"too late"

    await setup.responder("slow", slow, skip_expired=False)
    correlation_id = f"late-{uuid.uuid4().hex}"
    async with GatewayClient(gateway.target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            await client.requests.Request(
                rr.RequestMessage(
                    topic=setup.topic("slow"), payload=b"x", timeout_ms=500, correlation_id=correlation_id
                )
            )
    details = error_details(timed_out.value)
    assert (details.code, details.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "REPLY_TIMEOUT")

    async def late_counted() -> bool:
        return _stored(await _metrics(gateway), "late") >= 1

    await eventually(late_counted, timeout_s=30)
    redis = Redis.from_url(setup.backends.redis_url)
    try:
        assert await redis.exists(f"kpg:rr:pending:{correlation_id}")  # kept for GetReply until its TTL
        assert not await redis.exists(f"kpg:rr:reply:{correlation_id}")  # the late reply was not kept
        await asyncio.sleep((500 + REPLY_TTL_MS) / 1000)
        leftovers = [key async for key in redis.scan_iter(match=f"kpg:rr:*{correlation_id}*")]
        assert leftovers == []
    finally:
        await redis.aclose()
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
        response = await http.post(
            f"/v1/requests/{setup.topic('slow')}", json={"payload": {"a": 1}, "timeoutMs": 300}
        )
    assert (response.status_code, response.json()["error"]["reason"]) == (504, "REPLY_TIMEOUT")


def _spring_responder(setup: Setup, stop: threading.Event, ready: threading.Event) -> None:
    """What a `@KafkaListener @SendTo` method does: copies only kafka_correlationId and sends to
    kafka_replyTopic."""
    consumer = Consumer(
        {
            "bootstrap.servers": setup.backends.bootstrap_servers,
            "group.id": f"{setup.prefix}-spring",
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": setup.backends.bootstrap_servers})
    consumer.subscribe([setup.topic("spring")], on_assign=lambda c, p: ready.set())
    try:
        while not stop.is_set():
            message = consumer.poll(0.1)
            if message is None or message.error() is not None:
                continue
            headers = dict(cast("list[tuple[str, bytes]]", message.headers() or []))
            body = json.loads(message.value() or b"{}")
            producer.produce(
                headers["kafka_replyTopic"].decode(),
                json.dumps({"greeting": f"hello {body['name']}"}).encode(),
                headers=[("kafka_correlationId", headers["kafka_correlationId"])],
            )
            producer.flush(10)
    finally:
        consumer.close()


async def test_a_spring_style_reply_is_delivered(setup: Setup) -> None:
    gateway = await setup.gateway()
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=_spring_responder, args=(setup, stop, ready), daemon=True)
    thread.start()
    try:
        await asyncio.to_thread(ready.wait, 60)
        async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http:
            response = await http.post(
                f"/v1/requests/{setup.topic('spring')}",
                json={"payload": {"name": "Ada"}, "timeoutMs": 20_000},
            )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "REPLY_STATUS_REPLIED"
        assert json.loads(base64.b64decode(body["payload"])) == {"greeting": "hello Ada"}
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)


async def test_submit_on_one_instance_and_fetch_the_reply_on_another(setup: Setup) -> None:
    first, second = await setup.gateway(), await setup.gateway()
    await setup.responder("echo", _echo)
    async with GatewayClient(first.target) as a, GatewayClient(second.target) as b:
        submitted = await a.requests.SubmitRequest(
            rr.RequestMessage(topic=setup.topic("echo"), payload=b"async", timeout_ms=20_000)
        )
        reply = await b.requests.GetReply(
            rr.GetReplyRequest(correlation_id=submitted.correlation_id, wait_timeout_ms=20_000)
        )
        assert (reply.status, reply.payload) == (rr.REPLY_STATUS_REPLIED, b"re:async")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await b.requests.GetReply(rr.GetReplyRequest(correlation_id="never-sent"))
        assert error_details(unknown.value).reason == "NOT_FOUND"

        # Nobody answers this topic: PENDING while the request may still be answered, TIMED_OUT after.
        pending = await a.requests.SubmitRequest(rr.RequestMessage(topic=setup.topic("slow"), timeout_ms=800))
        first_look = await b.requests.GetReply(rr.GetReplyRequest(correlation_id=pending.correlation_id))
        assert first_look.status == rr.REPLY_STATUS_PENDING
        await asyncio.sleep(1.0)
        later = await b.requests.GetReply(rr.GetReplyRequest(correlation_id=pending.correlation_id))
        assert later.status == rr.REPLY_STATUS_TIMED_OUT

    async with httpx.AsyncClient(timeout=30) as http:
        accepted = await http.post(
            f"{first.rest_url}/v1/requests/{setup.topic('echo')}",
            json={"payload": "aGk=", "timeoutMs": 20_000},
            headers={"Prefer": "respond-async"},
        )
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["Location"]
        assert location == f"/v1/replies/{accepted.json()['correlationId']}"
        fetched = await http.get(f"{second.rest_url}{location}", params={"waitTimeoutMs": 20_000})
    assert fetched.status_code == 200 and fetched.json()["status"] == "REPLY_STATUS_REPLIED"
    assert fetched.json()["payload"] == "cmU6aGk="  # base64 of b"re:hi"


async def test_an_idempotent_retry_sends_once_and_gets_the_same_reply(setup: Setup) -> None:
    gateway = await setup.gateway()
    seen: Counter[bytes] = Counter()

    async def counting(request: IncomingRequest) -> bytes:
        seen[request.payload] += 1
        return b"answer-" + str(seen[request.payload]).encode()

    await setup.responder("echo", counting)
    key = uuid.uuid4().hex
    request = rr.RequestMessage(
        topic=setup.topic("echo"), payload=key.encode(), idempotency_key=key, timeout_ms=20_000
    )
    async with GatewayClient(gateway.target) as client:
        first = await client.requests.Request(request)
        again = await client.requests.Request(request)
    assert first.payload == again.payload == b"answer-1"
    assert first.correlation_id == again.correlation_id
    await asyncio.sleep(0.5)
    assert seen[key.encode()] == 1


async def test_bad_requests_get_the_contract_errors(setup: Setup) -> None:
    gateway = await setup.gateway()
    cases = [
        (rr.RequestMessage(topic="not.allowed"), "TOPIC_NOT_ALLOWED", grpc.StatusCode.PERMISSION_DENIED, 403),
        (rr.RequestMessage(topic=setup.topic("maybe-missing")), "NOT_FOUND", grpc.StatusCode.NOT_FOUND, 404),
        (
            rr.RequestMessage(topic=setup.topic("echo"), payload=b"x" * 10_001),
            "PAYLOAD_TOO_LARGE",
            grpc.StatusCode.INVALID_ARGUMENT,
            413,
        ),
        (
            rr.RequestMessage(topic=setup.topic("echo"), timeout_ms=3_600_000),
            "INVALID_ARGUMENT",
            grpc.StatusCode.INVALID_ARGUMENT,
            400,
        ),
        (
            rr.RequestMessage(topic=setup.topic("echo"), headers={"kpg-reply-topic": "elsewhere"}),
            "INVALID_ARGUMENT",
            grpc.StatusCode.INVALID_ARGUMENT,
            400,
        ),
    ]
    async with (
        GatewayClient(gateway.target) as client,
        httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http,
    ):
        for message, reason, code, status in cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.requests.Request(message)
            assert (error_details(raised.value).reason, raised.value.code()) == (reason, code), message
            body: dict[str, object] = {"payload": base64.b64encode(message.payload).decode()}
            if message.timeout_ms:
                body["timeoutMs"] = message.timeout_ms
            if message.headers:
                body["headers"] = dict(message.headers)
            response = await http.post(f"/v1/requests/{message.topic}", json=body)
            assert (response.status_code, response.json()["error"]["reason"]) == (status, reason), (
                response.text
            )
