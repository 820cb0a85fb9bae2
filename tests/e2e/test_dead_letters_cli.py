"""`kpg dlt ...` as an operator runs it: a subprocess against a real `kpg serve`, on a DLT written with the
gateway's own headers. Replays are checked on Kafka with a plain consumer, not through the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import pytest
from confluent_kafka import Producer, TopicPartition
from kpg import GatewayClient
from kpg.v1 import dead_letters_pb2
from prometheus_client.parser import text_string_to_metric_families

from gateway.adapters.kafka import KafkaAdmin, TopicSpec
from gateway.devstack.processes import free_port
from gateway.domain.dead_letters import Failure, dlt_headers
from tests.conftest import Backends
from tests.support import GatewayProcess, checking_consumer

pytestmark = pytest.mark.e2e

FAILED_AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SOURCE_PARTITIONS = 3
VALUE_ERRORS = 3  # offsets 0-2; then one KeyError (3) and one record with no details (4)


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self
        return json.loads(self.out)


async def kpg_dlt(gateway: GatewayProcess | str | None, *args: str, target_env: str = "") -> Run:
    """`python -m gateway dlt [--target <gateway>] ARGS` (with KPG_TARGET=`target_env`): exit code, output."""
    target = [] if gateway is None else ["--target", gateway if isinstance(gateway, str) else gateway.target]
    env = {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "KPG_TARGET")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "dlt",
        *target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "KPG_TARGET": target_env} if target_env else env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the rich tables in `text` (one line each), as lists of cells."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture
async def dlt(backends: Backends, unique: str) -> str:
    """`<unique>.orders.DLT`: five dead letters of `<unique>.orders` written as the gateway writes them
    (three ValueError, one KeyError), then one with no failure details (nowhere to replay it to)."""
    source = f"{unique}.orders"
    await KafkaAdmin(backends.kafka()).ensure_topics(
        [TopicSpec(source, SOURCE_PARTITIONS), TopicSpec(f"{source}.DLT", 1)]
    )
    producer = Producer({"bootstrap.servers": backends.bootstrap_servers})
    for i in range(4):
        error_class = "ValueError" if i < VALUE_ERRORS else "KeyError"
        failure = Failure(
            source, i % SOURCE_PARTITIONS, 10 + i, None, "kpg-rm-cli", error_class, f"bad order {i}",
            f"Traceback (most recent call last):\n  line {i}", 3, FAILED_AT,
        )  # fmt: skip
        headers = dlt_headers([("x-trace", b"t-%d" % i), ("x-bin", b"\x00\xff")], failure)
        producer.produce(f"{source}.DLT", b'{"order": %d}' % i, key=b"k-%d" % i, headers=list(headers))
    producer.produce(f"{source}.DLT", b"\x80\x81 raw", key=b"u", headers=[("x-custom", b"1")])
    assert producer.flush(10) == 0
    return f"{source}.DLT"


def ids_of(dlt: str, *offsets: int) -> list[str]:
    return [f"{dlt}:0:{offset}" for offset in offsets]


async def listed(gateway: GatewayProcess, dlt: str, *args: str) -> list[str]:
    """The ids `kpg dlt list --all ARGS` prints."""
    answer = (await kpg_dlt(gateway, "--json", "list", dlt, "--all", *args)).json()
    return [letter["id"] for letter in answer.get("deadLetters", [])]


async def states(gateway: GatewayProcess, dlt: str) -> dict[str, str]:
    """Each dead letter's state, asked through the client rather than the CLI under test."""
    async with GatewayClient(gateway.target) as kpg:
        page = await kpg.dead_letters.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest(dlt_topic=dlt))
    return {
        d.id: dead_letters_pb2.DeadLetterState.Name(d.state).removeprefix("DEAD_LETTER_STATE_")
        for d in page.dead_letters
    }


