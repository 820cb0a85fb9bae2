"""request-reply through running gateways: a Python responder (kpg.responder), a Spring-style one, two
instances sharing the correlation state in Redis, two deployments sharing one Kafka, timeouts, late
replies, failed sends and the requests a caller may not send."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
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

from gateway.adapters.kafka import KafkaAdmin, TopicSpec
from gateway.adapters.redis import CorrelationStore, IdempotencyStore, RedisClient
from gateway.definitions import parse_definitions
from gateway.devstack.processes import free_port
from gateway.domain.request_reply import Request
from gateway.errors import GatewayError
from gateway.services.idempotency import Idempotency, IdempotencySettings
from gateway.services.request_reply import RequestReply
from gateway.settings import KafkaSettings, RequestReplySettings
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

    async def gateway(
        self,
        *,
        redis_url: str | None = None,
        derived_reply_names: bool = False,
        definitions: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> GatewayProcess:
        environment = {
            "KPG_KAFKA__BOOTSTRAP_SERVERS": self.backends.bootstrap_servers,
            "KPG_REDIS__URL": redis_url or self.backends.redis_url,
            "KPG_REQUEST_REPLY__REPLY_TTL_MS": str(REPLY_TTL_MS),
            "KPG_REQUEST_REPLY__MAX_PAYLOAD_BYTES": "10000",
        }
        if not derived_reply_names:
            # A reply topic and group of this test's own: gateways killed by other tests stay members of
            # a shared group until their session times out.
            environment["KPG_REQUEST_REPLY__REPLY_TOPIC"] = self.topic("replies")
            environment["KPG_REQUEST_REPLY__REPLY_GROUP"] = f"{self.prefix}-replies"
        process = GatewayProcess(
            self.workdir / f"gw{len(self.gateways)}",
            env={**environment, **(env or {})},
            args=["--definitions", str(definitions or self.definitions)],
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
    members = first.workers + second.workers  # each worker of each instance is a member of the reply group
    await eventually(
        lambda: asyncio.to_thread(_all_consume_replies, setup, members), timeout_s=60, interval_s=0.5
    )
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
    metrics = [await _metrics(g) for g in (first, second)]
    stored = [_stored(m, "stored") for m in metrics]
    # Both instances consumed replies, and each caller still got its own: replies crossed instances via Redis.
    assert sum(stored) == 1000 and all(s > 0 for s in stored), stored
    # Every round trip's legs were measured where its call waited, whichever instance consumed the reply.
    for leg in ("record", "send", "service", "fetch", "deliver"):
        assert sum(_leg_count(m, leg) for m in metrics) == 1000, leg


def _leg_count(metrics: str, leg: str) -> float:
    prefix = f'kpg_request_reply_leg_seconds_count{{leg="{leg}"}} '
    return sum(float(line.removeprefix(prefix)) for line in metrics.splitlines() if line.startswith(prefix))


def _all_consume_replies(setup: Setup, members: int) -> bool:
    """The shared reply group has `members` members, each with reply partitions (the rebalance is over)."""
    admin = AdminClient({"bootstrap.servers": setup.backends.bootstrap_servers})
    group = f"{setup.prefix}-replies"
    description = admin.describe_consumer_groups([group])[group].result(10)
    consuming = [m for m in description.members if m.assignment.topic_partitions]
    return len(consuming) == members


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


def _pending_key(correlation_id: str) -> str:
    return f"kpg:rr:pending:{correlation_id}"


async def test_a_request_kafka_refuses_frees_its_correlation_id_for_the_retry(setup: Setup) -> None:
    # The gateway's own limit lets the payload through; the topic's max.message.bytes (the broker's ~1 MiB
    # default) refuses it.
    gateway = await setup.gateway(env={"KPG_REQUEST_REPLY__MAX_PAYLOAD_BYTES": "4000000"})
    await setup.responder("echo", _echo)
    correlation_id = f"retry-{uuid.uuid4().hex}"
    redis = Redis.from_url(setup.backends.redis_url)
    try:
        async with GatewayClient(gateway.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.requests.Request(
                    rr.RequestMessage(
                        topic=setup.topic("echo"),
                        payload=os.urandom(1_100_000),  # incompressible: lz4 must not shrink it
                        correlation_id=correlation_id,
                        timeout_ms=20_000,
                    )
                )
            assert error_details(refused.value).reason == "PAYLOAD_TOO_LARGE"
            assert not await redis.exists(_pending_key(correlation_id))  # withdrawn, not kept for 5 min
            reply = await client.requests.Request(
                rr.RequestMessage(
                    topic=setup.topic("echo"),
                    payload=b"small",
                    correlation_id=correlation_id,
                    timeout_ms=20_000,
                )
            )
        assert (reply.status, reply.payload, reply.correlation_id) == (
            rr.REPLY_STATUS_REPLIED,
            b"re:small",
            correlation_id,
        )
    finally:
        await redis.aclose()


async def test_a_failed_or_cancelled_send_withdraws_its_pending_record(setup: Setup) -> None:
    """In-process, on the real Redis, with a producer whose broker never answers: the one way to make a
    send fail, or cancel it, half-way on purpose. (Topics are created through the real broker.)"""
    backends = setup.backends
    topic, reply_topic = setup.topic("unanswered"), setup.topic("replies")
    admin = KafkaAdmin(backends.kafka())
    await admin.ensure_topics([TopicSpec(topic, 1)])
    client = RedisClient(backends.redis())
    service = RequestReply(
        settings=RequestReplySettings(reply_topic=reply_topic, reply_group=f"{setup.prefix}-replies"),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}", delivery_timeout_ms=3_000),
        definitions=parse_definitions({"request_reply": {"topics": [topic]}}),
        admin=admin,
        store=CorrelationStore(client),
        idempotency=Idempotency(IdempotencyStore(client), IdempotencySettings()),
    )
    try:
        await service.start()
        await service.start()  # idempotent

        failed = f"failed-{uuid.uuid4().hex}"
        with pytest.raises(GatewayError) as raised:  # the send's own error, not the clean-up's
            await service.submit(Request(topic, b"", b"x", {}, 60_000, failed))
        assert raised.value.reason.name in {"BACKEND_UNAVAILABLE", "NOT_FOUND"}, raised.value
        assert not await client.redis.exists(_pending_key(failed))

        cancelled = f"cancelled-{uuid.uuid4().hex}"
        sending = asyncio.create_task(service.submit(Request(topic, b"", b"x", {}, 60_000, cancelled)))

        async def recorded() -> bool:
            return bool(await client.redis.exists(_pending_key(cancelled)))

        await eventually(recorded, timeout_s=10, interval_s=0.01)
        assert not sending.done()  # waiting for the broker's acknowledgement
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert not await client.redis.exists(_pending_key(cancelled))
    finally:
        await service.stop()
        await client.close()
        await admin.delete_topics([topic, reply_topic])


async def test_two_deployments_on_one_kafka_each_get_their_own_replies(setup: Setup) -> None:
    """Deployments A (two gateways) and B (one) share the Kafka cluster, each with its own Redis. Every
    reply reaches its caller: each deployment consumes its own reply topic, named after its id."""
    base = setup.backends.redis_url.rsplit("/", 1)[0]
    urls = {"A": f"{base}/1", "B": f"{base}/2"}
    redises = {name: Redis.from_url(url) for name, url in urls.items()}
    deployment_ids: dict[str, str] = {}
    try:
        for redis in redises.values():
            # A fresh id per run: an earlier run's group would still list its killed gateways as members.
            await redis.delete(CorrelationStore.DEPLOYMENT_KEY)
        gateways = {
            "A1": await setup.gateway(redis_url=urls["A"], derived_reply_names=True),
            "A2": await setup.gateway(redis_url=urls["A"], derived_reply_names=True),
            "B": await setup.gateway(redis_url=urls["B"], derived_reply_names=True),
        }
        for name, redis in redises.items():
            raw = await redis.get(CorrelationStore.DEPLOYMENT_KEY)
            assert isinstance(raw, bytes)
            deployment_ids[name] = raw.decode()
        assert deployment_ids["A"] != deployment_ids["B"]
        await setup.responder("echo", _echo)

        async def call(gateway: str, n: int) -> tuple[str, int, rr.ReplyMessage]:
            async with GatewayClient(gateways[gateway].target) as client:
                reply = await client.requests.Request(
                    rr.RequestMessage(
                        topic=setup.topic("echo"), payload=f"{gateway}:{n}".encode(), timeout_ms=30_000
                    )
                )
            return gateway, n, reply

        results = await asyncio.gather(*(call(g, n) for g in gateways for n in range(60)))
        for caller, n, reply in results:
            assert reply.status == rr.REPLY_STATUS_REPLIED and reply.payload == f"re:{caller}:{n}".encode()
            assert reply.reply_topic == f"kpg.replies.{deployment_ids[caller[0]]}"
        stored = {name: _stored(await _metrics(g), "stored") for name, g in gateways.items()}
        unknown = {name: _stored(await _metrics(g), "unknown") for name, g in gateways.items()}
        # No gateway consumed a reply of the other deployment (it would count it 'unknown').
        assert (stored["A1"] + stored["A2"], stored["B"]) == (120, 60), stored
        assert set(unknown.values()) == {0.0}, unknown
    finally:
        for process in setup.gateways:
            process.kill()
        for redis in redises.values():
            await redis.delete(CorrelationStore.DEPLOYMENT_KEY)
            await redis.aclose()
        admin = KafkaAdmin(setup.backends.kafka())
        ours = {f"kpg.replies.{i}" for i in deployment_ids.values()} & set(await admin.list_topics())
        if ours:
            await admin.delete_topics(ours)


async def _refused(
    client: GatewayClient,
    http: httpx.AsyncClient,
    message: rr.RequestMessage,
    reason: str,
    status: int,
    field: str | None = None,
) -> None:
    """The same refusal over gRPC and over REST (with the field violation, when one is named)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.requests.Request(message)
    details = error_details(raised.value)
    assert details.reason == reason, (message, details)
    if field is not None:
        assert field in details.field_violations, details
    body: dict[str, object] = {"payload": base64.b64encode(message.payload).decode()}
    if message.headers:
        body["headers"] = dict(message.headers)
    if message.timeout_ms:
        body["timeoutMs"] = message.timeout_ms
    response = await http.post(f"/v1/requests/{message.topic}", json=body)
    error = response.json()["error"]
    assert (response.status_code, error["reason"]) == (status, reason), response.text
    if field is not None:
        assert field in [v["field"] for v in error["fieldViolations"]], response.text


