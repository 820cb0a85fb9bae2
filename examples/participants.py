"""The participants of the `place_order` saga (examples/definitions.yaml), each runnable as its own process.
With `make run` in another terminal:

    .venv/bin/python examples/participants.py all --bootstrap-servers 127.0.0.1:9092 --journal saga.jsonl

Business rules (`input` is the saga's input, `results` the replies of the steps finished before):
- inventory, on `inventory.commands`: ReserveStock fails with "out of stock: <sku>" when `input.quantity`
  (default 1) is over 100 or `input.sku` is "OUT-OF-STOCK", else replies `{"reservation_id": ...}`;
  ReleaseStock replies `{"released": <results.reserve_stock.reservation_id>}`.
- payment, on `payment.commands`: ChargePayment fails with "card declined" when `input.amount` is over
  1000, else replies `{"payment_id": ...}`; RefundPayment replies
  `{"refunded": <results.charge_payment.payment_id>}`.
- orders, on `orders.commands`: ConfirmOrder fails with "customer blocked" when `input.customer` is
  "blocked", else replies `{"confirmation": ...}`.

Ids are uuid5 of the command's message id, so running a handler twice for one message id would give the
same reply: a re-execution shows only in the journal (two "executed" lines for one message id).

Options: `--state-dir DIR` keeps each participant's outcomes in DIR/<participant>.sqlite3 (default: in
memory, forgotten on exit); `--journal FILE` appends one JSON line per command received and per handler
run: {"participant", "event": "received"|"executed", "message_id", "saga_id", "step", "command", "kind",
"sent_at_ms" (when the orchestrator sent that copy), "at"}; `--topic-prefix P` prefixes the topics and
consumer groups (to run apart from others on one Kafka). The command topics are created (3 partitions)
if missing. Prints `ready` once every participant has its partitions; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from kpg.participant import Dedupe, MemoryDedupe, Participant, SagaCommand, SqliteDedupe, StepFailed

log = logging.getLogger("participants")

IDS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:kpg:examples:place_order")
Handler = Callable[[SagaCommand], Awaitable[Mapping[str, Any] | None]]


def _id(kind: str, command: SagaCommand) -> str:
    return str(uuid.uuid5(IDS, f"{kind}:{command.message_id}"))


def _result(command: SagaCommand, step: str, name: str) -> Any:
    reply = command.results.get(step)
    return reply.get(name) if isinstance(reply, Mapping) else None


async def reserve_stock(command: SagaCommand) -> Mapping[str, Any]:
    sku = str(command.input.get("sku", ""))
    if int(command.input.get("quantity", 1)) > 100 or sku == "OUT-OF-STOCK":
        raise StepFailed(f"out of stock: {sku}")
    return {"reservation_id": _id("reservation", command)}


async def release_stock(command: SagaCommand) -> Mapping[str, Any]:
    return {"released": _result(command, "reserve_stock", "reservation_id")}


async def charge_payment(command: SagaCommand) -> Mapping[str, Any]:
    if float(command.input.get("amount", 0)) > 1000:
        raise StepFailed("card declined")
    return {"payment_id": _id("payment", command)}


async def refund_payment(command: SagaCommand) -> Mapping[str, Any]:
    return {"refunded": _result(command, "charge_payment", "payment_id")}


async def confirm_order(command: SagaCommand) -> Mapping[str, Any]:
    if command.input.get("customer") == "blocked":
        raise StepFailed("customer blocked")
    return {"confirmation": _id("confirmation", command)}


# participant -> (command topic, handlers by command type)
PARTICIPANTS: dict[str, tuple[str, dict[str, Handler]]] = {
    "inventory": ("inventory.commands", {"ReserveStock": reserve_stock, "ReleaseStock": release_stock}),
    "payment": ("payment.commands", {"ChargePayment": charge_payment, "RefundPayment": refund_payment}),
    "orders": ("orders.commands", {"ConfirmOrder": confirm_order}),
}


class Journal:
    """Appends whole JSON lines with one write each on an O_APPEND file: lines from several processes never
    interleave, and a reader sees each line as soon as it is written."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, participant: str, event: str, command: SagaCommand) -> None:
        line = {
            "participant": participant,
            "event": event,
            "message_id": command.message_id,
            "saga_id": command.saga_id,
            "step": command.step,
            "command": command.command,
            "kind": command.kind,
            "sent_at_ms": command.sent_at_ms,
            "at": datetime.now(UTC).isoformat(),
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def build(
    name: str, *, bootstrap_servers: str, prefix: str, dedupe: Dedupe, journal: Journal | None
) -> Participant:
    topic, handlers = PARTICIPANTS[name]
    participant = Participant(
        prefix + topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"{prefix}kpg-example-{name}",
        dedupe=dedupe,
    )
    for command_type, handler in handlers.items():
        participant.handler(command_type)(_journaled(name, journal, handler))
    return participant


def _journaled(name: str, journal: Journal | None, handler: Handler) -> Handler:
    async def run(command: SagaCommand) -> Mapping[str, Any] | None:
        if journal is not None:
            journal.write(name, "executed", command)
        return await handler(command)

    return run


def create_topics(bootstrap_servers: str, topics: list[str]) -> None:
    """Create the command topics that do not exist yet (3 partitions, the broker's replication factor)."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics([NewTopic(topic, 3, -1) for topic in topics], operation_timeout=30)
    for topic, future in futures.items():
        try:
            future.result(30)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


async def serve(args: argparse.Namespace) -> None:
    names = list(PARTICIPANTS) if args.participant == "all" else [args.participant]
    await asyncio.to_thread(
        create_topics, args.bootstrap_servers, [args.topic_prefix + PARTICIPANTS[n][0] for n in names]
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    journal = Journal(args.journal) if args.journal else None
    stores: list[SqliteDedupe] = []
    runs: list[asyncio.Task[None]] = []
    readies: list[asyncio.Event] = []
    waits: list[asyncio.Task[Any]] = []
    try:
        for name in names:
            dedupe: Dedupe = MemoryDedupe()
            if args.state_dir is not None:
                args.state_dir.mkdir(parents=True, exist_ok=True)
                store = SqliteDedupe(args.state_dir / f"{name}.sqlite3")
                stores.append(store)
                dedupe = store
            participant = build(
                name,
                bootstrap_servers=args.bootstrap_servers,
                prefix=args.topic_prefix,
                dedupe=dedupe,
                journal=journal,
            )
            ready = asyncio.Event()
            readies.append(ready)
            on_receive = None if journal is None else _receiver(journal, name)
            runs.append(asyncio.create_task(participant.run(ready, on_receive), name=f"participant-{name}"))
        all_ready = asyncio.create_task(_all_set(readies))
        stopping = asyncio.create_task(stop.wait())
        waits = [all_ready, stopping]
        done, _ = await asyncio.wait([all_ready, stopping, *runs], return_when=asyncio.FIRST_COMPLETED)
        if all_ready in done:
            print("ready", flush=True)
            done, _ = await asyncio.wait([stopping, *runs], return_when=asyncio.FIRST_COMPLETED)
        for run in runs:
            if run in done:
                run.result()  # a participant only ends by failing: say why
    finally:
        for task in [*runs, *waits]:
            task.cancel()
        await asyncio.gather(*runs, *waits, return_exceptions=True)
        for store in stores:
            store.close()
        if journal is not None:
            journal.close()


def _receiver(journal: Journal, name: str) -> Callable[[SagaCommand], None]:
    return lambda command: journal.write(name, "received", command)


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("participant", choices=[*PARTICIPANTS, "all"])
    parser.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT")
    parser.add_argument("--state-dir", type=Path, help="keep outcomes in SQLite files here (default: memory)")
    parser.add_argument("--journal", type=Path, help="append what was received and executed to this file")
    parser.add_argument("--topic-prefix", default="", help="prefix of the topics and consumer groups")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