async def reprocess_calls(gateway: GatewayProcess) -> float:
    """How many Reprocess calls the gateway has answered OK (its /metrics), to see the CLI's batches."""
    async with httpx.AsyncClient(base_url=gateway.rest_url) as http:
        text = (await http.get("/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "kpg_requests_total"
        and sample.labels == {"code": "OK", "rpc": "DeadLetters.Reprocess", "transport": "grpc"}
    )


def replays_on(backends: Backends, topic: str, expected: int) -> list[tuple[bytes, dict[str, bytes]]]:
    """(key, headers) of every record on `topic`, read until `expected` are there and one second more (so a
    surplus is seen too)."""
    consumer = checking_consumer(backends.bootstrap_servers)
    consumer.subscribe([topic])
    found: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + 30
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline and (quiet_until is None or time.monotonic() < quiet_until):
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            raw = cast("list[tuple[str, bytes | None]]", message.headers() or [])
            found.append((message.key() or b"", {name: value or b"" for name, value in raw}))
            if len(found) >= expected and quiet_until is None:
                quiet_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return found


def records_on(backends: Backends, topic: str) -> int:
    """How many offsets `topic` has used (records and transaction markers): 0 if nothing was ever sent."""
    consumer = checking_consumer(backends.bootstrap_servers)
    try:
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(SOURCE_PARTITIONS)
        )
    finally:
        consumer.close()


# --- Reading -------------------------------------------------------------------------------------------


async def test_topics_lists_the_dlt_with_its_record_count(gateway: GatewayProcess, dlt: str) -> None:
    answer = (await kpg_dlt(gateway, "--json", "topics")).json()
    (ours,) = [topic for topic in answer["topics"] if topic["topic"] == dlt]
    assert (ours["partitions"], int(ours["recordCount"])) == (1, 5)

    table = await kpg_dlt(gateway, "topics")
    assert table.code == 0, table
    assert [dlt, "1", "5"] in table_rows(table.out)


async def test_list_pages_filters_and_prints_a_table(gateway: GatewayProcess, dlt: str) -> None:
    assert await listed(gateway, dlt) == ids_of(dlt, 0, 1, 2, 3, 4)
    assert await listed(gateway, dlt, "--error-class", "KeyError") == ids_of(dlt, 3)
    assert await listed(gateway, dlt, "--key", "k-1") == ids_of(dlt, 1)
    assert await listed(gateway, dlt, "--until", "2026-12-04T12:00:00Z") == []
    window = ["--since", "2026-12-04T13:00:00+01:00", "--until", "2026-12-04T12:00:00.001Z"]
    assert await listed(gateway, dlt, *window) == ids_of(dlt, 0, 1, 2, 3)

    first = (await kpg_dlt(gateway, "--json", "list", dlt, "--limit", "2")).json()
    assert [letter["id"] for letter in first["deadLetters"]] == ids_of(dlt, 0, 1)
    assert first["deadLetters"][0]["state"] == "DEAD_LETTER_STATE_NEW"

    table = await kpg_dlt(gateway, "list", dlt, "--limit", "3")
    assert table.code == 0, table
    rows = table_rows(table.out)
    assert [row[0] for row in rows] == ids_of(dlt, 0, 1, 2)
    assert rows[1][:6] == [
        f"{dlt}:0:1",
        "NEW",
        "KPG",
        f"{dlt.removesuffix('.DLT')}[1]@11",
        "ValueError",
        "bad order 1",
    ]
    assert rows[1][6:] == ["0", "2026-12-04T12:00:00Z"]
    (token_line,) = [line for line in table.out.splitlines() if line.startswith("next page: --page-token ")]
    token = token_line.removeprefix("next page: --page-token ")
    rest = (await kpg_dlt(gateway, "--json", "list", dlt, "--limit", "3", "--page-token", token)).json()
    assert [letter["id"] for letter in rest["deadLetters"]] == ids_of(dlt, 3, 4)
    assert "nextPageToken" not in rest or rest["nextPageToken"] == ""


