"""`make loadtest`: locust against the gateway, headless for a bounded time, then a summary of what it saw.

    make loadtest                                          # 60 s, 20 users, every pattern, on the dev stack
    make loadtest LOADTEST_ARGS="--tags sagas --duration 30"
    .venv/bin/python loadtest/run_locust.py --users 20 --duration 60 [--tags append grpc] [--exclude-tags ...]

Without KPG_TARGET it starts what the scenarios of loadtest/locustfile.py need, on the Kafka and Redis
named by KPG_KAFKA__BOOTSTRAP_SERVERS and KPG_REDIS__URL (`eval "$(kpg dev env)"`), and stops it at the end:
- the gateway, `kpg serve --definitions` with examples/definitions.yaml whose topics are moved under a fresh
  prefix (`--topic-prefix`, default `loadtest-<8 hex>.`), on free ports, with a fresh SQLite database in its
  own state folder and reply topics and groups of its own (other gateways may share this Kafka and Redis);
- the saga participants (`examples/participants.py all --topic-prefix`) and the inventory responder
  (examples/inventory_responder.py's handler, on the prefixed `inventory.requests`), each its own process;
- 200 dead letters in the gateway's format on `<prefix>orders.events.DLT`, for the dead-letter users.
The run's topics are deleted at the end (`--keep-topics` keeps them); the logs stay in `<run>-stack/`.

With KPG_TARGET (gRPC host:port) it starts nothing and loads that gateway (REST at KPG_REST_URL, else port
8080 of the same host); the participants, the responder and the dead-letter topic are then yours
(`--topic-prefix` names their topics; default none: examples/definitions.yaml's, as `make up` serves them).

Locust runs as a subprocess: `locust -f loadtest/locustfile.py --headless -u USERS -r RATE -t DURATION --host
REST_URL --csv OUT/<run> --html OUT/<run>.html [--tags ...] [--exclude-tags ...]`, with its log in
OUT/<run>.log (OUT: --out-dir, default .state/loadtest; <run>: --name, default the time and the tags). Then
the summary, from locust's `<run>_stats.csv`: per request, grouped by pattern, the requests, failures,
median, p95 and p99 (ms) and requests per second; then the failures (`<run>_failures.csv`). Exits 1 when a
request failed, locust failed or nothing was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from kpg.v1 import dead_letters_pb2 as dl
from kpg.v1 import dead_letters_pb2_grpc as dl_grpc

from gateway.domain.dead_letters import Failure, dlt_headers
from gateway.settings import HealthSettings
from loadtest.support import ReadyProcess, create_topics, delete_topics, stop_gateway
from tests.support import SERVING, GatewayProcess, wait_for_health

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
EXAMPLE_DEFINITIONS = REPO / "examples" / "definitions.yaml"
REQUEST_TOPIC = "inventory.requests"
DLT_TOPIC = "orders.events.DLT"
DEAD_LETTERS = 200
STACK_TRACE = "Traceback (most recent call last):\n  File \"projector.py\", line 42\nKeyError: 'total'\n"

# The pattern of each row of the report: by its gRPC service, its REST route, or its type.
PATTERNS: dict[str, tuple[str, ...]] = {
    "append": ("EventStore", "/v1/streams/"),
    "read-models": ("ReadModels", "/v1/read-models"),
    "request-reply": ("RequestReply", "/v1/requests/", "/v1/replies/"),
    "sagas": ("Sagas", "/v1/sagas", "saga"),
    "dead-letters": ("DeadLetters", "/v1/dead-letters"),
}


def pattern_of(request_type: str, name: str) -> str:
    for pattern, marks in PATTERNS.items():
        if request_type in marks or name.startswith(marks):
            return pattern
    return "other"


# --- what the scenarios need, when no KPG_TARGET is given ---------------------------------------------------


def prefixed_definitions(prefix: str) -> dict[str, Any]:
    """examples/definitions.yaml with every topic it names under `prefix`."""
    definitions: dict[str, Any] = yaml.safe_load(EXAMPLE_DEFINITIONS.read_text())
    for name, category in definitions.get("categories", {}).items():
        category["topic"] = prefix + category.get("topic", f"{name}.events")
    for saga in definitions.get("sagas", {}).values():
        for step in saga["steps"]:
            step["topic"] = prefix + step["topic"]
    request_reply = definitions.get("request_reply", {})
    request_reply["topics"] = [prefix + t for t in request_reply.get("topics", [])]
    return definitions


# examples/inventory_responder.py's handler (the file is read, not run as __main__) on the prefixed topic.
_RESPONDER = textwrap.dedent(
    """
    import asyncio, runpy, sys
    from kpg.responder import serve_requests

    handler = runpy.run_path(sys.argv[1])["availability"]

    async def main(topic, bootstrap_servers):
        ready = asyncio.Event()
        task = asyncio.create_task(
            serve_requests(topic, handler, bootstrap_servers=bootstrap_servers, ready=ready)
        )
        await ready.wait()
        print("ready", flush=True)
        await task

    asyncio.run(main(sys.argv[2], sys.argv[3]))
    """
)


def seed_dead_letters(bootstrap_servers: str, topic: str, original_topic: str, count: int) -> None:
    """`count` dead letters as the gateway writes them (a failed OrderPlaced with its `kpg-dlt-*` headers)."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "enable.idempotence": True})
    now = datetime.now(UTC)
    for n in range(count):
        partition = n % 3
        failure = Failure(
            topic=original_topic,
            partition=partition,
            offset=n // 3,
            timestamp_ms=int(now.timestamp() * 1000) - 60_000,
            consumer_group="loadtest-projector",
            error_class="builtins.KeyError" if n % 10 else "builtins.ValueError",
            error_message=f"order-{n}: 'total'",
            stack_trace=STACK_TRACE,
            attempts=3,
            failed_at=now,
        )
        original = [("content-type", b"application/json"), ("ce_type", b"OrderPlaced")]
        headers: list[tuple[str, str | bytes | None]] = list(dlt_headers(original, failure))
        value = json.dumps({"customer": f"customer-{n % 17}", "items": n % 5}).encode()
        producer.produce(topic, value, f"order-{n}".encode(), partition=partition, headers=headers)
    if producer.flush(30):
        raise RuntimeError(f"could not write the dead letters to {topic}")


