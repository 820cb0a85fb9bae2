"""What each gateway pattern is measured against in loadtest/bench.py, on the same broker, in the same run.

In this process (the benchmark's), driven by the same callers as the gateway's rows:
- `RawProducer`: confluent-kafka produce (idempotent, acks=all), each record with a delivery callback and
  each caller waiting for its whole batch, as an append waits for its events; `produce_flat_out` without
  callbacks, flushed at the end.
- `BareRoundTrip`: produce a request with `kpg-correlation-id` and `kpg-reply-topic`, a responder answers,
  a consumer matches the reply; with the request topic as the reply topic it is produce -> consume (the
  consumer sees the record itself), the floor of reading your own write.

Processes of their own, started by bench.py with `python -m loadtest.references KIND ...` (each prints
`ready` once it serves):
- `grpc`: a do-nothing grpc.aio server with the gateway's EventStore and ReadModels message types (the
  request is parsed, an empty response returned), binding its port with SO_REUSEPORT so that as many of
  them run as the gateway has workers;
- `rest`: a do-nothing FastAPI app under uvicorn, configured as the gateway's, with the gateway's append
  and document routes and JSON bodies (the body is parsed, `{}` returned), SO_REUSEPORT likewise;
- `responder`: kpg.responder.serve_requests echoing the payload on each --topic (the gateway's request
  topic and the bare round trip's), so both request-reply paths have the same responder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, cast

import grpc
import uvicorn
from confluent_kafka import Consumer, KafkaError, Message, Producer
from fastapi import Body, FastAPI, Header
from kpg.responder import IncomingRequest, serve_requests
from kpg.v1 import event_store_pb2 as es
from kpg.v1 import event_store_pb2_grpc, read_models_pb2_grpc
from kpg.v1 import read_models_pb2 as rm

from gateway.settings import GrpcSettings, KafkaSettings

CORRELATION = "kpg-correlation-id"
REPLY_TOPIC = "kpg-reply-topic"
LOW_LATENCY = {"linger.ms": 0, "socket.nagle.disable": True}  # as the gateway's request path


# --- raw produce ------------------------------------------------------------------------------------------


def raw_producer_config(bootstrap_servers: str) -> dict[str, Any]:
    """Idempotent, acks=all, lz4 and the gateway's linger: the event producer's settings without the
    transactions."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": KafkaSettings().linger_ms,
    }


class _Poller:
    """Serves a producer's delivery callbacks on a thread of its own (the async wall of STYLE.md 7)."""

    def __init__(self, producer: Producer, name: str) -> None:
        self._producer = producer
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            self._producer.poll(0.05)

    def stop(self) -> None:
        self._running = False
        self._thread.join()