async def test_show_prints_the_failure_headers_payload_and_stack_trace(
    gateway: GatewayProcess, dlt: str
) -> None:
    shown = await kpg_dlt(gateway, "show", f"{dlt}:0:1")
    assert shown.code == 0, shown
    fields = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in shown.out.splitlines()[:12]}
    assert fields["id"] == f"{dlt}:0:1" and fields["state"] == "NEW" and fields["key"] == "k-1"
    assert fields["error class"] == "ValueError" and fields["error message"] == "bad order 1"
    assert fields["consumer group"] == "kpg-rm-cli" and fields["attempts"] == "3"
    headers = {row[0]: row[1] for row in table_rows(shown.out)}
    assert headers["x-trace"] == "t-1" and headers["x-bin"] == "0x00ff"
    assert headers["kpg-dlt-error-message"] == "bad order 1"
    assert '{"order": 1}' in shown.out
    assert "Traceback (most recent call last):\n  line 1" in shown.out

    raw = await kpg_dlt(gateway, "show", f"{dlt}:0:4")
    assert raw.code == 0, raw
    assert "payload (base64)\ngIEgcmF3\n" in raw.out  # b"\x80\x81 raw" is not UTF-8

    letter = (await kpg_dlt(gateway, "--json", "show", f"{dlt}:0:3")).json()
    assert (letter["id"], letter["errorClass"], letter["format"]) == (
        f"{dlt}:0:3",
        "KeyError",
        "DEAD_LETTER_FORMAT_KPG",
    )

    missing = await kpg_dlt(gateway, "show", f"{dlt}:0:99")
    assert missing.code == 1 and "error: NOT_FOUND:" in missing.err


# --- Reprocess and Discard -----------------------------------------------------------------------------


async def test_reprocess_by_filters_replays_each_match_once(
    backends: Backends, gateway: GatewayProcess, dlt: str
) -> None:
    source = dlt.removesuffix(".DLT")
    calls = await reprocess_calls(gateway)
    first = await kpg_dlt(gateway, "--json", "reprocess", dlt, "--error-class", "ValueError", "--batch", "2")
    assert first.json() == {"selected": 3, "reprocessed": 3, "skipped": 0, "failed": 0}
    assert "3 dead letters selected" in first.err
    assert await reprocess_calls(gateway) - calls == 2  # the 3 ids collected first, then sent 2 + 1

    # Run again: nothing NEW matches any more; asked for the reprocessed ones, they are skipped.
    again = await kpg_dlt(gateway, "--json", "reprocess", dlt, "--error-class", "ValueError")
    assert again.json() == {"selected": 0, "reprocessed": 0, "skipped": 0, "failed": 0}
    assert "nothing to reprocess" in again.err
    skipped = await kpg_dlt(
        gateway, "reprocess", dlt, "--error-class", "ValueError", "--state", "REPROCESSED"
    )
    assert skipped.code == 0, skipped
    assert table_rows(skipped.out) == [["3", "0", "3", "0"]]

    replays = await asyncio.to_thread(replays_on, backends, source, VALUE_ERRORS)
    assert sorted(key for key, _ in replays) == [b"k-0", b"k-1", b"k-2"]
    for key, headers in replays:
        offset = int(key.removeprefix(b"k-"))
        assert headers["kpg-replayed-from"] == f"{dlt}:0:{offset}".encode()
        assert headers["x-trace"] == b"t-%d" % offset
    assert list((await states(gateway, dlt)).values()) == ["REPROCESSED"] * 3 + ["NEW"] * 2


async def test_reprocess_everything_fails_for_a_record_with_nowhere_to_go(
    backends: Backends, gateway: GatewayProcess, dlt: str
) -> None:
    run = await kpg_dlt(gateway, "reprocess", dlt)
    assert run.code == 1, run
    assert table_rows(run.out) == [["5", "4", "0", "1"]]
    replays = await asyncio.to_thread(replays_on, backends, dlt.removesuffix(".DLT"), 4)
    assert sorted(key for key, _ in replays) == [b"k-0", b"k-1", b"k-2", b"k-3"]


