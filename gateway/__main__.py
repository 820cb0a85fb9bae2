"""Composition root: settings -> adapters -> patterns -> servers, and one graceful stop.

Each pattern is one entry of the `patterns` list in `serve()` (its builder in gateway/patterns.py holds
its services, topics, start/stop, gRPC servicer and REST router); nothing else here names a pattern.

`kpg serve` (or `python -m gateway`) runs one asyncio process serving gRPC and REST; with `--workers N`
it runs a supervisor of N such processes on the same ports instead (gateway/workers.py). If Kafka or Redis
is not reachable it keeps serving NOT_SERVING and retries, rather than crashing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.definitions import Definitions, DefinitionsError, load_definitions
from gateway.observability import configure_logging, measure_gc_pauses, report_loop_stalls
from gateway.settings import Settings
from gateway.tasks import bounded, stop_task
from gateway.workers import (
    EXIT_BAD_CONFIG,
    EXIT_CANNOT_SERVE,
    Supervisor,
    die_with_parent,
    free_port,
    hold_ports,
)

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Siblings:
    """The workers of one `kpg serve --workers N`, as each of them is told by the supervisor."""

    count: int
    directory: Path  # their sockets (adapters/peers.py)


async def serve(
    settings: Settings,
    definitions: Definitions,
    *,
    worker: int | None = None,
    siblings: Siblings | None = None,
) -> None:
    """Run the gateway until SIGTERM or SIGINT, then stop gracefully. `worker`: this process's index under
    `kpg serve --workers` (it then shares its ports with the other workers); `siblings`: how many workers
    there are and the folder of their sockets (adapters/peers.py)."""
    # Imported here: `kpg dlt` and `kpg dev` need none of it, and start in a fraction of the time it takes.
    from gateway.adapters.kafka import AsyncProducer, KafkaAdmin, TopicSpec
    from gateway.adapters.peers import Peers, PeerServer, socket_path
    from gateway.adapters.redis import IdempotencyStore, RedisClient
    from gateway.adapters.sql import Database
    from gateway.patterns import (
        Context,
        dead_letters_pattern,
        event_store_pattern,
        grpc_bindings,
        peer_handlers,
        read_models_pattern,
        request_reply_pattern,
        rest_routers,
        sagas_pattern,
        start_patterns,
        stop_patterns,
    )
    from gateway.services.health import BackendMonitor
    from gateway.services.idempotency import Idempotency, IdempotencySettings
    from gateway.services.read_lag import ReadLag
    from gateway.transport.grpc import create_grpc_server
    from gateway.transport.rest import create_rest_app, create_rest_server

    gc_pauses = asyncio.create_task(measure_gc_pauses(), name="gc-pauses")
    producer = AsyncProducer(settings.kafka)
    admin = KafkaAdmin(settings.kafka)
    redis = RedisClient(settings.redis)
    database = Database(settings.database_url)
    idempotency = Idempotency(
        IdempotencyStore(redis),
        IdempotencySettings(settings.events.idempotency_ttl_ms, settings.events.idempotency_in_flight_ttl_ms),
    )
    peers = None
    if worker is not None and siblings is not None:
        peers = Peers(siblings.directory, worker, siblings.count)
    context = Context(
        settings=settings,
        definitions=definitions,
        producer=producer,
        admin=admin,
        redis=redis,
        database=database,
        idempotency=idempotency,
        read_lag=ReadLag(max_lag=settings.events.max_read_lag),
        peers=peers,
    )
    # One entry per pattern (see gateway/patterns.py); starts run in this order, stops in reverse.
    patterns = [
        event_store_pattern(context),
        read_models_pattern(context),
        request_reply_pattern(context),
        sagas_pattern(context),
        dead_letters_pattern(context),
    ]

    async def start_up() -> None:
        topics = definitions.topics_to_create(settings.kafka.default_partitions)
        # The definitions' topics first: a pattern's spec of the same name wins (the event store configures
        # its dead-letter topics).
        await start_patterns(
            patterns, admin=admin, topics=[TopicSpec(name, parts) for name, parts in topics.items()]
        )

    monitor = BackendMonitor(
        probes={
            "kafka": lambda: admin.ping(settings.health.check_timeout_s),
            "redis": redis.ping,
            "database": database.ping,
        },
        interval_s=settings.health.check_interval_s,
        timeout_s=settings.health.check_timeout_s,
        on_first_ready=start_up,
    )
    reuse_port = worker is not None
    grpc_server, grpc_port = await create_grpc_server(
        settings.grpc, bindings=grpc_bindings(patterns), monitor=monitor, reuse_port=reuse_port
    )
    rest_app = create_rest_app(
        monitor=monitor, routers=rest_routers(patterns), max_body_bytes=settings.rest.max_body_bytes
    )
    rest_server, rest_socket, rest_port = create_rest_server(settings.rest, rest_app, reuse_port=reuse_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    peer_server = None
    if peers is not None:
        peer_server = PeerServer(socket_path(peers.directory, peers.index), peer_handlers(patterns))
        await peer_server.start()
    # What the imports and the wiring allocated lives as long as the process: out of the collector's
    # sight, a full collection scans a fraction of the heap (they took 50-100 ms, a request-reply tail).
    gc.freeze()
    await grpc_server.start()
    rest_task = asyncio.create_task(rest_server.serve(sockets=[rest_socket]), name="rest")
    monitor.start()
    log.info(
        "gateway %sserving gRPC on %s:%d and REST on http://%s:%d",
        "" if worker is None else f"worker {worker} ",
        settings.grpc.host,
        grpc_port,
        settings.rest.host,
        rest_port,
        extra={
            "grpc_port": grpc_port,
            "rest_port": rest_port,
            "worker": worker,
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        },
    )
    stall_reporter = asyncio.create_task(
        report_loop_stalls(exit_s=settings.loop_stall_exit_s or None), name="loop-stall-reporter"
    )
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({stopped, rest_task}, return_when=asyncio.FIRST_COMPLETED)

    # Graceful stop: refuse new calls, let in-flight ones finish, then flush what was produced. Every step
    # is bounded, and a watchdog ends the process should anything still hang (a blocked driver thread).
    grace_s = settings.shutdown_grace_s
    _start_watchdog(grace_s + SHUTDOWN_SLACK_S)
    log.info("stopping: finishing in-flight calls (up to %.0fs)", grace_s)
    deadline = loop.time() + grace_s

    def left() -> float:
        return max(0.5, deadline - loop.time())

    await bounded(monitor.stop(), 2.0, what="stopping the health monitor")
    rest_server.should_exit = True
    await bounded(
        asyncio.gather(grpc_server.stop(grace_s), rest_task, return_exceptions=True),
        grace_s + 1.0,
        what="stopping the servers",
    )
    await stop_patterns(patterns, left=left)
    if peer_server is not None and peers is not None:  # after the patterns: forwarded appends finish
        await bounded(peer_server.close(), 3.0, what="closing the workers' socket")
        await bounded(peers.close(), 2.0, what="closing connections to the other workers")
    await bounded(producer.close(left()), left() + 1.0, what="flushing the producer")
    await bounded(redis.close(), 2.0, what="closing Redis")
    database.close()
    await stop_task(stall_reporter, 1.0)
    await stop_task(gc_pauses, 1.0)
    log.info("stopped")


# After SIGTERM the process ends within the grace period plus this, whatever still hangs.
SHUTDOWN_SLACK_S = 15.0


def _start_watchdog(timeout_s: float) -> None:
    def expire() -> None:
        log.error("shutdown did not finish within %.0fs; exiting now", timeout_s)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()


def _settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}

    def put(section: str, key: str, value: object) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("kafka", "bootstrap_servers", args.kafka_bootstrap_servers)
    put("redis", "url", args.redis_url)
    put("database", "url", args.database_url)
    put("grpc", "host", args.grpc_host)
    put("grpc", "port", args.grpc_port)
    put("rest", "host", args.rest_host)
    put("rest", "port", args.rest_port)
    for key in ("definitions", "state_dir", "log_level", "workers"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return Settings(**overrides)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--definitions", type=Path, help="definitions YAML file (KPG_DEFINITIONS)")
    parser.add_argument("--grpc-host", help="gRPC bind address (KPG_GRPC__HOST, default 127.0.0.1)")
    parser.add_argument(
        "--grpc-port", type=int, help="gRPC port, 0 = any free port (KPG_GRPC__PORT, default 50051)"
    )
    parser.add_argument("--rest-host", help="REST bind address (KPG_REST__HOST, default 127.0.0.1)")
    parser.add_argument(
        "--rest-port", type=int, help="REST port, 0 = any free port (KPG_REST__PORT, default 8080)"
    )
    parser.add_argument(
        "--kafka-bootstrap-servers", help="Kafka bootstrap servers (KPG_KAFKA__BOOTSTRAP_SERVERS)"
    )
    parser.add_argument("--redis-url", help="Redis URL (KPG_REDIS__URL)")
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL (KPG_DATABASE__URL; default SQLite in the state dir)"
    )
    parser.add_argument("--state-dir", type=Path, help="state folder (KPG_STATE_DIR, default .state)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="KPG_LOG_LEVEL")
    parser.add_argument(
        "--workers",
        type=int,
        help="gateway processes sharing the ports (KPG_WORKERS; default 0: one per core; 1: no supervisor)",
    )
    # Set by the supervisor (gateway/workers.py) for each worker.
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peers-dir", type=Path, help=argparse.SUPPRESS)


def run_on_loop(main: Coroutine[Any, Any, None], kind: str) -> None:
    """Run `main` to completion on a new event loop of `kind` ("uvloop" falls back to asyncio's own loop,
    with a warning, where uvloop is not installed)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: running on asyncio's own event loop")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from_args(args)
    except ValueError as exc:  # pydantic's ValidationError names the bad setting
        print(f"kpg serve: invalid settings: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    try:
        definitions = load_definitions(settings.definitions)
    except DefinitionsError as exc:
        log.error("invalid definitions: %s", exc)
        print(f"kpg serve: invalid definitions: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    workers = settings.workers or os.cpu_count() or 1
    if args.worker_index is None and workers > 1:
        return _supervise(args, settings, workers)
    if args.worker_index is not None:
        die_with_parent()
    siblings = None
    if args.worker_index is not None and args.peers_dir is not None and args.worker_count:
        siblings = Siblings(args.worker_count, args.peers_dir)
    try:
        run_on_loop(
            serve(settings, definitions, worker=args.worker_index, siblings=siblings), settings.event_loop
        )
    except DefinitionsError as exc:  # a Python handler that cannot be imported
        log.error("invalid definitions: %s", exc)
        print(f"kpg serve: invalid definitions: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except OSError as exc:
        print(f"kpg serve: {exc}", file=sys.stderr)
        return 1 if args.worker_index is None else EXIT_CANNOT_SERVE
    return 0


def _supervise(args: argparse.Namespace, settings: Settings, workers: int) -> int:
    """Run `workers` gateway processes on the same ports (a port 0 is chosen here, once for all)."""
    grpc_port = settings.grpc.port or free_port(settings.grpc.host)
    rest_port = settings.rest.port or free_port(settings.rest.host)
    try:
        locks = hold_ports([("gRPC", settings.grpc.host, grpc_port), ("REST", settings.rest.host, rest_port)])
    except OSError as exc:
        print(f"kpg serve: {exc}", file=sys.stderr)
        return 1
    worker_args = [*args.argv, "--grpc-port", str(grpc_port), "--rest-port", str(rest_port)]
    log.info("supervising %d workers on gRPC port %d and REST port %d", workers, grpc_port, rest_port)
    stop_within_s = settings.shutdown_grace_s + SHUTDOWN_SLACK_S + 5.0
    try:
        return Supervisor(worker_args, workers, stop_within_s=stop_within_s).run()
    finally:
        for fd in locks:
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.cli.dead_letters import add_dlt_commands
    from gateway.devstack.cli import add_dev_commands

    parser = argparse.ArgumentParser(prog="kpg", description="Kafka Pattern Gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the gateway (gRPC + REST)")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(func=run_serve)
    add_dev_commands(commands)
    add_dlt_commands(commands)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