class RawProducer:
    """confluent-kafka produce where every record has a delivery callback and a caller waits for all the
    records of its batch: the raw equivalent of an append of that many events."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self._topic = topic
        self._producer = Producer(raw_producer_config(bootstrap_servers))
        self._producer.list_topics(topic, 10)  # metadata now: the first batch is not timed with it
        self._poller = _Poller(self._producer, "bench-raw-produce")

    async def batch(self, key: bytes, values: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending = len(values)
        errors: list[str] = []

        def settle() -> None:
            if done.done():
                return
            if errors:
                done.set_exception(RuntimeError(errors[0]))
            else:
                done.set_result(None)

        def delivered(error: KafkaError | None, _message: Message) -> None:
            nonlocal pending
            if error is not None:
                errors.append(error.str())
            pending -= 1  # on the poller thread only
            if pending == 0:
                loop.call_soon_threadsafe(settle)

        for value in values:
            while True:
                try:
                    self._producer.produce(self._topic, value, key=key, on_delivery=delivered)
                    break
                except BufferError:
                    await asyncio.sleep(0.005)  # the local queue is full: the poller drains it
        await done

    def close(self) -> None:
        self._poller.stop()
        self._producer.flush(30)


def produce_flat_out(
    bootstrap_servers: str, topic: str, values: list[bytes], keys: list[bytes], seconds: float
) -> tuple[int, float]:
    """Produce without delivery callbacks for `seconds`, then flush: (records, seconds including the flush).
    Runs on a thread of its own."""
    producer = Producer(raw_producer_config(bootstrap_servers))
    producer.list_topics(topic, 10)
    count = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            while True:
                try:
                    producer.produce(topic, values[count % len(values)], key=keys[count % len(keys)])
                    break
                except BufferError:
                    producer.poll(0.01)
            count += 1
        producer.poll(0)
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"raw produce: {left} records not delivered")
    return count, time.perf_counter() - started


# --- bare round trips -------------------------------------------------------------------------------------


class BareRoundTrip:
    """A request produced with a correlation id and a reply topic, its reply matched by a consumer of the
    reply topic. `request_topic == reply_topic` makes it produce -> consume: `write_then_read` awaits
    Kafka's acknowledgement, then the consumer seeing the record."""

    def __init__(self, bootstrap_servers: str, *, request_topic: str, reply_topic: str, group: str) -> None:
        self._request_topic = request_topic
        self._reply_topic = reply_topic
        self._producer = Producer({"bootstrap.servers": bootstrap_servers, "acks": "all", **LOW_LATENCY})
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": f"{group}-{uuid.uuid4().hex[:6]}",
                # The topics are the run's own: from the beginning, nothing sent while the group was being
                # joined is missed (`latest` resolves the offset only after the assignment).
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "socket.nagle.disable": True,
            }
        )
        self._kafka_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-bare-consumer")
        self._poller = _Poller(self._producer, "bench-bare-producer")
        self._waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 60) -> None:
        """Subscribe and wait until the consumer has its partitions."""
        loop = asyncio.get_running_loop()
        assigned = asyncio.Event()

        def on_assign(_consumer: Consumer, partitions: list[Any]) -> None:
            if partitions:
                loop.call_soon_threadsafe(assigned.set)

        await loop.run_in_executor(
            self._kafka_thread,
            lambda: self._consumer.subscribe([self._reply_topic], on_assign=on_assign),
        )
        self._task = asyncio.create_task(self._consume(), name="bench-bare-consumer")
        await asyncio.wait_for(assigned.wait(), timeout_s)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for message in await loop.run_in_executor(self._kafka_thread, _consume_ready, self._consumer):
                if message.error() is not None:
                    continue
                headers = dict(cast("list[tuple[str, bytes]]", message.headers() or []))
                future = self._waiting.pop(headers.get(CORRELATION, b""), None)
                if future is not None and not future.done():
                    future.set_result(message.value() or b"")

    async def request(self, payload: bytes) -> bytes:
        """Produce the request (no delivery wait) and await its reply."""
        correlation = uuid.uuid4().hex.encode()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        try:
            self._producer.produce(self._request_topic, payload, headers=self._headers(correlation))
            return await future
        finally:
            self._waiting.pop(correlation, None)

    async def write_then_read(self, payload: bytes, key: bytes) -> tuple[float, float]:
        """Produce one record, await Kafka's acknowledgement, then the consumer's sight of it: (ms until
        acknowledged, ms from acknowledged until read)."""
        loop = asyncio.get_running_loop()
        correlation = uuid.uuid4().hex.encode()
        seen: asyncio.Future[bytes] = loop.create_future()
        acked: asyncio.Future[None] = loop.create_future()
        self._waiting[correlation] = seen

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                loop.call_soon_threadsafe(_resolve, acked)
            else:
                loop.call_soon_threadsafe(_fail, acked, RuntimeError(error.str()))

        started = time.perf_counter()
        try:
            self._producer.produce(
                self._request_topic,
                payload,
                key=key,
                headers=self._headers(correlation),
                on_delivery=delivered,
            )
            await acked
            acked_at = time.perf_counter()
            await seen
            return 1000 * (acked_at - started), 1000 * (time.perf_counter() - acked_at)
        finally:
            self._waiting.pop(correlation, None)

    def _headers(self, correlation: bytes) -> list[tuple[str, str | bytes | None]]:
        return [(CORRELATION, correlation), (REPLY_TOPIC, self._reply_topic.encode())]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._poller.stop()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._kafka_thread, self._producer.flush, 5)
        await loop.run_in_executor(self._kafka_thread, self._consumer.close)
        self._kafka_thread.shutdown()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


def _consume_ready(consumer: Consumer, max_messages: int = 500) -> list[Message]:
    """What is there now, else the first message within 50 ms and what came with it."""
    messages = consumer.consume(max_messages, 0)
    if not messages:
        messages = consumer.consume(1, 0.05)
        if messages:
            messages += consumer.consume(max_messages - 1, 0)
    return messages