async def test_reprocess_by_ids_in_batches(backends: Backends, gateway: GatewayProcess, dlt: str) -> None:
    chosen = ids_of(dlt, 0, 2, 3)
    calls = await reprocess_calls(gateway)
    run = await kpg_dlt(gateway, "--json", "reprocess", dlt, *(f"--id={i}" for i in chosen), "--batch", "2")
    assert run.json() == {"selected": 3, "reprocessed": 3, "skipped": 0, "failed": 0}
    assert await reprocess_calls(gateway) - calls == 2
    again = await kpg_dlt(gateway, "--json", "reprocess", dlt, "--id", chosen[0], "--id", chosen[1])
    assert again.json() == {"selected": 2, "reprocessed": 0, "skipped": 2, "failed": 0}
    forced = await kpg_dlt(gateway, "--json", "reprocess", dlt, "--id", chosen[0], "--force")
    assert forced.json() == {"selected": 1, "reprocessed": 1, "skipped": 0, "failed": 0}
    replays = await asyncio.to_thread(replays_on, backends, dlt.removesuffix(".DLT"), 4)
    assert sorted(key for key, _ in replays) == [b"k-0", b"k-0", b"k-2", b"k-3"]

    mixed = await kpg_dlt(gateway, "reprocess", dlt, "--id", chosen[0], "--error-class", "KeyError")
    assert mixed.code == 2 and "not both" in mixed.err


async def test_a_dry_run_changes_nothing(backends: Backends, gateway: GatewayProcess, dlt: str) -> None:
    dry = await kpg_dlt(gateway, "--json", "reprocess", dlt, "--dry-run", "--error-class", "ValueError")
    assert dry.json() == {"selected": 3, "reprocessed": 3, "skipped": 0, "failed": 0}
    table = await kpg_dlt(gateway, "reprocess", dlt, "--dry-run")
    assert table.code == 1, table  # the record with nowhere to go would fail
    assert f"{dlt} → original topics (dry run: nothing sent)" in table.out and table_rows(table.out) == [
        ["5", "4", "0", "1"]
    ]
    assert list((await states(gateway, dlt)).values()) == ["NEW"] * 5
    assert await asyncio.to_thread(records_on, backends, dlt.removesuffix(".DLT")) == 0


async def test_discard_needs_a_reason_and_stops_reprocessing(
    backends: Backends, gateway: GatewayProcess, dlt: str
) -> None:
    one = f"{dlt}:0:1"
    no_reason = await kpg_dlt(gateway, "discard", dlt, "--id", one)
    assert no_reason.code == 2 and "--reason" in no_reason.err
    assert set((await states(gateway, dlt)).values()) == {"NEW"}

    done = await kpg_dlt(gateway, "discard", dlt, "--id", one, "--reason", "bad data")
    assert done.code == 0, done
    assert done.out.strip() == "discarded 1"
    assert await listed(gateway, dlt, "--state", "DISCARDED") == [one]  # as the CLI lists it
    twice = await kpg_dlt(gateway, "--json", "discard", dlt, "--id", one, "--reason", "bad data")
    assert twice.json() == {"discarded": 0}

    run = await kpg_dlt(gateway, "--json", "reprocess", dlt, "--error-class", "ValueError")
    assert run.json() == {"selected": 2, "reprocessed": 2, "skipped": 0, "failed": 0}
    replays = await asyncio.to_thread(replays_on, backends, dlt.removesuffix(".DLT"), 2)
    assert sorted(key for key, _ in replays) == [b"k-0", b"k-2"]


# --- Errors --------------------------------------------------------------------------------------------


async def test_a_bad_dlt_name_is_an_invalid_argument(gateway: GatewayProcess, unique: str) -> None:
    for args in (["list", f"{unique}.orders"], ["reprocess", f"{unique}.orders"]):
        run = await kpg_dlt(gateway, *args)
        assert run.code == 1, run
        assert run.err.startswith("error: INVALID_ARGUMENT: "), run.err
        assert run.out == ""


async def test_an_unreachable_gateway_is_named(unique: str) -> None:
    target = f"127.0.0.1:{free_port()}"
    run = await kpg_dlt(target, "list", f"{unique}.orders.DLT")
    assert run.code == 1, run
    assert f"error: cannot reach the gateway at {target}" in run.err
    assert "Traceback" not in run.err

    from_env = await kpg_dlt(None, "topics", target_env=target)
    assert from_env.code == 1 and f"error: cannot reach the gateway at {target}" in from_env.err


async def test_the_target_can_come_from_the_environment(gateway: GatewayProcess, dlt: str) -> None:
    run = await kpg_dlt(None, "--json", "topics", target_env=gateway.target)
    assert dlt in [topic["topic"] for topic in run.json()["topics"]]
