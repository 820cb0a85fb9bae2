"""The saga state machine (domain/sagas.py), step by step, with no broker: what each event does."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway.definitions import parse_definitions
from gateway.domain.dead_letters import SAGA_DLT
from gateway.domain.sagas import (
    Kind,
    Saga,
    SagaPlan,
    SagaStatus,
    StartRequest,
    StepReply,
    StepStatus,
    correlation_id,
    on_deadline,
    on_reply,
    outgoing,
    parse_correlation,
    saga_id_for,
    start,
)
from gateway.errors import InvalidArgument

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
OK = StepReply(True, {"id": "x"}, "")


def plan(**saga: object) -> SagaPlan:
    steps = [
        {"name": "reserve", "topic": "inventory.commands", "command": "Reserve", "compensation": "Release"},
        {"name": "charge", "topic": "payment.commands", "command": "Charge", "compensation": "Refund"},
        {"name": "notify", "topic": "mail.commands", "command": "Notify"},
        {"name": "confirm", "topic": "orders.commands", "command": "Confirm", "timeout_ms": 500},
    ]
    body = {
        "step_timeout_ms": 1000,
        "max_attempts": 2,
        "compensation_max_attempts": 3,
        "steps": steps,
        **saga,
    }
    return SagaPlan.of("order", parse_definitions({"sagas": {"order": body}}).sagas["order"])


def begin(p: SagaPlan) -> Saga:
    return start(p, "s-1", StartRequest("order", {"sku": "A"}), T0)


def reply(p: SagaPlan, saga: Saga, index: int, kind: Kind, answer: StepReply, at: datetime = T0) -> Saga:
    after = on_reply(p, saga, index, kind, answer, at)
    assert after is not None, f"reply to {index}/{kind} did not apply"
    assert after.version == saga.version + 1
    return after


def sent(p: SagaPlan, saga: Saga) -> tuple[str, str, str] | None:
    record = outgoing(p, saga, reply_topic="replies")
    if record is None:
        return None
    value = json.loads(record.value)
    return record.topic, value["command"], dict(record.headers)["kpg-message-id"].decode()


def statuses(saga: Saga) -> list[str]:
    return [s.status.value for s in saga.steps]


def test_happy_path_runs_steps_in_order_and_records_results() -> None:
    p = plan()
    saga = begin(p)
    assert saga.status is SagaStatus.RUNNING and not saga.dispatched
    assert sent(p, saga) == ("inventory.commands", "Reserve", "s-1/0/command")
    for index, command in [(0, "Charge"), (1, "Notify"), (2, "Confirm")]:
        saga = reply(p, saga, index, Kind.COMMAND, StepReply(True, {"n": index}, ""))
        assert sent(p, saga) is not None and sent(p, saga)[1] == command  # type: ignore[index]
    saga = reply(p, saga, 3, Kind.COMMAND, OK)
    assert saga.status is SagaStatus.COMPLETED and saga.dispatched and saga.deadline_ms is None
    assert statuses(saga) == ["SUCCEEDED"] * 4
    assert saga.context == {
        "input": {"sku": "A"},
        "results": {"reserve": {"n": 0}, "charge": {"n": 1}, "notify": {"n": 2}, "confirm": {"id": "x"}},
    }
    value = json.loads(outgoing(p, reply(p, begin(p), 0, Kind.COMMAND, OK), reply_topic="r").value)  # type: ignore[union-attr]
    assert value == {
        "saga_id": "s-1",
        "saga_type": "order",
        "step": "charge",
        "command": "Charge",
        "kind": "command",
        "input": {"sku": "A"},
        "results": {"reserve": {"id": "x"}},
    }


def test_failing_second_step_compensates_the_first() -> None:
    p = plan()
    saga = reply(p, begin(p), 0, Kind.COMMAND, OK)
    saga = reply(p, saga, 1, Kind.COMMAND, StepReply(False, {}, "card declined"))
    assert saga.status is SagaStatus.COMPENSATING
    assert statuses(saga)[:2] == ["COMPENSATING", "FAILED"]
    assert saga.failure_reason == "step charge failed: card declined"
    assert sent(p, saga) == ("inventory.commands", "Release", "s-1/0/compensation")
    saga = reply(p, saga, 0, Kind.COMPENSATION, OK)
    assert saga.status is SagaStatus.COMPENSATED and statuses(saga)[0] == "COMPENSATED"
    assert sent(p, saga) is None


def test_failure_after_a_step_without_compensation_undoes_the_others_in_reverse() -> None:
    p = plan()
    saga = begin(p)
    for index in range(3):
        saga = reply(p, saga, index, Kind.COMMAND, OK)
    saga = reply(p, saga, 3, Kind.COMMAND, StepReply(False, {}, "blocked"))
    # `notify` has no compensation: it stays SUCCEEDED and is skipped.
    undone = []
    while saga.status is SagaStatus.COMPENSATING:
        undone.append(sent(p, saga)[1])  # type: ignore[index]
        saga = reply(p, saga, saga.cursor, Kind.COMPENSATION, OK)
    assert undone == ["Refund", "Release"]
    assert statuses(saga) == ["COMPENSATED", "COMPENSATED", "SUCCEEDED", "FAILED"]
    assert saga.status is SagaStatus.COMPENSATED


def test_a_failing_first_step_has_nothing_to_compensate() -> None:
    p = plan()
    saga = reply(p, begin(p), 0, Kind.COMMAND, StepReply(False, {}, "out of stock"))
    assert saga.status is SagaStatus.COMPENSATED and saga.dispatched
    assert saga.failure_reason == "step reserve failed: out of stock"


def test_a_silent_step_is_sent_again_with_the_same_message_id_then_times_out() -> None:
    p = plan()
    saga = reply(p, begin(p), 0, Kind.COMMAND, OK)
    assert on_deadline(p, saga, T0 + timedelta(milliseconds=999)) is None  # not due yet
    first = sent(p, saga)
    saga = on_deadline(p, saga, T0 + timedelta(seconds=1))  # type: ignore[assignment]
    assert saga.steps[1].attempts == 2 and not saga.dispatched
    assert sent(p, saga) == first  # same command, same message id
    saga = on_deadline(p, saga, T0 + timedelta(seconds=2))  # type: ignore[assignment]
    assert saga.steps[1].status is StepStatus.TIMED_OUT
    assert saga.steps[1].error == "no reply within 1000 ms, 2 attempts"
    assert saga.status is SagaStatus.COMPENSATING and sent(p, saga)[1] == "Release"  # type: ignore[index]


def test_replies_that_are_not_for_the_active_action_change_nothing() -> None:
    p = plan()
    saga = reply(p, begin(p), 0, Kind.COMMAND, OK)
    assert on_reply(p, saga, 0, Kind.COMMAND, OK, T0) is None  # duplicate of an applied reply
    assert on_reply(p, saga, 2, Kind.COMMAND, OK, T0) is None  # a step not started
    assert on_reply(p, saga, 1, Kind.COMPENSATION, OK, T0) is None  # nothing is compensating
    saga = reply(p, saga, 1, Kind.COMMAND, StepReply(False, {}, "no"))
    assert on_reply(p, saga, 1, Kind.COMMAND, OK, T0) is None  # a late ok after the failure
    done = reply(p, saga, 0, Kind.COMPENSATION, OK)
    assert on_reply(p, done, 0, Kind.COMPENSATION, OK, T0) is None  # final: never changes again
    assert on_deadline(p, done, T0 + timedelta(days=1)) is None


def test_a_compensation_that_keeps_failing_ends_failed_with_a_dead_letter() -> None:
    p = plan(retry_backoff_ms=100)
    saga = reply(p, begin(p), 0, Kind.COMMAND, OK)
    saga = reply(p, saga, 1, Kind.COMMAND, StepReply(False, {}, "declined"))
    now = T0
    for attempt in (1, 2):
        saga = reply(p, saga, 0, Kind.COMPENSATION, StepReply(False, {}, "db down"), now)
        assert saga.status is SagaStatus.COMPENSATING and saga.dispatched  # waits, sends nothing
        assert saga.steps[0].compensation_attempts == attempt
        assert on_deadline(p, saga, now + timedelta(milliseconds=99)) is None
        now += timedelta(milliseconds=100)
        saga = on_deadline(p, saga, now)  # type: ignore[assignment]
        assert not saga.dispatched and sent(p, saga)[2] == "s-1/0/compensation"  # type: ignore[index]
    saga = reply(p, saga, 0, Kind.COMPENSATION, StepReply(False, {}, "db down"), now)
    assert saga.status is SagaStatus.FAILED and not saga.dispatched
    assert "compensation Release of step reserve did not complete after 3 attempts" in saga.failure_reason
    record = outgoing(p, saga, reply_topic="replies")
    assert record is not None and record.topic == SAGA_DLT and record.key == b"s-1"
    headers = {k: v.decode() for k, v in record.headers}
    assert headers["kpg-dlt-original-topic"] == "inventory.commands"
    assert headers["kpg-dlt-error-class"] == "SagaCompensationFailed"
    assert headers["kpg-dlt-error-message"] == saga.failure_reason
    assert headers["kpg-saga-id"] == "s-1" and headers["kpg-saga-status"] == "FAILED"
    assert json.loads(record.value)["command"] == "Release"


def test_a_compensation_that_never_answers_ends_failed_after_its_attempts() -> None:
    p = plan()
    saga = reply(p, begin(p), 0, Kind.COMMAND, OK)
    saga = reply(p, saga, 1, Kind.COMMAND, StepReply(False, {}, "declined"))
    now = T0
    while saga.status is SagaStatus.COMPENSATING:
        now += timedelta(seconds=1)
        saga = on_deadline(p, saga, now)  # type: ignore[assignment]
    assert saga.status is SagaStatus.FAILED and saga.steps[0].compensation_attempts == 3


def test_correlation_ids_round_trip_and_strangers_are_refused() -> None:
    assert parse_correlation(correlation_id("a.b:c", 2, Kind.COMPENSATION)) == ("a.b:c", 2, Kind.COMPENSATION)
    for bad in ["", "x", "s/1", "s/one/command", "s/1/undo", "bad id/1/command", "s/1/command\n"]:
        assert parse_correlation(bad) is None, bad


@pytest.mark.parametrize(
    ("raw", "ok", "error"),
    [
        (b'{"ok": true, "data": {"a": 1}}', True, ""),
        (b'{"ok": false, "error": "nope"}', False, "nope"),
        (b'{"ok": false}', False, "failed"),
        (b"not json", False, "malformed reply: not JSON"),
        (b'{"ok": "yes"}', False, "malformed reply: expected an object with a boolean `ok`"),
        (None, False, "malformed reply: not JSON"),
    ],
)
def test_replies_are_parsed_and_malformed_ones_are_errors(raw: bytes | None, ok: bool, error: str) -> None:
    parsed = StepReply.parse(raw)
    assert (parsed.ok, parsed.error) == (ok, error)


def test_saga_ids_are_checked_or_derived_from_the_idempotency_key() -> None:
    assert saga_id_for(StartRequest("t", saga_id="order-1")) == "order-1"
    keyed = saga_id_for(StartRequest("t", idempotency_key="k1"))
    assert keyed == saga_id_for(StartRequest("t", idempotency_key="k1")) != saga_id_for(StartRequest("t"))
    for bad in ["bad id", "x" * 201, "a\n", "a/b"]:
        with pytest.raises(InvalidArgument):
            saga_id_for(StartRequest("t", saga_id=bad))


def test_state_survives_its_stored_form() -> None:
    p = plan()
    saga = reply(p, reply(p, begin(p), 0, Kind.COMMAND, OK), 1, Kind.COMMAND, StepReply(False, {}, "no"))
    again = Saga.from_columns(
        saga_id=saga.saga_id,
        saga_type=saga.saga_type,
        status=saga.status.value,
        version=saga.version,
        state_json=saga.to_json(),
        started_at=saga.started_at.replace(tzinfo=None),  # as SQLite returns it
        updated_at=saga.updated_at,
        deadline_ms=saga.deadline_ms,
        dispatched=saga.dispatched,
        fingerprint=saga.fingerprint,
    )
    assert again == saga