class Stack:
    """The gateway, the participants, the responder and a dead-letter topic, for one run (see the module's
    docstring); every topic under `prefix`."""

    def __init__(self, *, bootstrap_servers: str, redis_url: str, prefix: str, workdir: Path) -> None:
        self.bootstrap_servers, self.redis_url, self.prefix, self.workdir = (
            bootstrap_servers,
            redis_url,
            prefix,
            workdir,
        )
        workdir.mkdir(parents=True, exist_ok=True)
        definitions = workdir / "definitions.yaml"
        definitions.write_text(json.dumps(prefixed_definitions(prefix), indent=2))  # JSON is YAML
        self.gateway = GatewayProcess(
            workdir,
            env={
                "KPG_KAFKA__BOOTSTRAP_SERVERS": bootstrap_servers,
                "KPG_REDIS__URL": redis_url,
                "KPG_DATABASE__URL": "",  # SQLite in the state folder, whatever the environment says
                "KPG_SAGAS__REPLY_TOPIC": f"{prefix}kpg.sagas.replies",
                "KPG_SAGAS__REPLY_GROUP": f"{prefix}kpg-sagas",
                "KPG_REQUEST_REPLY__REPLY_TOPIC": f"{prefix}kpg.replies",
                "KPG_REQUEST_REPLY__REPLY_GROUP": f"{prefix}kpg-replies",
                # GatewayProcess checks health every 0.2 s for tests; the default is what a user runs.
                "KPG_HEALTH__CHECK_INTERVAL_S": str(HealthSettings().check_interval_s),
            },
            args=["--definitions", str(definitions)],
        )
        python = sys.executable
        self.participants = ReadyProcess(
            "participants",
            [
                python,
                str(REPO / "examples" / "participants.py"),
                "all",
                *("--topic-prefix", prefix, "--bootstrap-servers", bootstrap_servers),
            ],
            log_path=workdir / "participants.log",
            cwd=REPO,
        )
        self.responder = ReadyProcess(
            "responder",
            [
                python,
                *("-c", _RESPONDER, str(REPO / "examples" / "inventory_responder.py")),
                *(self.request_topic, bootstrap_servers),
            ],
            log_path=workdir / "responder.log",
            cwd=REPO,
        )

    @property
    def request_topic(self) -> str:
        return self.prefix + REQUEST_TOPIC

    @property
    def dlt_topic(self) -> str:
        return self.prefix + DLT_TOPIC

    def start(self) -> Stack:
        create_topics(self.bootstrap_servers, {self.request_topic: (3, {}), self.dlt_topic: (3, {})})
        seed_dead_letters(
            self.bootstrap_servers, self.dlt_topic, self.dlt_topic.removesuffix(".DLT"), DEAD_LETTERS
        )
        self.participants.start()
        self.responder.start()
        self.gateway.start()
        asyncio.run(wait_for_health(self.gateway.target, SERVING, timeout_s=120, process=self.gateway))
        self.participants.wait_ready(90)
        self.responder.wait_ready(90)
        return self

    def stop(self, *, keep_topics: bool = False) -> None:
        self.responder.stop()
        self.participants.stop()
        stop_gateway(self.gateway)
        shutil.rmtree(self.workdir / "state", ignore_errors=True)  # the SQLite database; the logs stay
        if not keep_topics and self.prefix:
            admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
            topics = admin.list_topics(timeout=30).topics
            delete_topics(self.bootstrap_servers, sorted(t for t in topics if t.startswith(self.prefix)))