async def test_a_request_cannot_forge_events_or_reach_event_and_internal_topics(setup: Setup) -> None:
    prefix = setup.prefix
    definitions = setup.workdir / "protected.yaml"
    # The allowlist matches every topic below: what is refused is refused whatever the allowlist says.
    definitions.write_text(
        "categories:\n"
        f"  {prefix}-orders: {{topic: {prefix}.maybe-orders}}\n"
        f"  {prefix}-payments: {{}}\n"
        "request_reply:\n"
        f'  topics: ["{prefix}.echo", "{prefix}.*", "{prefix}-*", "kpg.*", "_*"]\n'
    )
    gateway = await setup.gateway(definitions=definitions)
    forbidden_topics = [
        f"{prefix}.maybe-orders",  # a category's own topic
        f"{prefix}-payments.events",  # a category's default topic
        f"{prefix}.echo.DLT",
        setup.topic("replies"),  # the gateway's reply topic: a request there would pass for a reply
        "kpg.replies",
        "kpg.anything",
        "_schemas",
        "__consumer_offsets",
    ]
    echo = setup.topic("echo")
    async with (
        GatewayClient(gateway.target) as client,
        httpx.AsyncClient(base_url=gateway.rest_url, timeout=30) as http,
    ):
        for topic in forbidden_topics:
            await _refused(
                client, http, rr.RequestMessage(topic=topic, payload=b"{}"), "TOPIC_NOT_ALLOWED", 403
            )
        for name in ["ce_type", "CE_ID", "Ce_Source", "content-type", "Content-Type", "KPG-Reply-Topic", ""]:
            message = rr.RequestMessage(topic=echo, payload=b"{}", headers={name: "forged"})
            await _refused(client, http, message, "INVALID_ARGUMENT", 400, field=f"headers[{name}]")
        message = rr.RequestMessage(topic=echo, payload=b"{}", headers={"bad\x01name": "v"})
        await _refused(client, http, message, "INVALID_ARGUMENT", 400, field="headers[bad\\x01name]")
        # Headers are part of the record: the size limit (10,000 bytes here) counts them.
        message = rr.RequestMessage(
            topic=echo, payload=b"x" * 9_900, headers={"x-big": "v" * 100}, timeout_ms=1_000
        )
        await _refused(client, http, message, "PAYLOAD_TOO_LARGE", 413)
