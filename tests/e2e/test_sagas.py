"""start-saga through running gateways, with the example participants (inventory, payment, orders) as separate
processes: the outcomes, the order in which participants received commands and compensations, timeouts, a
compensation that never completes, a SIGKILL in the middle of 200 sagas, and two instances sharing 500.

What participants received and executed is read from their journal (examples/participants.py --journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import httpx
import pytest
from google.protobuf import json_format
from kpg import GatewayClient, error_details
from kpg.v1 import dead_letters_pb2 as dl
from kpg.v1 import sagas_pb2 as sg
from prometheus_client.parser import text_string_to_metric_families

from gateway.adapters.redis import redis_answers
from gateway.adapters.sql import Database, SagaStore
from gateway.devstack.processes import free_port, wait_until
from gateway.devstack.redis import RedisNode, find_redis_server
from tests.conftest import Backends, fresh_postgres_database
from tests.support import SERVING, GatewayProcess, checking_consumer, eventually, wait_for_health

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FINAL = {sg.SAGA_STATUS_COMPLETED, sg.SAGA_STATUS_COMPENSATED, sg.SAGA_STATUS_FAILED}
STEPS = ["reserve_stock", "charge_payment", "confirm_order"]
PARTICIPANT_NAMES = ["inventory", "payment", "orders"]


def definitions(prefix: str, *, step_timeout_ms: int = 5000, max_attempts: int = 3) -> dict[str, Any]:
    inventory, payment, orders = (f"{prefix}{t}.commands" for t in ("inventory", "payment", "orders"))
    reserve = {
        "name": "reserve_stock",
        "topic": inventory,
        "command": "ReserveStock",
        "compensation": "ReleaseStock",
    }
    charge = {
        "name": "charge_payment",
        "topic": payment,
        "command": "ChargePayment",
        "compensation": "RefundPayment",
    }
    confirm = {"name": "confirm_order", "topic": orders, "command": "ConfirmOrder"}
    return {
        "sagas": {
            "place_order": {
                "step_timeout_ms": step_timeout_ms,
                "max_attempts": max_attempts,
                "steps": [reserve, charge, confirm],
            },
            # Nobody serves the second step's topic: it times out after two sends.
            "silent_step": {
                "step_timeout_ms": 400,
                "max_attempts": 2,
                "steps": [reserve, {"name": "ship", "topic": f"{prefix}nobody.commands", "command": "Ship"}],
            },
            # The inventory participant has no handler for ReleaseStockV0: the compensation always fails.
            "broken_compensation": {
                "step_timeout_ms": 5000,
                "compensation_max_attempts": 3,
                "retry_backoff_ms": 100,
                "steps": [{**reserve, "compensation": "ReleaseStockV0"}, charge],
            },
        }
    }


def expected_status(order: dict[str, Any]) -> int:
    """What the example participants' rules make of an order."""
    if order.get("quantity", 1) > 100 or order.get("amount", 0) > 1000 or order.get("customer") == "blocked":
        return sg.SAGA_STATUS_COMPENSATED
    return sg.SAGA_STATUS_COMPLETED


def order_of(i: int) -> dict[str, Any]:
    """A mix: most complete, some fail at the second step, some at the third."""
    if i % 5 == 1:
        return {"sku": f"sku-{i}", "amount": 5000, "customer": "c"}
    if i % 5 == 2:
        return {"sku": f"sku-{i}", "amount": 10, "customer": "blocked"}
    return {"sku": f"sku-{i}", "amount": 10, "customer": "c", "quantity": 2}


