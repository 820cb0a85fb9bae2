"""Sagas: the orchestration state machine, as pure functions of (plan, saga, what happened, now).

A saga runs its steps in order: one action is active at a time (the `cursor` step's command, or while
compensating, its compensation), and the saga waits for that action's reply or its `deadline_ms`. Every
function here returns a new `Saga` with `version` one higher, or None when what happened does not apply
(a late or duplicate reply, a deadline that another instance already handled): the caller then writes
nothing and sends nothing.

Invariants:
- A step's command is sent only while the saga is RUNNING with the cursor on that step; a compensation only
  while COMPENSATING with the cursor on it; so the records a saga sends follow its steps, in order.
- Compensations run for the steps that SUCCEEDED, in reverse order; a step without a compensation has
  nothing to undo and stays SUCCEEDED.
- Every send of one action carries the same message id (`message_id`), so participants deduplicate re-sends.
- `dispatched` is False exactly when the version's outgoing record (`outgoing`) still has to reach Kafka;
  whoever commits such a version sends it and then marks it dispatched (a crash in between is caught by a
  sweep: the record is sent again, with the same message id).
- A final saga (COMPLETED, COMPENSATED, FAILED) never changes again.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from gateway.definitions import SagaDef
from gateway.domain.dead_letters import SAGA_DLT, Failure, dlt_headers
from gateway.errors import InvalidArgument

# Headers of saga commands and replies (contract: "On the wire").
MESSAGE_TYPE = "kpg-message-type"
SAGA_ID = "kpg-saga-id"
SAGA_TYPE = "kpg-saga-type"
SAGA_STEP = "kpg-saga-step"
MESSAGE_ID = "kpg-message-id"
CORRELATION_ID = "kpg-correlation-id"
REPLY_TOPIC = "kpg-reply-topic"
CONTENT_TYPE = "content-type"
JSON = "application/json"

_SAGA_ID = re.compile(r"[A-Za-z0-9._:@-]{1,200}")  # fullmatch: `$` would accept a trailing newline
_ID_NAMESPACE = uuid.UUID("0f6f6a3e-8d4b-5c1e-9a57-6b1f0d2c9e41")
MAX_ERROR_CHARS = 2000


class SagaStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"

    @property
    def final(self) -> bool:
        return self in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


class StepStatus(enum.StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"


class Kind(enum.StrEnum):
    COMMAND = "command"
    COMPENSATION = "compensation"


@dataclass(frozen=True, slots=True)
class StepPlan:
    name: str
    topic: str
    command: str
    compensation: str | None
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class SagaPlan:
    """A saga type from the definitions file, with every default resolved."""

    saga_type: str
    steps: tuple[StepPlan, ...]
    max_attempts: int
    compensation_max_attempts: int
    retry_backoff_ms: int

    @classmethod
    def of(cls, saga_type: str, definition: SagaDef) -> SagaPlan:
        steps = tuple(
            StepPlan(
                name=s.name,
                topic=s.topic,
                command=s.command,
                compensation=s.compensation,
                timeout_ms=s.timeout_ms or definition.step_timeout_ms,
            )
            for s in definition.steps
        )
        return cls(
            saga_type=saga_type,
            steps=steps,
            max_attempts=definition.max_attempts,
            compensation_max_attempts=definition.compensation_max_attempts,
            retry_backoff_ms=definition.retry_backoff_ms,
        )


@dataclass(frozen=True, slots=True)
class StepState:
    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0  # sends of the step's command
    error: str = ""
    compensation_attempts: int = 0  # sends of its compensation
    started_ms: int | None = None  # when the active action was first sent (for the step latency metric)


@dataclass(frozen=True, slots=True)
class Saga:
    saga_id: str
    saga_type: str
    status: SagaStatus
    steps: tuple[StepState, ...]
    input: Mapping[str, Any]
    results: Mapping[str, Any]  # step name -> the data of its ok reply
    started_at: datetime
    updated_at: datetime
    version: int = 1
    cursor: int = 0  # the step whose command (or, while compensating, compensation) is active
    deadline_ms: int | None = None  # epoch ms when the active action times out or is retried
    dispatched: bool = False
    failure_reason: str = ""
    correlation_id: str = ""
    fingerprint: str = ""
    # The reply-topic partition whose consumer drives this saga (see services/sagas.py: ownership).
    partition: int = 0

    @property
    def context(self) -> dict[str, Any]:
        return {"input": dict(self.input), "results": dict(self.results)}

    def to_json(self) -> str:
        """The saga's mutable part as JSON (what the store keeps besides its indexed columns)."""
        return json.dumps(
            {
                "steps": [
                    [s.name, s.status.value, s.attempts, s.error, s.compensation_attempts, s.started_ms]
                    for s in self.steps
                ],
                "input": self.input,
                "results": self.results,
                "cursor": self.cursor,
                "failure_reason": self.failure_reason,
                "correlation_id": self.correlation_id,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_columns(
        cls,
        *,
        saga_id: str,
        saga_type: str,
        status: str,
        version: int,
        state_json: str,
        started_at: datetime,
        updated_at: datetime,
        deadline_ms: int | None,
        dispatched: bool,
        fingerprint: str,
        partition: int = 0,
    ) -> Saga:
        state = json.loads(state_json)
        return cls(
            saga_id=saga_id,
            saga_type=saga_type,
            status=SagaStatus(status),
            steps=tuple(
                StepState(name, StepStatus(st), attempts, error, comp, started)
                for name, st, attempts, error, comp, started in state["steps"]
            ),
            input=state["input"],
            results=state["results"],
            started_at=_utc(started_at),
            updated_at=_utc(updated_at),
            version=version,
            cursor=state["cursor"],
            deadline_ms=deadline_ms,
            dispatched=dispatched,
            failure_reason=state["failure_reason"],
            correlation_id=state["correlation_id"],
            fingerprint=fingerprint,
            partition=partition,
        )


def _utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StartRequest:
    saga_type: str
    input: Mapping[str, Any] = field(default_factory=dict)
    saga_id: str = ""
    idempotency_key: str = ""
    correlation_id: str = ""

    def fingerprint(self) -> str:
        """What makes two starts the same request (the correlation id only traces, it does not count)."""
        canonical = json.dumps([self.saga_type, self.saga_id, self.input], sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()


def check_saga_id(saga_id: str, field_name: str = "saga_id") -> str:
    if not _SAGA_ID.fullmatch(saga_id):
        raise InvalidArgument.field(field_name, "must be 1-200 characters of [A-Za-z0-9._:@-]")
    return saga_id


def saga_id_for(request: StartRequest) -> str:
    """The request's saga id; without one, derived from the idempotency key (so a retry finds its saga in
    the database even when Redis forgot the key), else a fresh UUID."""
    if request.saga_id:
        return check_saga_id(request.saga_id)
    if request.idempotency_key:
        return str(uuid.uuid5(_ID_NAMESPACE, request.idempotency_key))
    return str(uuid.uuid4())


# --- correlation: which saga, step and action a reply answers --------------------------------------------


def correlation_id(saga_id: str, index: int, kind: Kind) -> str:
    """Also the action's message id: the same for every send of one command or compensation."""
    return f"{saga_id}/{index}/{kind.value}"


message_id = correlation_id


def parse_correlation(value: str) -> tuple[str, int, Kind] | None:
    """(saga id, step index, kind) of a correlation id this module made, else None."""
    parts = value.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdecimal():
        return None
    saga_id, index, kind = parts
    if not _SAGA_ID.fullmatch(saga_id) or kind not in (Kind.COMMAND.value, Kind.COMPENSATION.value):
        return None
    return saga_id, int(index), Kind(kind)


@dataclass(frozen=True, slots=True)
class StepReply:
    ok: bool
    data: Mapping[str, Any]
    error: str

    @classmethod
    def parse(cls, value: bytes | None) -> StepReply:
        """A participant's `{ok, data, error}`; anything else is an error reply that says what was wrong."""
        try:
            body = json.loads(value or b"")
        except ValueError:
            return cls(False, {}, "malformed reply: not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
            return cls(False, {}, "malformed reply: expected an object with a boolean `ok`")
        data = body.get("data")
        error = body.get("error")
        return cls(
            ok=body["ok"],
            data=data if isinstance(data, dict) else {} if data is None else {"value": data},
            error=(str(error) if error is not None else "" if body["ok"] else "failed")[:MAX_ERROR_CHARS],
        )


# --- transitions -----------------------------------------------------------------------------------------


def start(plan: SagaPlan, saga_id: str, request: StartRequest, now: datetime, *, partition: int = 0) -> Saga:
    """A new saga with its first step's command due (not yet dispatched), driven from `partition`."""
    now_ms = _ms(now)
    first = plan.steps[0]
    steps = (
        StepState(first.name, StepStatus.RUNNING, attempts=1, started_ms=now_ms),
        *(StepState(s.name) for s in plan.steps[1:]),
    )
    return Saga(
        saga_id=saga_id,
        saga_type=plan.saga_type,
        status=SagaStatus.RUNNING,
        steps=steps,
        input=dict(request.input),
        results={},
        started_at=now,
        updated_at=now,
        deadline_ms=now_ms + first.timeout_ms,
        correlation_id=request.correlation_id,
        fingerprint=request.fingerprint(),
        partition=partition,
    )


def on_reply(
    plan: SagaPlan, saga: Saga, index: int, kind: Kind, reply: StepReply, now: datetime
) -> Saga | None:
    """The saga after the reply to step `index`'s `kind` action; None if that action is not the active one."""
    if saga.cursor != index or index >= len(saga.steps):
        return None
    step = saga.steps[index]
    if kind is Kind.COMMAND:
        if saga.status is not SagaStatus.RUNNING or step.status is not StepStatus.RUNNING:
            return None
        if reply.ok:
            done = replace(step, status=StepStatus.SUCCEEDED, error="")
            results = {**saga.results, step.name: dict(reply.data)}
            return _advance(plan, _with_step(saga, index, done, results=results), index + 1, now)
        failed = replace(step, status=StepStatus.FAILED, error=reply.error)
        reason = f"step {step.name} failed: {reply.error}"
        return _compensate_from(plan, _with_step(saga, index, failed), index - 1, reason, now)
    if saga.status is not SagaStatus.COMPENSATING or step.status is not StepStatus.COMPENSATING:
        return None
    if reply.ok:
        undone = replace(step, status=StepStatus.COMPENSATED, error="")
        return _compensate_from(plan, _with_step(saga, index, undone), index - 1, saga.failure_reason, now)
    # The compensation failed: retry it after a pause (on_deadline sends it again), or give up.
    errored = replace(step, error=f"compensation failed: {reply.error}"[:MAX_ERROR_CHARS])
    saga = _with_step(saga, index, errored)
    if step.compensation_attempts >= plan.compensation_max_attempts:
        return _fail(plan, saga, index, now)
    return _touch(saga, now, deadline_ms=_ms(now) + plan.retry_backoff_ms, dispatched=True)


def on_deadline(plan: SagaPlan, saga: Saga, now: datetime) -> Saga | None:
    """The saga once its active action's deadline has passed: sent again, or timed out; None if not due."""
    now_ms = _ms(now)
    if saga.status.final or saga.deadline_ms is None or saga.deadline_ms > now_ms:
        return None
    index = saga.cursor
    step = saga.steps[index]
    step_plan = plan.steps[index]
    if saga.status is SagaStatus.RUNNING:
        if step.attempts < plan.max_attempts:
            again = replace(step, attempts=step.attempts + 1)
            return _touch(
                _with_step(saga, index, again),
                now,
                deadline_ms=now_ms + step_plan.timeout_ms,
                dispatched=False,
            )
        error = f"no reply within {step_plan.timeout_ms} ms, {step.attempts} attempts"
        timed_out = replace(step, status=StepStatus.TIMED_OUT, error=error)
        reason = f"step {step.name} timed out: {error}"
        return _compensate_from(plan, _with_step(saga, index, timed_out), index - 1, reason, now)
    # COMPENSATING: the compensation timed out, or its retry pause after an error reply is over.
    if step.compensation_attempts >= plan.compensation_max_attempts:
        error = step.error or f"compensation: no reply within {step_plan.timeout_ms} ms"
        return _fail(plan, _with_step(saga, index, replace(step, error=error)), index, now)
    again = replace(step, compensation_attempts=step.compensation_attempts + 1)
    return _touch(
        _with_step(saga, index, again), now, deadline_ms=now_ms + step_plan.timeout_ms, dispatched=False
    )


def _advance(plan: SagaPlan, saga: Saga, index: int, now: datetime) -> Saga:
    if index >= len(plan.steps):
        return _touch(replace(saga, status=SagaStatus.COMPLETED, cursor=len(plan.steps) - 1), now)
    running = replace(saga.steps[index], status=StepStatus.RUNNING, attempts=1, started_ms=_ms(now))
    return _touch(
        replace(_with_step(saga, index, running), cursor=index),
        now,
        deadline_ms=_ms(now) + plan.steps[index].timeout_ms,
        dispatched=False,
    )


def _compensate_from(plan: SagaPlan, saga: Saga, index: int, reason: str, now: datetime) -> Saga:
    """Start the compensation of the last succeeded step at or below `index`; none left: COMPENSATED."""
    for j in range(index, -1, -1):
        if saga.steps[j].status is StepStatus.SUCCEEDED and plan.steps[j].compensation:
            undoing = replace(
                saga.steps[j], status=StepStatus.COMPENSATING, compensation_attempts=1, started_ms=_ms(now)
            )
            return _touch(
                replace(
                    _with_step(saga, j, undoing),
                    status=SagaStatus.COMPENSATING,
                    cursor=j,
                    failure_reason=reason,
                ),
                now,
                deadline_ms=_ms(now) + plan.steps[j].timeout_ms,
                dispatched=False,
            )
    return _touch(replace(saga, status=SagaStatus.COMPENSATED, failure_reason=reason), now)


def _fail(plan: SagaPlan, saga: Saga, index: int, now: datetime) -> Saga:
    """A compensation that cannot complete: FAILED, and the saga's dead letter is due."""
    step = saga.steps[index]
    name = plan.steps[index].compensation
    reason = (
        f"compensation {name} of step {step.name} did not complete after {step.compensation_attempts} "
        f"attempts ({step.error}); after: {saga.failure_reason}"
    )
    return _touch(
        replace(saga, status=SagaStatus.FAILED, failure_reason=reason[:MAX_ERROR_CHARS]),
        now,
        dispatched=False,
    )


def _with_step(saga: Saga, index: int, step: StepState, *, results: Mapping[str, Any] | None = None) -> Saga:
    steps = (*saga.steps[:index], step, *saga.steps[index + 1 :])
    return replace(saga, steps=steps, results=saga.results if results is None else results)


def _touch(saga: Saga, now: datetime, *, deadline_ms: int | None = None, dispatched: bool = True) -> Saga:
    """The next version. `deadline_ms` None: nothing is awaited; `dispatched` False: a record is due."""
    return replace(
        saga, version=saga.version + 1, updated_at=now, deadline_ms=deadline_ms, dispatched=dispatched
    )


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


# --- what a saga sends -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def outgoing(plan: SagaPlan, saga: Saga, *, reply_topic: str) -> Outgoing | None:
    """The record this version of the saga sends: its active command or compensation, or, once FAILED,
    its dead letter (the compensation that did not complete, to `kpg.sagas.DLT`). None if nothing."""
    if saga.status is SagaStatus.RUNNING:
        return _command(plan, saga, Kind.COMMAND, reply_topic)
    if saga.status is SagaStatus.COMPENSATING:
        return _command(plan, saga, Kind.COMPENSATION, reply_topic)
    if saga.status is SagaStatus.FAILED:
        return _dead_letter(plan, saga, reply_topic)
    return None


def _command(plan: SagaPlan, saga: Saga, kind: Kind, reply_topic: str) -> Outgoing:
    index = saga.cursor
    step = plan.steps[index]
    name = step.command if kind is Kind.COMMAND else step.compensation
    assert name is not None  # only steps with a compensation are ever COMPENSATING
    value = {
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "step": step.name,
        "command": name,
        "kind": kind.value,
        "input": saga.input,
        "results": saga.results,
    }
    ident = correlation_id(saga.saga_id, index, kind)
    headers = {
        MESSAGE_TYPE: name,
        SAGA_ID: saga.saga_id,
        SAGA_TYPE: saga.saga_type,
        SAGA_STEP: step.name,
        MESSAGE_ID: ident,
        CORRELATION_ID: ident,
        REPLY_TOPIC: reply_topic,
        CONTENT_TYPE: JSON,
    }
    return Outgoing(
        topic=step.topic,
        key=saga.saga_id.encode(),
        value=json.dumps(value, separators=(",", ":")).encode(),
        headers=[(k, v.encode()) for k, v in headers.items()],
    )


def _dead_letter(plan: SagaPlan, saga: Saga, reply_topic: str) -> Outgoing:
    """The compensation that did not complete, as the record an operator can replay once the participant
    is fixed, with `kpg-dlt-*` headers saying why (original partition and offset -1: it was never
    consumed) and the saga's status."""
    command = _command(plan, saga, Kind.COMPENSATION, reply_topic)
    step = saga.steps[saga.cursor]
    failure = Failure(
        topic=command.topic,
        partition=-1,
        offset=-1,
        timestamp_ms=None,
        consumer_group="kpg-sagas",
        error_class="SagaCompensationFailed",
        error_message=saga.failure_reason,
        stack_trace="",
        attempts=step.compensation_attempts,
        failed_at=saga.updated_at,
    )
    headers = [*dlt_headers(command.headers, failure), ("kpg-saga-status", saga.status.value.encode())]
    return Outgoing(topic=SAGA_DLT, key=command.key, value=command.value, headers=headers)


def decode_headers(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in headers}
