"""kpg.participant and examples/participants.py against the real broker, the test playing the orchestrator:
it sends saga commands as the wire format says (../shared/API.md, "Saga commands") and reads the replies."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition
from kpg.participant import MemoryDedupe, Participant, SagaCommand, SqliteDedupe, StepFailed

from gateway.adapters.kafka import KafkaAdmin, TopicSpec
from tests.conftest import Backends
from tests.support import checking_consumer, eventually

pytestmark = pytest.mark.integration

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True)
class Reply:
    key: bytes | None
    headers: dict[str, bytes]
    value: bytes

    @property
    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.value)
        return body

    @property
    def message_id(self) -> str:
        return self.headers["kpg-message-id"].decode()


class Orchestrator:
    """Plays the gateway: sends commands to `commands` with the wire format's headers, reads `replies`
    (one partition, so replies are read in the order they were written), and runs participants."""

    def __init__(self, backends: Backends, *, commands: str, replies: str) -> None:
        self.bootstrap_servers = backends.bootstrap_servers
        self.commands = commands
        self.replies = replies
        self._producer = Producer({"bootstrap.servers": self.bootstrap_servers, "linger.ms": 0})
        self._reader = checking_consumer(self.bootstrap_servers)
        self._reader.assign([TopicPartition(replies, 0, OFFSET_BEGINNING)])
        self._running: list[asyncio.Task[None]] = []

    async def send(
        self,
        command: str,
        *,
        message_id: str,
        saga_id: str = "saga-1",
        step: str = "reserve_stock",
        kind: str = "command",
        input: Mapping[str, Any] | None = None,
        results: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        topic: str | None = None,
        copies: int = 1,
    ) -> None:
        value = {
            "saga_id": saga_id,
            "saga_type": "place_order",
            "step": step,
            "command": command,
            "kind": kind,
            "input": dict(input or {}),
            "results": dict(results or {}),
        }
        headers: Headers = [
            ("kpg-message-type", command),
            ("kpg-saga-id", saga_id),
            ("kpg-saga-type", "place_order"),
            ("kpg-saga-step", step),
            ("kpg-message-id", message_id),
            ("kpg-correlation-id", correlation_id or f"corr-{message_id}"),
            ("kpg-reply-topic", self.replies),
            ("content-type", "application/json"),
        ]
        for _ in range(copies):
            await self.send_raw(json.dumps(value).encode(), headers, key=saga_id.encode(), topic=topic)

    async def send_raw(
        self, value: bytes, headers: Headers, *, key: bytes = b"saga-1", topic: str | None = None
    ) -> None:
        self._producer.produce(topic or self.commands, value, key=key, headers=headers)
        assert await asyncio.to_thread(self._producer.flush, 10) == 0

    async def read(self, count: int, timeout_s: float = 20) -> list[Reply]:
        """The next `count` replies."""
        replies: list[Reply] = []
        async with asyncio.timeout(timeout_s):
            while len(replies) < count:
                for message in await asyncio.to_thread(self._reader.consume, count - len(replies), 0.2):
                    assert message.error() is None, message.error()
                    raw = cast("list[tuple[str, bytes | None]]", message.headers() or [])
                    headers = {name: value or b"" for name, value in raw}
                    replies.append(Reply(message.key(), headers, message.value() or b""))
        return replies

    async def read_until(self, message_id: str, timeout_s: float = 20) -> list[Reply]:
        """The next replies, up to and including the first one for `message_id`."""
        replies: list[Reply] = []
        while not replies or replies[-1].message_id != message_id:
            replies += await self.read(1, timeout_s)
        return replies

    async def start(
        self, participant: Participant, on_receive: Callable[[SagaCommand], object] | None = None
    ) -> asyncio.Task[None]:
        ready = asyncio.Event()
        task = asyncio.create_task(participant.run(ready, on_receive))
        self._running.append(task)
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([task, waiter], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raises why it ended
        assert ready.is_set(), "participant got no partitions within 30 s"
        return task

    async def stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()  # run() ends by its cancellation, never by swallowing it

    async def close(self) -> None:
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        await asyncio.to_thread(self._reader.close)


@pytest.fixture
async def orchestrator(backends: Backends, unique: str) -> AsyncIterator[Orchestrator]:
    commands, replies = f"it.saga.{unique}.commands", f"it.saga.{unique}.replies"
    await KafkaAdmin(backends.kafka()).ensure_topics([TopicSpec(commands, 1), TopicSpec(replies, 1)])
    orchestrator = Orchestrator(backends, commands=commands, replies=replies)
    try:
        yield orchestrator
    finally:
        await orchestrator.close()


class Inventory:
    """A participant whose handlers count their runs (by message id) across restarts."""

    def __init__(self) -> None:
        self.executed: list[str] = []
        self.received: list[str] = []
        self.seen: list[SagaCommand] = []
        self.delay_s = 0.0

    def participant(self, orchestrator: Orchestrator, **options: Any) -> Participant:
        participant = Participant(
            orchestrator.commands, bootstrap_servers=orchestrator.bootstrap_servers, **options
        )

        @participant.handler("ReserveStock")
        async def reserve(command: SagaCommand) -> Mapping[str, Any]:
            self.executed.append(command.message_id)
            self.seen.append(command)
            await asyncio.sleep(self.delay_s)
            if command.input.get("sku") == "OUT-OF-STOCK":
                raise StepFailed("out of stock: OUT-OF-STOCK")
            return {"reservation_id": f"r-{command.message_id}", "sku": command.input.get("sku")}

        @participant.handler("ReleaseStock")
        async def release(command: SagaCommand) -> None:
            self.executed.append(command.message_id)

        @participant.handler("Explode")
        async def explode(command: SagaCommand) -> None:
            self.executed.append(command.message_id)
            raise ValueError("the warehouse is on fire")

        return participant

    def on_receive(self, command: SagaCommand) -> None:
        self.received.append(command.message_id)


async def test_ok_reply_carries_the_data_and_echoes_the_headers(orchestrator: Orchestrator) -> None:
    inventory = Inventory()
    await orchestrator.start(inventory.participant(orchestrator))
    await orchestrator.send(
        "ReserveStock",
        message_id="m-1",
        saga_id="saga-42",
        input={"sku": "apple", "quantity": 2},
        results={"earlier": {"x": 1}},
        correlation_id="corr-42",
    )
    await orchestrator.send("ReleaseStock", message_id="m-2", saga_id="saga-42", kind="compensation")

    replies = {r.message_id: r for r in await orchestrator.read(2)}  # one batch: in no particular order
    first, second = replies["m-1"], replies["m-2"]
    assert first.body == {"ok": True, "data": {"reservation_id": "r-m-1", "sku": "apple"}}
    assert first.key == b"saga-42"
    assert first.headers == {
        "kpg-correlation-id": b"corr-42",
        "kpg-message-id": b"m-1",
        "kpg-saga-id": b"saga-42",
        "content-type": b"application/json",
    }
    assert second.body == {"ok": True, "data": {}}  # the handler returned None
    [command] = inventory.seen
    assert (command.saga_id, command.saga_type, command.step, command.command, command.kind) == (
        "saga-42",
        "place_order",
        "reserve_stock",
        "ReserveStock",
        "command",
    )
    assert command.input == {"sku": "apple", "quantity": 2}
    assert command.results == {"earlier": {"x": 1}}
    assert (command.message_id, command.correlation_id) == ("m-1", "corr-42")
    assert (command.reply_topic, command.topic, command.partition) == (
        orchestrator.replies,
        orchestrator.commands,
        0,
    )


async def test_a_failed_step_replies_ok_false_with_its_reason(orchestrator: Orchestrator) -> None:
    inventory = Inventory()
    await orchestrator.start(inventory.participant(orchestrator))
    await orchestrator.send("ReserveStock", message_id="m-oos", input={"sku": "OUT-OF-STOCK"})
    await orchestrator.send("Explode", message_id="m-fire")

    replies = {r.message_id: r for r in await orchestrator.read(2)}
    assert replies["m-oos"].body == {"ok": False, "error": "out of stock: OUT-OF-STOCK"}
    assert replies["m-fire"].body == {"ok": False, "error": "ValueError: the warehouse is on fire"}
    assert replies["m-fire"].headers["kpg-correlation-id"] == b"corr-m-fire"


async def test_a_command_without_a_handler_gets_an_error_reply(orchestrator: Orchestrator) -> None:
    inventory = Inventory()
    await orchestrator.start(inventory.participant(orchestrator))
    await orchestrator.send("ShipParcel", message_id="m-ship", step="ship")

    [reply] = await orchestrator.read(1)
    assert reply.body == {"ok": False, "error": "no handler for ShipParcel"}
    assert (reply.message_id, reply.headers["kpg-correlation-id"]) == ("m-ship", b"corr-m-ship")
    assert inventory.executed == []


async def test_a_resent_command_runs_once_and_gets_the_same_reply(orchestrator: Orchestrator) -> None:
    inventory = Inventory()
    await orchestrator.start(inventory.participant(orchestrator), inventory.on_receive)
    replies = []
    for attempt in range(3):
        for message_id, sku in (("m-ok", "apple"), ("m-oos", "OUT-OF-STOCK")):
            await orchestrator.send(
                "ReserveStock", message_id=message_id, input={"sku": sku}, correlation_id=f"c{attempt}"
            )
            replies += await orchestrator.read(1)

    assert inventory.executed == ["m-ok", "m-oos"]  # failures are remembered too
    assert inventory.received == ["m-ok", "m-oos"] * 3
    for message_id in ("m-ok", "m-oos"):
        copies = [r for r in replies if r.message_id == message_id]
        assert len(copies) == 3 and len({r.value for r in copies}) == 1
        # Each copy's reply echoes that copy's correlation id.
        assert [r.headers["kpg-correlation-id"] for r in copies] == [b"c0", b"c1", b"c2"]
    assert replies[0].body["ok"] is True and replies[1].body["ok"] is False


async def test_copies_arriving_together_run_the_handler_once(orchestrator: Orchestrator) -> None:
    inventory = Inventory()
    inventory.delay_s = 0.3  # long enough for every copy to find the first one still running
    # Sent before the participant starts: its first fetch holds all the copies, answered concurrently.
    await orchestrator.send("ReserveStock", message_id="m-1", input={"sku": "apple"}, copies=3)
    await orchestrator.send("ReserveStock", message_id="m-2", input={"sku": "pear"}, copies=2)
    await orchestrator.start(inventory.participant(orchestrator), inventory.on_receive)

    replies = await orchestrator.read(5)
    assert sorted(inventory.executed) == ["m-1", "m-2"]
    assert inventory.received == ["m-1"] * 3 + ["m-2"] * 2
    for message_id, sku, count in (("m-1", "apple", 3), ("m-2", "pear", 2)):
        copies = [r for r in replies if r.message_id == message_id]
        assert len(copies) == count and len({(r.value, r.key) for r in copies}) == 1
        assert copies[0].body == {"ok": True, "data": {"reservation_id": f"r-{message_id}", "sku": sku}}


async def test_sqlite_dedupe_remembers_across_a_restart(
    orchestrator: Orchestrator, tmp_path: Path, unique: str
) -> None:
    inventory = Inventory()
    group = f"it-participant-{unique}"
    with SqliteDedupe(tmp_path / "inventory.sqlite3") as dedupe:
        task = await orchestrator.start(inventory.participant(orchestrator, group_id=group, dedupe=dedupe))
        await orchestrator.send("ReserveStock", message_id="m-1", input={"sku": "apple"})
        [before] = await orchestrator.read(1)
        await orchestrator.stop(task)

    with SqliteDedupe(tmp_path / "inventory.sqlite3") as dedupe:
        await orchestrator.start(inventory.participant(orchestrator, group_id=group, dedupe=dedupe))
        await orchestrator.send("ReserveStock", message_id="m-1", input={"sku": "apple"}, copies=2)
        after = await orchestrator.read(2)
        # Sent once those replies are in, so its batch comes after theirs, and so does its reply.
        await orchestrator.send("ReserveStock", message_id="m-2", input={"sku": "pear"})
        last = await orchestrator.read_until("m-2")

    assert inventory.executed == ["m-1", "m-2"]
    assert [r.message_id for r in after] == ["m-1", "m-1"]
    assert after[0].value == after[1].value == before.value
    assert before.body["data"]["reservation_id"] == "r-m-1"
    # The first command was committed once answered: the restarted participant did not get it again.
    assert [r.message_id for r in last] == ["m-2"]


async def test_a_command_not_answered_before_a_crash_is_delivered_again(
    orchestrator: Orchestrator, unique: str
) -> None:
    group = f"it-participant-{unique}"
    first, second = Inventory(), Inventory()
    first.delay_s = 3600  # never answers: the participant is stopped in the middle of the handler
    task = await orchestrator.start(first.participant(orchestrator, group_id=group), first.on_receive)
    await orchestrator.send("ReserveStock", message_id="m-1", input={"sku": "apple"})

    async def running() -> bool:
        return first.executed == ["m-1"]

    await eventually(running, timeout_s=20)
    await orchestrator.stop(task)
    await orchestrator.start(second.participant(orchestrator, group_id=group))

    [reply] = await orchestrator.read(1)
    assert (reply.message_id, reply.body["ok"]) == ("m-1", True)
    assert second.executed == ["m-1"]


async def test_records_that_are_not_commands_are_skipped(orchestrator: Orchestrator) -> None:
    inventory = Inventory()
    await orchestrator.start(inventory.participant(orchestrator, dedupe=MemoryDedupe()), inventory.on_receive)
    command_headers: Headers = [
        ("kpg-message-type", "ReserveStock"),
        ("kpg-message-id", "junk"),
        ("kpg-reply-topic", orchestrator.replies),
    ]
    await orchestrator.send_raw(b"hello", [])  # no headers at all
    await orchestrator.send_raw(b'{"sku": "apple"}', command_headers[:2])  # no reply topic
    await orchestrator.send_raw(b"[1, 2]", command_headers)  # not a JSON object
    await orchestrator.send_raw(b"{not json", command_headers)
    await orchestrator.send("ReserveStock", message_id="m-1", input={"sku": "apple"})
    first = await orchestrator.read_until("m-1")
    await orchestrator.send("ReserveStock", message_id="m-2", input={"sku": "pear"})
    second = await orchestrator.read_until("m-2")

    assert [r.message_id for r in first + second] == ["m-1", "m-2"]
    assert inventory.received == inventory.executed == ["m-1", "m-2"]
    assert first[0].body["ok"] is True


async def test_example_participants_answer_and_journal(
    orchestrator: Orchestrator, backends: Backends, repo_root: Path, tmp_path: Path, unique: str
) -> None:
    prefix = f"it.{unique}."
    journal = tmp_path / "journal.jsonl"
    stderr = (tmp_path / "participants.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(repo_root / "examples" / "participants.py"),
        "all",
        "--bootstrap-servers",
        backends.bootstrap_servers,
        "--journal",
        str(journal),
        "--topic-prefix",
        prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line == b"ready\n", (tmp_path / "participants.log").read_text()

        inventory = f"{prefix}inventory.commands"
        await orchestrator.send(
            "ReserveStock", message_id="m-1", input={"sku": "apple", "quantity": 2}, topic=inventory
        )
        await orchestrator.send(
            "ReserveStock", message_id="m-2", input={"sku": "pear", "quantity": 101}, topic=inventory
        )
        await orchestrator.send(
            "ChargePayment",
            message_id="m-3",
            step="charge_payment",
            input={"amount": 5000},
            topic=f"{prefix}payment.commands",
        )
        replies = {r.message_id: r for r in await orchestrator.read(3)}

        reserved = replies["m-1"].body
        assert reserved["ok"] is True
        assert uuid.UUID(reserved["data"]["reservation_id"]).version == 5
        assert replies["m-2"].body == {"ok": False, "error": "out of stock: pear"}
        assert replies["m-3"].body == {"ok": False, "error": "card declined"}

        lines = [json.loads(line) for line in journal.read_text().splitlines()]
        entries = [(e["participant"], e["event"]) for e in lines if e["message_id"] == "m-1"]
        assert entries == [("inventory", "received"), ("inventory", "executed")]
        [executed] = [e for e in lines if e["message_id"] == "m-1" and e["event"] == "executed"]
        assert (executed["saga_id"], executed["step"], executed["command"], executed["kind"]) == (
            "saga-1",
            "reserve_stock",
            "ReserveStock",
            "command",
        )

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        stderr.close()