@dataclass
class Participants:
    """The three example participants, each its own process, journaling to one file."""

    backends: Backends
    prefix: str
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def journal_path(self) -> Path:
        return self.workdir / "journal.jsonl"

    def start(self) -> None:
        for name in PARTICIPANT_NAMES:
            log = (self.workdir / f"{name}.log").open("ab")
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "examples" / "participants.py"),
                    name,
                    "--bootstrap-servers",
                    self.backends.bootstrap_servers,
                    "--state-dir",
                    str(self.workdir / "state"),
                    "--journal",
                    str(self.journal_path),
                    "--topic-prefix",
                    self.prefix,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(REPO / "clients" / "python" / "src")},
            )
            self.processes.append(process)
        for process in self.processes:
            assert process.stdout is not None
            line = process.stdout.readline()  # "ready" once it has its partitions (or EOF if it died)
            assert line.strip() == b"ready", f"participant did not start: {line!r}"

    def pause(self, name: str) -> None:
        self.processes[PARTICIPANT_NAMES.index(name)].send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.processes[PARTICIPANT_NAMES.index(name)].send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(30)

    def journal(self, saga_ids: set[str] | None = None) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        lines = [json.loads(line) for line in self.journal_path.read_text().splitlines() if line.strip()]
        return [e for e in lines if saga_ids is None or e["saga_id"] in saga_ids]

    def executed(self, saga_id: str) -> list[str]:
        return [e["command"] for e in self.journal({saga_id}) if e["event"] == "executed"]


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture(scope="module")
def participants(
    backends: Backends, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Participants]:
    running = Participants(backends, prefix, tmp_path_factory.mktemp("participants"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def write_definitions(workdir: Path, prefix: str, **kwargs: Any) -> Path:
    path = workdir / "definitions.yaml"
    path.write_text(json.dumps(definitions(prefix, **kwargs)))  # JSON is YAML
    return path


def saga_gateway(backends: Backends, workdir: Path, definitions_path: Path, **env: str) -> GatewayProcess:
    return GatewayProcess(
        workdir,
        env={
            "KPG_KAFKA__BOOTSTRAP_SERVERS": backends.bootstrap_servers,
            "KPG_REDIS__URL": backends.redis_url,
            "KPG_SAGAS__SWEEP_INTERVAL_MS": "50",
            "KPG_SAGAS__DISPATCH_GRACE_MS": "1000",
            **env,
        },
        args=["--definitions", str(definitions_path)],
    )


@pytest.fixture(scope="module")
async def gateway(
    backends: Backends, prefix: str, participants: Participants, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("saga-gateway")
    process = saga_gateway(backends, workdir, write_definitions(workdir, prefix)).start()
    try:
        await wait_for_health(process.target, SERVING, process=process)
        yield process
    finally:
        process.kill()


def start_request(
    saga_type: str,
    order: dict[str, Any],
    *,
    saga_id: str = "",
    idempotency_key: str = "",
    correlation_id: str = "",
) -> sg.StartSagaRequest:
    message = sg.StartSagaRequest(
        saga_type=saga_type, saga_id=saga_id, idempotency_key=idempotency_key, correlation_id=correlation_id
    )
    message.input.update(order)
    return message


async def watch_to_the_end(client: GatewayClient, saga_id: str) -> list[sg.Saga]:
    async with asyncio.timeout(60):
        return [s async for s in client.sagas.WatchSaga(sg.WatchSagaRequest(saga_id=saga_id))]


def step_statuses(saga: sg.Saga) -> list[str]:
    return [sg.StepStatus.Name(s.status).removeprefix("STEP_STATUS_") for s in saga.steps]


def context(saga: sg.Saga) -> dict[str, Any]:
    return json_format.MessageToDict(saga.context)


# --- one saga at a time ------------------------------------------------------------------------------------


async def test_the_happy_path_completes_and_the_watch_sees_every_change(
    gateway: GatewayProcess, participants: Participants
) -> None:
    async with GatewayClient(gateway.target) as client:
        order = {"sku": "A-1", "quantity": 2, "amount": 40, "customer": "ada"}
        started = await client.sagas.StartSaga(start_request("place_order", order, correlation_id="trace-1"))
        assert started.status == sg.SAGA_STATUS_RUNNING and started.correlation_id == "trace-1"
        assert step_statuses(started) == ["RUNNING", "PENDING", "PENDING"]
        seen = await watch_to_the_end(client, started.saga_id)
    final = seen[-1]
    assert final.status == sg.SAGA_STATUS_COMPLETED and not final.failure_reason
    assert step_statuses(final) == ["SUCCEEDED"] * 3
    # Every change, in order: the first step running, then each step's success (the first state may be
    # the start itself or a later one, as the watch opens after StartSaga returned).
    running_steps = [step_statuses(s).index("RUNNING") for s in seen if "RUNNING" in step_statuses(s)]
    assert running_steps == sorted(running_steps) and running_steps[-1] == 2
    assert [s.updated_at.ToDatetime() for s in seen] == sorted(s.updated_at.ToDatetime() for s in seen)
    results = context(final)["results"]
    assert context(final)["input"] == order
    assert set(results) == set(STEPS) and results["reserve_stock"]["reservation_id"]
    assert participants.executed(started.saga_id) == ["ReserveStock", "ChargePayment", "ConfirmOrder"]
    command = next(e for e in participants.journal({started.saga_id}) if e["command"] == "ChargePayment")
    assert command["message_id"] == f"{started.saga_id}/1/command" and command["kind"] == "command"


@pytest.mark.parametrize(
    ("order", "failed_step", "executed"),
    [
        (
            {"sku": "B", "amount": 5000},
            "charge_payment",
            ["ReserveStock", "ChargePayment", "ReleaseStock"],
        ),
        (
            {"sku": "C", "amount": 5, "customer": "blocked"},
            "confirm_order",
            ["ReserveStock", "ChargePayment", "ConfirmOrder", "RefundPayment", "ReleaseStock"],
        ),
    ],
    ids=["second-step-fails", "third-step-fails"],
)
async def test_a_failing_step_compensates_the_steps_before_it_in_reverse(
    gateway: GatewayProcess,
    participants: Participants,
    order: dict[str, Any],
    failed_step: str,
    executed: list[str],
) -> None:
    async with GatewayClient(gateway.target) as client:
        started = await client.sagas.StartSaga(start_request("place_order", order))
        final = (await watch_to_the_end(client, started.saga_id))[-1]
    assert final.status == sg.SAGA_STATUS_COMPENSATED
    assert participants.executed(started.saga_id) == executed
    failed = STEPS.index(failed_step)
    assert step_statuses(final)[failed] == "FAILED"
    assert step_statuses(final)[:failed] == ["COMPENSATED"] * failed
    assert final.failure_reason.startswith(f"step {failed_step} failed: ")


async def test_a_step_that_never_answers_times_out_after_its_attempts_and_compensates(
    gateway: GatewayProcess, participants: Participants
) -> None:
    async with GatewayClient(gateway.target) as client:
        started = await client.sagas.StartSaga(start_request("silent_step", {"sku": "D"}))
        final = (await watch_to_the_end(client, started.saga_id))[-1]
    assert final.status == sg.SAGA_STATUS_COMPENSATED
    assert step_statuses(final) == ["COMPENSATED", "TIMED_OUT"]
    assert final.steps[1].attempts == 2 and "no reply within 400 ms, 2 attempts" in final.steps[1].error
    assert participants.executed(started.saga_id) == ["ReserveStock", "ReleaseStock"]


async def test_a_compensation_that_always_fails_ends_failed_with_a_saga_dead_letter(
    gateway: GatewayProcess, participants: Participants, backends: Backends
) -> None:
    async with GatewayClient(gateway.target) as client:
        started = await client.sagas.StartSaga(
            start_request("broken_compensation", {"sku": "E", "amount": 9999})
        )
        final = (await watch_to_the_end(client, started.saga_id))[-1]
    assert final.status == sg.SAGA_STATUS_FAILED
    assert final.steps[0].compensation_attempts == 3
    assert (
        "ReleaseStockV0" in final.failure_reason and "no handler for ReleaseStockV0" in final.steps[0].error
    )
    received = [e for e in participants.journal({started.saga_id}) if e["command"] == "ReleaseStockV0"]
    assert (
        len(received) == 3
    )  # each attempt reached the participant (and was answered from its dedupe record)
    consumer = checking_consumer(backends.bootstrap_servers)
    consumer.subscribe(["kpg.sagas.DLT"])
    try:
        async with asyncio.timeout(30):
            while True:
                message = await asyncio.to_thread(consumer.poll, 0.5)
                if (
                    message is not None
                    and message.error() is None
                    and message.key() == started.saga_id.encode()
                ):
                    break
    finally:
        consumer.close()
    raw_headers = cast("list[tuple[str, bytes]]", message.headers() or [])
    headers = {k: v.decode() for k, v in raw_headers}
    assert headers["kpg-dlt-error-class"] == "SagaCompensationFailed"
    assert headers["kpg-dlt-error-message"] == final.failure_reason
    assert headers["kpg-dlt-original-topic"].endswith("inventory.commands")
    assert headers["kpg-saga-id"] == started.saga_id and headers["kpg-message-type"] == "ReleaseStockV0"

    # Operators find it through the DeadLetters API, with its saga id and the reason.
    async with GatewayClient(gateway.target) as client:
        page = await client.dead_letters.ListDeadLetters(
            dl.ListDeadLettersRequest(
                dlt_topic="kpg.sagas.DLT", key=started.saga_id.encode(), state=dl.DEAD_LETTER_STATE_NEW
            )
        )
    [letter] = page.dead_letters
    assert letter.headers["kpg-saga-id"] == started.saga_id.encode()
    assert letter.headers["kpg-saga-status"] == b"FAILED"
    assert (letter.error_class, letter.error_message) == ("SagaCompensationFailed", final.failure_reason)
    assert (letter.original_partition, letter.original_offset, letter.format) == (
        -1,
        -1,
        dl.DEAD_LETTER_FORMAT_KPG,
    )
    assert letter.original_topic.endswith("inventory.commands") and letter.attempts == 3
    assert json.loads(letter.payload)["command"] == "ReleaseStockV0"


# --- the API's answers ---------------------------------------------------------------------------------


async def test_start_is_idempotent_by_key_and_by_saga_id(
    gateway: GatewayProcess, participants: Participants
) -> None:
    key = f"key-{uuid.uuid4()}"
    async with GatewayClient(gateway.target) as client:
        first = await client.sagas.StartSaga(start_request("place_order", {"sku": "F"}, idempotency_key=key))
        again = await client.sagas.StartSaga(start_request("place_order", {"sku": "F"}, idempotency_key=key))
        assert again.saga_id == first.saga_id
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.sagas.StartSaga(start_request("place_order", {"sku": "G"}, idempotency_key=key))
        assert error_details(raised.value).reason == "IDEMPOTENCY_KEY_REUSED"

        saga_id = f"order-{uuid.uuid4()}"
        by_id = await client.sagas.StartSaga(start_request("place_order", {"sku": "H"}, saga_id=saga_id))
        assert by_id.saga_id == saga_id
        same = await client.sagas.StartSaga(start_request("place_order", {"sku": "H"}, saga_id=saga_id))
        assert same.saga_id == saga_id and same.started_at == by_id.started_at
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.sagas.StartSaga(start_request("place_order", {"sku": "other"}, saga_id=saga_id))
        assert error_details(raised.value).reason == "IDEMPOTENCY_KEY_REUSED"
        for saga in (first, by_id):
            assert (await watch_to_the_end(client, saga.saga_id))[-1].status == sg.SAGA_STATUS_COMPLETED
    assert participants.executed(first.saga_id) == ["ReserveStock", "ChargePayment", "ConfirmOrder"]
    assert participants.executed(saga_id) == ["ReserveStock", "ChargePayment", "ConfirmOrder"]


async def test_bad_calls_get_the_contract_errors(gateway: GatewayProcess) -> None:
    async with GatewayClient(gateway.target) as client:
        calls: list[tuple[Awaitable[object], str]] = [
            (client.sagas.StartSaga(sg.StartSagaRequest(saga_type="nope")), "NOT_FOUND"),
            (client.sagas.StartSaga(sg.StartSagaRequest()), "INVALID_ARGUMENT"),
            (
                client.sagas.StartSaga(sg.StartSagaRequest(saga_type="place_order", saga_id="bad id")),
                "INVALID_ARGUMENT",
            ),
            (client.sagas.GetSaga(sg.GetSagaRequest(saga_id="no-such-saga")), "NOT_FOUND"),
            (client.sagas.GetSaga(sg.GetSagaRequest(saga_id="a\n")), "INVALID_ARGUMENT"),
            (client.sagas.ListSagas(sg.ListSagasRequest(page_token="garbage")), "INVALID_ARGUMENT"),
            (client.sagas.ListSagas(sg.ListSagasRequest(limit=100_000)), "INVALID_ARGUMENT"),
            (client.sagas.ListSagas(sg.ListSagasRequest(status=99)), "INVALID_ARGUMENT"),  # type: ignore[arg-type]
        ]
        for call, reason in calls:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert error_details(raised.value).reason == reason
        big = start_request("place_order", {"blob": "x" * (1024 * 1024 + 1)})
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.sagas.StartSaga(big)
        assert error_details(raised.value).reason == "PAYLOAD_TOO_LARGE"
        # WatchSaga checks before the stream opens: the first read fails, nothing is streamed.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in client.sagas.WatchSaga(sg.WatchSagaRequest(saga_id="no-such-saga")):
                raise AssertionError("a stream opened for an unknown saga")
        assert error_details(raised.value).reason == "NOT_FOUND"


async def test_list_pages_through_every_saga_once_and_filters(gateway: GatewayProcess) -> None:
    saga_type = "silent_step"  # quick to compensate: no participant serves its second step
    async with GatewayClient(gateway.target) as client:
        mine = {
            (await client.sagas.StartSaga(start_request(saga_type, {"sku": f"L{i}"}))).saga_id
            for i in range(7)
        }
        seen: list[str] = []
        token = ""
        while True:
            page = await client.sagas.ListSagas(
                sg.ListSagasRequest(saga_type=saga_type, limit=3, page_token=token)
            )
            assert len(page.sagas) <= 3 and all(s.saga_type == saga_type for s in page.sagas)
            seen += [s.saga_id for s in page.sagas]
            token = page.next_page_token
            if not token:
                break
        assert mine <= set(seen) and len(seen) == len(set(seen))
        await asyncio.gather(*(watch_to_the_end(client, saga_id) for saga_id in mine))
        compensated = await client.sagas.ListSagas(
            sg.ListSagasRequest(saga_type=saga_type, status=sg.SAGA_STATUS_COMPENSATED, limit=1000)
        )
        assert mine <= {s.saga_id for s in compensated.sagas}
        completed = await client.sagas.ListSagas(
            sg.ListSagasRequest(saga_type=saga_type, status=sg.SAGA_STATUS_COMPLETED, limit=1000)
        )
        assert not mine & {s.saga_id for s in completed.sagas}


async def test_rest_starts_gets_lists_and_watches_with_server_sent_events(
    gateway: GatewayProcess, participants: Participants
) -> None:
    async with httpx.AsyncClient(base_url=gateway.rest_url, timeout=60) as http:
        answer = await http.post(
            "/v1/sagas",
            json={"sagaType": "place_order", "input": {"sku": "R", "quantity": 3}},
            headers={"Idempotency-Key": f"rest-{uuid.uuid4()}"},
        )
        assert answer.status_code == 200, answer.text
        saga = answer.json()
        assert saga["status"] == "SAGA_STATUS_RUNNING" and saga["context"]["input"] == {
            "sku": "R",
            "quantity": 3,
        }
        events = []
        async with http.stream("GET", f"/v1/sagas/{saga['sagaId']}/watch") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
        assert events[-1]["status"] == "SAGA_STATUS_COMPLETED"
        assert (await http.get(f"/v1/sagas/{saga['sagaId']}")).json()["status"] == "SAGA_STATUS_COMPLETED"
        listed = (
            await http.get(
                "/v1/sagas", params={"sagaType": "place_order", "status": "COMPLETED", "limit": 1000}
            )
        ).json()
        assert saga["sagaId"] in {s["sagaId"] for s in listed["sagas"]}
        missing = await http.get("/v1/sagas/no-such-saga/watch")
        assert missing.status_code == 404 and missing.json()["error"]["reason"] == "NOT_FOUND"
        unknown = await http.post("/v1/sagas", json={"sagaType": "nope"})
        assert unknown.status_code == 404
        bad = await http.post("/v1/sagas", json={"sagaType": "place_order", "input": "not an object"})
        assert bad.status_code == 400 and bad.json()["error"]["reason"] == "INVALID_ARGUMENT"


async def test_metrics_count_sagas_steps_compensations_and_timeouts(
    gateway: GatewayProcess, participants: Participants
) -> None:
    async with GatewayClient(gateway.target) as client:
        ok = await client.sagas.StartSaga(start_request("place_order", {"sku": "M"}))
        silent = await client.sagas.StartSaga(start_request("silent_step", {"sku": "M"}))
        await asyncio.gather(watch_to_the_end(client, ok.saga_id), watch_to_the_end(client, silent.saga_id))
    assert _metric(gateway, "kpg_sagas_total", saga_type="place_order", status="COMPLETED") >= 1
    assert _metric(gateway, "kpg_sagas_total", saga_type="silent_step", status="COMPENSATED") >= 1
    confirmed = {"saga_type": "place_order", "step": "confirm_order", "outcome": "succeeded"}
    assert _metric(gateway, "kpg_saga_step_seconds_count", **confirmed) >= 1
    assert _metric(gateway, "kpg_saga_step_timeouts_total", step="ship", outcome="resent") >= 1
    assert _metric(gateway, "kpg_saga_step_timeouts_total", step="ship", outcome="timed_out") >= 1
    assert _metric(gateway, "kpg_saga_compensations_total", step="reserve_stock", outcome="completed") >= 1
    assert _metric(gateway, "kpg_saga_seconds_count", saga_type="place_order", status="COMPLETED") >= 1


# --- crashes and several instances ---------------------------------------------------------------------


async def start_many(
    client: GatewayClient, count: int, offset: int = 0, *, orders: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Start `count` place_order sagas with ids of their own (or start `orders` again: by saga id, a start
    is idempotent); returns them by saga id."""
    orders = orders or {f"bulk-{uuid.uuid4()}": order_of(offset + i) for i in range(count)}
    gate = asyncio.Semaphore(32)

    async def one(saga_id: str, order: dict[str, Any]) -> None:
        async with gate:
            await client.sagas.StartSaga(start_request("place_order", order, saga_id=saga_id))

    await asyncio.gather(*(one(saga_id, order) for saga_id, order in orders.items()))
    return orders


async def statuses_of(client: GatewayClient, saga_ids: set[str]) -> dict[str, int]:
    found = await asyncio.gather(*(client.sagas.GetSaga(sg.GetSagaRequest(saga_id=s)) for s in saga_ids))
    return {s.saga_id: s.status for s in found}


def check_participants(participants: Participants, orders: dict[str, dict[str, Any]]) -> None:
    """No command executed twice (participants deduplicate), and each saga's records were sent in order: by
    when the orchestrator sent them (the records' timestamps), not by when each participant got to them (a
    busy participant may read a re-sent command after another participant read the next one)."""
    journal = participants.journal(set(orders))
    executions = Counter(_action(e) for e in journal if e["event"] == "executed")
    assert [m for m, n in executions.items() if n > 1] == []
    rank = {(step, "command"): i for i, step in enumerate(STEPS)}
    rank |= {(step, "compensation"): 2 * len(STEPS) - i for i, step in enumerate(STEPS)}
    sent: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for entry in journal:
        if entry["event"] == "received":
            sent[entry["saga_id"]].append((entry["sent_at_ms"], rank[(entry["step"], entry["kind"])]))
    ranks = {saga_id: [r for _, r in sorted(records)] for saga_id, records in sent.items()}
    out_of_order = {s: r for s, r in ranks.items() if r != sorted(r)}
    assert out_of_order == {}


async def test_sigkill_in_the_middle_of_200_sagas_then_every_saga_ends_as_it_should(
    backends: Backends, prefix: str, participants: Participants, tmp_path: Path
) -> None:
    step_timeout_ms = 3000
    # Attempts to spare: once resumed, the payment participant works through every ChargePayment sent
    # meanwhile (each twice); on a busy machine that took longer than two more step timeouts, and sagas
    # that should have completed timed out and were compensated.
    definitions_path = write_definitions(tmp_path, prefix, step_timeout_ms=step_timeout_ms, max_attempts=6)
    process = saga_gateway(backends, tmp_path, definitions_path).start()
    try:
        await wait_for_health(process.target, SERVING, process=process)
        orders = {f"bulk-{uuid.uuid4()}": order_of(i) for i in range(200)}
        # The payment participant stops answering (SIGSTOP, for less than its session timeout): the
        # ChargePayment commands sent before the crash stay unanswered, so the restarted gateway finds them
        # overdue and sends them again, and the participant, resumed, gets each twice: it must run it once.
        participants.pause("payment")
        async with GatewayClient(process.target) as client:
            starting = asyncio.create_task(start_many(client, 0, orders=orders))
            store = SagaStore(Database(f"sqlite:///{tmp_path / 'state' / 'gateway.db'}"))

            async def half_started() -> bool:
                return len(await asyncio.to_thread(store.get, list(orders))) >= 100

            await eventually(half_started, timeout_s=60, interval_s=0.01)
            # SIGKILL, no goodbye, while sagas are still being started: some are done, most between steps,
            # and some StartSaga calls are cut off (their callers retry them below, by saga id).
            process.kill()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await starting
        # What the killed gateway left, read from its database before anything else touches it.
        at_kill = await asyncio.to_thread(store.get, list(orders))
        in_flight = [s for s in at_kill.values() if not s.status.final]
        assert in_flight, "every saga had finished before the kill: the test proves nothing"
        # Down for longer than a step's timeout: steps whose reply had not come are overdue at the restart.
        await asyncio.sleep(step_timeout_ms / 1000 + 0.5)

        restarted = saga_gateway(backends, tmp_path, definitions_path).start()
        process = restarted
        await wait_for_health(process.target, SERVING, process=process)
        async with GatewayClient(process.target) as client:
            try:

                async def payments_resent() -> bool:
                    return (
                        _metric(
                            process, "kpg_saga_step_timeouts_total", step="charge_payment", outcome="resent"
                        )
                        > 0
                    )

                await eventually(payments_resent, timeout_s=30, interval_s=0.2)
            finally:
                participants.resume("payment")
            await start_many(client, 0, orders=orders)  # the callers whose start was cut off retry it

            async def all_final() -> bool:
                return all(s in FINAL for s in (await statuses_of(client, set(orders))).values())

            await eventually(all_final, timeout_s=120, interval_s=0.5)
            after = await statuses_of(client, set(orders))
            running = await client.sagas.ListSagas(
                sg.ListSagasRequest(status=sg.SAGA_STATUS_RUNNING, limit=1000)
            )
            assert not set(orders) & {s.saga_id for s in running.sagas}
    finally:
        participants.resume("payment")  # whatever happened: the module's other tests need it
        process.kill()
    assert {s: after[s] for s in orders} == {s: expected_status(o) for s, o in orders.items()}
    received = Counter(_action(e) for e in participants.journal(set(orders)) if e["event"] == "received")
    twice = [action for action, n in received.items() if n > 1 and action[1] == "charge_payment"]
    assert twice, "no ChargePayment was sent twice: deduplication went untested"
    check_participants(participants, orders)


async def test_two_instances_share_500_sagas_with_the_same_outcomes(
    backends: Backends, prefix: str, participants: Participants, tmp_path: Path, postgres_url: str
) -> None:
    database = fresh_postgres_database(postgres_url)
    definitions_path = write_definitions(tmp_path, prefix)
    gateways = [
        saga_gateway(backends, tmp_path / name, definitions_path, KPG_DATABASE__URL=database).start()
        for name in ("a", "b")
    ]
    try:
        for process in gateways:
            await wait_for_health(process.target, SERVING, process=process)
        async with GatewayClient(gateways[0].target) as first, GatewayClient(gateways[1].target) as second:
            halves = await asyncio.gather(start_many(first, 250), start_many(second, 250, offset=250))
            orders = {**halves[0], **halves[1]}

            async def all_final() -> bool:
                return all(s in FINAL for s in (await statuses_of(first, set(orders))).values())

            await eventually(all_final, timeout_s=180, interval_s=0.5)
            after = await statuses_of(second, set(orders))
        applied = [_metric(process, "kpg_saga_replies_total", outcome="applied") for process in gateways]
    finally:
        for process in gateways:
            process.kill()
    assert after == {s: expected_status(o) for s, o in orders.items()}
    assert all(n > 0 for n in applied), f"both instances should apply replies: {applied}"
    check_participants(participants, orders)


def _action(entry: dict[str, Any]) -> tuple[str, str, str]:
    """One step's command or compensation of one saga, however often it was sent."""
    return entry["saga_id"], entry["step"], entry["kind"]


def _metric(process: GatewayProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`, from the gateway's /metrics."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{process.rest_url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_sagas_run_on_while_redis_is_down_and_survive_its_restart(
    backends: Backends, prefix: str, participants: Participants, tmp_path: Path
) -> None:
    """Redis only caches for sagas (idempotency keys, watch notifications): with it gone they still finish,
    and after it restarts empty, a retried start finds its saga by the key's derived id."""
    node = RedisNode(tmp_path / "redis", free_port())
    binary = find_redis_server()
    node.start(binary)
    wait_until(lambda: redis_answers(node.url, 1.0), what="redis", timeout_s=30, process=node.process)
    process = saga_gateway(
        backends, tmp_path, write_definitions(tmp_path, prefix), KPG_REDIS__URL=node.url
    ).start()
    try:
        await wait_for_health(process.target, SERVING, process=process)
        async with GatewayClient(process.target) as client:
            keys = {f"redis-{uuid.uuid4()}": order_of(i) for i in range(30)}
            started = {
                key: await client.sagas.StartSaga(start_request("place_order", order, idempotency_key=key))
                for key, order in keys.items()
            }
            assert node.process.stop()
            try:
                saga_ids = {s.saga_id for s in started.values()}

                async def all_final() -> bool:
                    return all(s in FINAL for s in (await statuses_of(client, saga_ids)).values())

                await eventually(all_final, timeout_s=60, interval_s=0.2)
            finally:
                node.start(binary)  # empty: persistence is off
                wait_until(
                    lambda: redis_answers(node.url, 1.0), what="redis", timeout_s=30, process=node.process
                )
            await wait_for_health(process.target, SERVING, process=process, timeout_s=60)
            for key, order in keys.items():
                again = await client.sagas.StartSaga(start_request("place_order", order, idempotency_key=key))
                assert again.saga_id == started[key].saga_id and again.status == expected_status(order)
    finally:
        process.kill()
        node.process.stop()
    check_participants(participants, {s.saga_id: {} for s in started.values()})