def has_dead_letter_topic(target: str, topic: str) -> bool:
    """Whether the gateway at `target` knows `topic` (ListDeadLetters answers rather than NOT_FOUND)."""
    with grpc.insecure_channel(target) as channel:
        request = dl.ListDeadLettersRequest(dlt_topic=topic, limit=1)
        try:
            dl_grpc.DeadLettersStub(channel).ListDeadLetters(request, timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
    return True


# --- locust, and its report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    type: str
    name: str
    requests: int
    failures: int
    median_ms: str
    p95_ms: str
    p99_ms: str
    rps: float

    @property
    def pattern(self) -> str:
        return pattern_of(self.type, self.name)


def _ms(text: str) -> str:
    """Locust writes a time as it measured it when it has one sample: whole milliseconds here."""
    try:
        return f"{float(text):.0f}"
    except ValueError:
        return text  # N/A


def read_stats(csv_prefix: Path) -> tuple[list[Row], Row | None]:
    """The rows of locust's `<prefix>_stats.csv`, and its Aggregated row."""
    rows, total = [], None
    with Path(f"{csv_prefix}_stats.csv").open(newline="") as stats:
        for line in csv.DictReader(stats):
            row = Row(
                type=line["Type"],
                name=line["Name"],
                requests=int(line["Request Count"]),
                failures=int(line["Failure Count"]),
                median_ms=_ms(line["Median Response Time"]),
                p95_ms=_ms(line["95%"]),
                p99_ms=_ms(line["99%"]),
                rps=float(line["Requests/s"] or 0),
            )
            if row.name == "Aggregated":
                total = row
            else:
                rows.append(row)
    order = [*PATTERNS, "other"]
    rows.sort(key=lambda r: (order.index(r.pattern), r.type != "grpc", r.type in {"check", "saga"}, r.name))
    return rows, total


def read_failures(csv_prefix: Path) -> list[dict[str, str]]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.exists():
        return []
    with path.open(newline="") as failures:
        return list(csv.DictReader(failures))


def summary(rows: list[Row], total: Row | None, failures: list[dict[str, str]]) -> str:
    header = ("pattern", "type", "name", "requests", "fails", "median", "p95", "p99", "req/s")
    table = [header] + [
        (
            r.pattern,
            r.type,
            r.name,
            str(r.requests),
            str(r.failures),
            r.median_ms,
            r.p95_ms,
            r.p99_ms,
            f"{r.rps:.1f}",
        )
        for r in [*rows, *([total] if total else [])]
    ]
    if total is not None:
        table[-1] = ("total", "", "", *table[-1][3:])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    if total is not None:
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append("(times in ms)")
    for failure in failures[:20]:
        what = f"{failure['Method']} {failure['Name']}: {failure['Error'][:300]}"
        lines.append(f"failed {failure['Occurrences']}x: {what}")
    if len(failures) > 20:
        lines.append(f"... and {len(failures) - 20} other failures")
    return "\n".join(lines)


def run_locust(
    args: argparse.Namespace, *, target: str, rest_url: str, env: dict[str, str], name: str
) -> int:
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{math.ceil(args.duration)}s",
        "--stop-timeout",
        "10",
        "--host",
        rest_url,
        "--csv",
        str(out / name),
        "--html",
        str(out / f"{name}.html"),
        "--only-summary",
    ]
    if args.tags:
        command += ["--tags", *args.tags]
    if args.exclude_tags:
        command += ["--exclude-tags", *args.exclude_tags]
    log_path = out / f"{name}.log"
    print(
        f"locust: {args.users} users for {math.ceil(args.duration)} s, tags {' '.join(args.tags or ['all'])}"
        + (f", excluding {' '.join(args.exclude_tags)}" if args.exclude_tags else "")
        + f"; gRPC {target}, REST {rest_url}; log {log_path}",
        file=sys.stderr,
        flush=True,
    )
    with log_path.open("wb") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO, check=False
        ).returncode
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", "-u", type=int, default=20, help="locust users (default 20)")
    parser.add_argument("--spawn-rate", "-r", type=float, default=10, help="users started per second")
    parser.add_argument("--duration", "-t", type=float, default=60, help="seconds of load (default 60)")
    parser.add_argument("--tags", nargs="+", metavar="TAG", help="only these scenarios (locust --tags)")
    parser.add_argument("--exclude-tags", nargs="+", metavar="TAG", help="not these (locust --exclude-tags)")
    parser.add_argument("--out-dir", type=Path, default=REPO / ".state" / "loadtest")
    parser.add_argument("--name", help="the run's name: its files are OUT_DIR/NAME* (default: time and tags)")
    parser.add_argument("--topic-prefix", help="default: a fresh one when starting the gateway, else none")
    parser.add_argument("--keep-topics", action="store_true", help="do not delete the run's topics")
    parser.add_argument(
        "--bootstrap-servers", default=os.environ.get("KPG_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    parser.add_argument("--redis-url", default=os.environ.get("KPG_REDIS__URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)
    known = {*PATTERNS, "grpc", "rest"}
    for tag in [*(args.tags or []), *(args.exclude_tags or [])]:
        if tag not in known:
            parser.error(f"unknown tag {tag!r}: the locustfile's are {', '.join(sorted(known))}")

    name = args.name or "-".join(
        [
            datetime.now().strftime("%Y%m%d-%H%M%S"),
            *(args.tags or []),
            *(f"no-{t}" for t in args.exclude_tags or []),
        ]
    )
    target = os.environ.get("KPG_TARGET", "")
    stack: Stack | None = None
    where = f"gateway {target} (KPG_TARGET)"
    if target:
        rest_url = os.environ.get("KPG_REST_URL") or f"http://{urlsplit(f'//{target}').hostname}:8080"
        prefix = args.topic_prefix or ""
    else:
        prefix = f"loadtest-{uuid.uuid4().hex[:8]}." if args.topic_prefix is None else args.topic_prefix
        stack = Stack(
            bootstrap_servers=args.bootstrap_servers,
            redis_url=args.redis_url,
            prefix=prefix,
            workdir=args.out_dir / f"{name}-stack",
        )
        print(
            f"starting the gateway, participants and responder on {args.bootstrap_servers} "
            f"(topics {prefix}*; logs {stack.workdir})",
            file=sys.stderr,
            flush=True,
        )
    try:
        if stack is not None:
            stack.start()
            target, rest_url = stack.gateway.target, stack.gateway.rest_url
            where = f"gateway started on {target} ({args.bootstrap_servers}, topics {prefix}*)"
        dlt_topic = prefix + DLT_TOPIC
        if stack is None and not has_dead_letter_topic(target, dlt_topic):
            print(f"no {dlt_topic} on that gateway: the dead-letter users only list topics", file=sys.stderr)
            dlt_topic = ""
        env = {
            "KPG_TARGET": target,
            "KPG_REST_URL": rest_url,
            "KPG_LOADTEST_REQUEST_TOPIC": prefix + REQUEST_TOPIC,
            "KPG_LOADTEST_DLT_TOPIC": dlt_topic,
        }
        started = time.monotonic()
        code = run_locust(args, target=target, rest_url=rest_url, env=env, name=name)
        elapsed = time.monotonic() - started
    finally:
        if stack is not None:
            stack.stop(keep_topics=args.keep_topics)

    csv_prefix = args.out_dir / name
    if not Path(f"{csv_prefix}_stats.csv").exists():
        log = (args.out_dir / f"{name}.log").read_text(errors="replace")
        print(f"locust exited with {code} and wrote no statistics:\n{log[-4000:]}", file=sys.stderr)
        return code or 1
    rows, total = read_stats(csv_prefix)
    print(
        f"\nloadtest {name}: {args.users} users, {math.ceil(args.duration)} s "
        f"(the locust process took {elapsed:.0f} s), tags {' '.join(args.tags or ['all'])}"
        + (f" excluding {' '.join(args.exclude_tags)}" if args.exclude_tags else "")
        + f"; {where}"
    )
    print(summary(rows, total, read_failures(csv_prefix)))
    print(
        f"reports: {csv_prefix}.html, {csv_prefix}_stats.csv (+ _stats_history, _failures, _exceptions), "
        f"locust log {csv_prefix}.log"
    )
    if total is None or total.requests == 0:
        print("no requests were sent", file=sys.stderr)
        return 1
    if total.failures or code:
        print(f"{total.failures} failed requests; locust exited with {code}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