# --- reference servers (processes of their own) ----------------------------------------------------------


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket shared with the other processes on the port (as the gateway's REST workers)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


Context = grpc.aio.ServicerContext[Any, Any]


class _NothingEventStore(event_store_pb2_grpc.EventStoreServicer):
    """EventStore that parses the request (grpc does, with the gateway's message types) and does nothing."""

    async def AppendEvents(
        self, request: es.AppendEventsRequest, context: Context
    ) -> es.AppendEventsResponse:
        return es.AppendEventsResponse()

    async def ReadStream(self, request: es.ReadStreamRequest, context: Context) -> es.ReadStreamResponse:
        return es.ReadStreamResponse()

    async def Subscribe(self, request: es.SubscribeRequest, context: Context) -> None:  # type: ignore[override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served here")


class _NothingReadModels(read_models_pb2_grpc.ReadModelsServicer):
    async def Get(self, request: rm.GetDocumentRequest, context: Context) -> rm.Document:
        return rm.Document()

    async def Query(self, request: rm.QueryRequest, context: Context) -> rm.QueryResponse:
        return rm.QueryResponse()

    async def GetStatus(self, request: rm.GetStatusRequest, context: Context) -> rm.ReadModelStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served here")

    async def Rebuild(self, request: rm.RebuildRequest, context: Context) -> rm.ReadModelStatus:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served here")

    async def ListReadModels(
        self, request: rm.ListReadModelsRequest, context: Context
    ) -> rm.ListReadModelsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not served here")


async def serve_grpc(host: str, port: int) -> None:
    limit = GrpcSettings().max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1),
        ]
    )
    event_store_pb2_grpc.add_EventStoreServicer_to_server(_NothingEventStore(), server)
    read_models_pb2_grpc.add_ReadModelsServicer_to_server(_NothingReadModels(), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    await _serve_until_stopped(server.stop(grace=1))


def nothing_app() -> FastAPI:
    """The gateway's append and document routes, doing nothing with what they parse."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/v1/streams/{category}/{stream_id}/events")
    async def append_events(
        category: str,
        stream_id: str,
        body: Annotated[Any, Body()],
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> dict[str, Any]:
        return {}

    @app.get("/v1/read-models/{read_model}/documents/{key}")
    async def get_document(read_model: str, key: str) -> dict[str, Any]:
        return {}

    return app


class _QuietServer(uvicorn.Server):
    """This process owns SIGTERM (as the gateway's embedded server)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_rest(host: str, port: int) -> None:
    # As gateway/transport/rest/server.py configures uvicorn.
    config = uvicorn.Config(
        nothing_app(),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        server_header=False,
    )
    server = _QuietServer(config)
    sock = reuse_port_socket(host, port)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)

    async def stop() -> None:
        server.should_exit = True
        await serving

    await _serve_until_stopped(stop())


async def serve_responder(bootstrap_servers: str, topics: list[str]) -> None:
    async def echo(request: IncomingRequest) -> bytes:
        return request.payload

    tasks, readies = [], []
    for topic in topics:
        ready = asyncio.Event()
        readies.append(ready)
        tasks.append(
            asyncio.create_task(
                serve_requests(
                    topic,
                    echo,
                    bootstrap_servers=bootstrap_servers,
                    group_id=f"{topic}-responder",
                    ready=ready,
                    max_concurrency=1000,
                )
            )
        )
    try:
        for ready in readies:
            await ready.wait()

        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        await _serve_until_stopped(stop())
    finally:
        for task in tasks:
            task.cancel()


async def _serve_until_stopped(stopping: Awaitable[Any]) -> None:
    """Say `ready`, wait for SIGTERM or SIGINT, then run `stopping`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await stopping


def main() -> None:
    parser = argparse.ArgumentParser(description="a reference server of loadtest/bench.py")
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("grpc", "rest"):
        server = sub.add_parser(kind)
        server.add_argument("--host", default="127.0.0.1")
        server.add_argument("--port", type=int, required=True)
    responder = sub.add_parser("responder")
    responder.add_argument("--bootstrap-servers", required=True)
    responder.add_argument("--topic", action="append", required=True)
    args = parser.parse_args()
    if args.kind == "grpc":
        asyncio.run(serve_grpc(args.host, args.port))
    elif args.kind == "rest":
        asyncio.run(serve_rest(args.host, args.port))
    else:
        asyncio.run(serve_responder(args.bootstrap_servers, args.topic))


if __name__ == "__main__":
    main()
