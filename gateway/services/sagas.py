"""start-saga: an orchestrator whose state lives in the SQL database, driven by replies and deadlines.

How a saga moves (domain/sagas.py has the state machine):
- StartSaga writes the saga (its first command due) and sends that command.
- Participants reply on the deployment's saga reply topic; every gateway instance of the deployment consumes
  it in one consumer group (through the shared ConsumerRunner), applies each reply and sends what follows.
- Each instance sweeps the database for actions past their deadline (re-sent, or timed out, which starts
  the compensations) and for changes whose record never reached Kafka (the instance died in between).

Ownership: each saga belongs to one partition of the reply topic (murmur2 of its id, stored with it), and
the instance whose consumer holds that partition drives it: it applies the saga's replies (a reply that
lands on another partition, from a participant that did not key it by saga id, is forwarded there) and
sweeps only the sagas of its partitions. Within an instance, reply batches and sweeps take turns (one
lock), each sending its records before the next begins. So a saga's records are sent in the order of its
changes, one driver at a time; a rebalance moves a partition's sagas to another instance.

Invariants:
- Every change is a compare-and-set on the saga's version (`SagaStore.save`); a record is sent only for a
  change this instance committed, after the commit. So even in the moment a partition moves between
  instances, each change is made by exactly one of them.
- A change's record is marked dispatched only once Kafka acknowledged it; until then the sweep sends it
  again after `dispatch_grace_ms` (same message id), so no command is lost to a crash.
- Redis holds nothing a saga needs: only StartSaga's idempotency keys and change notifications for
  watchers, who also poll. A restart of Redis or of every gateway loses no saga.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter, Histogram

from gateway.adapters.kafka import (
    LOW_LATENCY_CONSUMER,
    AsyncProducer,
    ConsumerRunner,
    FailurePolicy,
    KafkaAdmin,
    Record,
    TopicSpec,
)
from gateway.adapters.redis import ChangeFeed
from gateway.adapters.sql import SagaStore
from gateway.definitions import Definitions
from gateway.domain.dead_letters import SAGA_DLT, dlt_topic
from gateway.domain.events import partition_for
from gateway.domain.sagas import (
    CORRELATION_ID,
    Kind,
    Saga,
    SagaPlan,
    SagaStatus,
    StartRequest,
    StepReply,
    StepStatus,
    check_saga_id,
    on_deadline,
    on_reply,
    outgoing,
    parse_correlation,
    saga_id_for,
)
from gateway.domain.sagas import start as start_saga
from gateway.errors import (
    BackendUnavailable,
    IdempotencyKeyReused,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    RateLimited,
)
from gateway.services.dead_letter_writer import DEAD_LETTERS, DeadLetterWriter
from gateway.services.idempotency import Idempotency
from gateway.settings import KafkaSettings, SagasSettings
from gateway.tasks import bounded, raise_if_cancelling, spawn, stop_task

log = logging.getLogger(__name__)

SAGAS = Counter("kpg_sagas_total", "Sagas that entered a status", ["saga_type", "status"])
SAGA_SECONDS = Histogram(
    "kpg_saga_seconds",
    "From start to a final status",
    ["saga_type", "status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
STEP_SECONDS = Histogram(
    "kpg_saga_step_seconds",
    "From a step's first send to the reply that settled it",
    ["saga_type", "step", "outcome"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMPENSATIONS = Counter(
    "kpg_saga_compensations_total",
    "Compensations by outcome (started, completed, failed)",
    ["saga_type", "step", "outcome"],
)
TIMEOUTS = Counter(
    "kpg_saga_step_timeouts_total",
    "Action deadlines that passed: resent, or the step timed out for good (timed_out)",
    ["saga_type", "step", "outcome"],
)
REPLIES = Counter(
    "kpg_saga_replies_total",
    "Records on the saga reply topic, by outcome (applied, stale, unknown saga, uncorrelated)",
    ["outcome"],
)

MAX_CAS_ROUNDS = 5
SWEEP_BATCH = 500
MAX_UNANNOUNCED = 10_000
SAGA_CHANGES_CHANNEL = "kpg:sagas:changes"  # Redis pub/sub: ids of sagas that changed

Change = Callable[[Saga], Saga | None]


@dataclass(eq=False)
class _Watcher:
    """One WatchSaga stream on this instance."""

    last_version: int  # the last version it streamed
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    pushed: list[Saga] = field(default_factory=list)  # versions this instance committed, not streamed yet
    elsewhere: bool = False  # a change this instance did not make: read the history

    def known_version(self) -> int:
        return max([self.last_version, *(v.version for v in self.pushed)])


def _follows(version: int, versions: Sequence[Saga]) -> bool:
    """Whether `versions` continue `version` without a gap."""
    return all(v.version == version + i + 1 for i, v in enumerate(versions))


@dataclass(frozen=True, slots=True)
class SagaPage:
    sagas: list[Saga]
    next_page_token: str


class Sagas:
    def __init__(
        self,
        *,
        settings: SagasSettings,
        kafka: KafkaSettings,
        definitions: Definitions,
        admin: KafkaAdmin,
        store: SagaStore,
        changes: ChangeFeed,
        idempotency: Idempotency,
    ) -> None:
        self._settings = settings
        self._kafka = kafka
        self._admin = admin
        self._store = store
        self._changes = changes
        self._idempotency = idempotency
        self._plans = {name: SagaPlan.of(name, d) for name, d in definitions.sagas.items()}
        # Commands are small and each one holds up a saga: next to no linger.
        self._producer = AsyncProducer(kafka, **{"linger.ms": 1})
        self._reply_topic = ""
        self._reply_partitions = 1
        self._driving = asyncio.Lock()  # reply batches and sweeps take turns (see Ownership above)
        self._consumer: ConsumerRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._unannounced: dict[str, int] = {}  # saga id -> latest version, not yet published
        self._starting = asyncio.Lock()
        self._started = False
        self._watchers: dict[str, set[_Watcher]] = defaultdict(set)
        self._watching = 0

    # --- lifecycle ---------------------------------------------------------------------------------------

    def topics(self) -> list[TopicSpec]:
        """The saga dead-letter topic (the reply topic is named in start(), once the database answers)."""
        return [TopicSpec(SAGA_DLT, self._kafka.default_partitions)]

    async def start(self) -> None:
        """Create the tables and the reply topic, consume replies, sweep. Needs Kafka and the database.
        Idempotent; after a failure half-way the next call resumes."""
        async with self._starting:
            if self._started:
                return
            topic, group = await self._reply_names()
            partitions = self._settings.reply_topic_partitions
            await self._admin.ensure_topics(
                [TopicSpec(topic, partitions), TopicSpec(dlt_topic(topic), partitions), *self.topics()]
            )
            self._reply_topic = topic
            self._reply_partitions = await self._admin.partitions(topic) or partitions
            if self._consumer is None:
                self._consumer = ConsumerRunner(
                    self._kafka,
                    group_id=group,
                    topics=[topic],
                    handler=self._on_replies,
                    policy=FailurePolicy(dead_letter=DeadLetterWriter(self._producer)),
                    poll_timeout_s=0.1,
                    **LOW_LATENCY_CONSUMER,
                )
            await self._consumer.start()
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep_forever(), name="saga-sweeper")
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen(), name="saga-change-notifications")
            self._started = True
            log.info("sagas: replies on topic %s, consumer group %s", topic, group)

    async def _reply_names(self) -> tuple[str, str]:
        topic, group = self._settings.reply_topic, self._settings.reply_group
        if topic and group:
            await asyncio.to_thread(self._store.ensure_tables)
            return topic, group
        deployment = await asyncio.to_thread(self._store.deployment_id)
        return topic or f"kpg.sagas.{deployment}.replies", group or f"kpg-sagas-{deployment}"

    async def stop(self, timeout_s: float = 10.0) -> None:
        await stop_task(self._sweeper, 2.0)
        await stop_task(self._listener, 2.0)
        await stop_task(self._announcing, 1.0)
        if self._consumer is not None:
            await self._consumer.stop(timeout_s)
        await bounded(self._producer.close(timeout_s), timeout_s + 1.0, what="closing the saga producer")

    # --- the API -------------------------------------------------------------------------------------------

    async def start_saga(self, request: StartRequest) -> Saga:
        """Create the saga and send its first command. Idempotent by idempotency key and by saga id: the same
        request again returns the saga it started; a different one under the same key or id is refused."""
        plan = self._plan(request.saga_type)
        if not self._started:  # the reply topic, which every command names, is not known yet
            raise BackendUnavailable("sagas are starting: the reply topic is not known yet")
        if len(request.correlation_id) > 200 or not request.correlation_id.isprintable():
            raise InvalidArgument.field("correlation_id", "must be at most 200 printable characters")
        size = len(json.dumps(request.input, default=str).encode())
        if size > self._settings.max_input_bytes:
            raise PayloadTooLarge(
                f"the input is {size} bytes, more than {self._settings.max_input_bytes}",
                metadata={"field": "input", "limit": str(self._settings.max_input_bytes)},
            )
        saga_id = saga_id_for(request)
        created: list[Saga] = []

        async def create() -> str:
            created.append(await self._create(plan, saga_id, request))
            return saga_id

        await self._idempotency.run(
            "start-saga",
            request.idempotency_key,
            fingerprint=request.fingerprint(),
            action=create,
            encode=str.encode,
            decode=bytes.decode,
        )
        # Answered from the idempotency record: the saga as it is now.
        return created[0] if created else await self.get(saga_id)

    async def _create(self, plan: SagaPlan, saga_id: str, request: StartRequest) -> Saga:
        partition = partition_for(saga_id, self._reply_partitions)
        saga = start_saga(plan, saga_id, request, datetime.now(UTC), partition=partition)
        created = await asyncio.to_thread(self._store.create, saga)
        if created is None:
            existing = (await asyncio.to_thread(self._store.get, [saga_id])).get(saga_id)
            if existing is None:  # created and gone again cannot happen (no deletes): the database is odd
                raise BackendUnavailable(f"saga {saga_id} exists and cannot be read")
            if existing.fingerprint != saga.fingerprint:
                raise IdempotencyKeyReused(
                    f"saga {saga_id} was started by a different request",
                    metadata={"saga_id": saga_id, "idempotency_key": request.idempotency_key},
                )
            return existing
        SAGAS.labels(plan.saga_type, SagaStatus.RUNNING.value).inc()
        await self._dispatch([saga])
        await self._announce([saga])
        return saga

    async def get(self, saga_id: str) -> Saga:
        check_saga_id(saga_id)
        found = (await asyncio.to_thread(self._store.get, [saga_id])).get(saga_id)
        if found is None:
            raise NotFound(f"no saga {saga_id!r}", metadata={"saga_id": saga_id})
        return found

    async def list_sagas(self, *, saga_type: str, status: str, limit: int, page_token: str) -> SagaPage:
        """Sagas in start order, keyset-paged: a page never skips or repeats a saga as others start."""
        if limit > self._settings.list_max_limit:
            raise InvalidArgument.field("limit", f"must be at most {self._settings.list_max_limit}")
        if status and status not in SagaStatus.__members__:
            raise InvalidArgument.field("status", f"unknown status {status!r}")
        limit = limit or self._settings.list_default_limit
        after = _decode_token(page_token) if page_token else None
        rows = await asyncio.to_thread(
            self._store.page, saga_type=saga_type, status=status, after=after, limit=limit + 1
        )
        sagas = rows[:limit]
        token = _encode_token(sagas[-1]) if len(rows) > limit else ""
        return SagaPage(sagas, token)

    async def watch(self, saga_id: str) -> AsyncIterator[Saga]:
        """The saga's current state, then every version after it, ending after a final status. Arguments and
        existence are checked before this returns, so a bad call fails before a stream opens."""
        current = await self.get(saga_id)
        if self._watching >= self._settings.max_watchers:
            raise RateLimited(
                f"this gateway serves {self._settings.max_watchers} saga watchers already",
                retry_after_ms=1000,
                metadata={"limit": str(self._settings.max_watchers)},
            )
        return self._follow(current)

    async def _follow(self, current: Saga) -> AsyncIterator[Saga]:
        """Versions this instance commits are handed to the watcher as they are committed; the history is
        read only for a change made elsewhere (announced through Redis, or found by the poll) or a gap."""
        watcher = _Watcher(current.version)
        self._watching += 1  # counted from the first iteration: the finally below runs only once started
        self._watchers[current.saga_id].add(watcher)
        try:
            yield current
            last = current
            while not last.status.final:
                watcher.changed.clear()
                pushed = sorted(
                    (v for v in watcher.pushed if v.version > last.version), key=lambda v: v.version
                )
                watcher.pushed.clear()
                if _follows(last.version, pushed) and not watcher.elsewhere:
                    fresh = pushed
                else:
                    watcher.elsewhere = False
                    fresh = await asyncio.to_thread(self._store.history, current, last.version)
                for version in fresh:
                    yield version
                    last = version
                    watcher.last_version = version.version
                if last.status.final:
                    break
                try:
                    await asyncio.wait_for(watcher.changed.wait(), self._settings.watch_poll_ms / 1000)
                except TimeoutError:
                    watcher.elsewhere = True  # nothing announced: look, in case a notification was lost
        finally:
            self._watching -= 1
            watchers = self._watchers.get(current.saga_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[current.saga_id]

    def _plan(self, saga_type: str) -> SagaPlan:
        if not saga_type:
            raise InvalidArgument.field("saga_type", "is required")
        plan = self._plans.get(saga_type)
        if plan is None:
            raise NotFound(
                f"no saga type {saga_type!r} in the definitions", metadata={"saga_type": saga_type}
            )
        return plan

    # --- orchestration -------------------------------------------------------------------------------------

    async def _on_replies(self, records: Sequence[Record]) -> None:
        """Apply a batch of replies: per saga in arrival order, every saga of the batch in one transaction.
        A reply on another partition than its saga's is forwarded there, for that partition's owner."""
        now = datetime.now(UTC)
        replies: list[tuple[Record, str, Change]] = []
        for record in records:
            correlation = record.header(CORRELATION_ID)
            parsed = parse_correlation(correlation.decode(errors="replace")) if correlation else None
            if parsed is None:
                REPLIES.labels("uncorrelated").inc()
                continue
            saga_id, index, kind = parsed
            replies.append(
                (record, saga_id, self._reply_change(index, kind, StepReply.parse(record.value), now))
            )
        if not replies:
            return
        async with self._driving:
            found = await asyncio.to_thread(self._store.get, list({saga_id for _, saga_id, _ in replies}))
            changes: dict[str, list[Change]] = defaultdict(list)
            forwards: list[tuple[Record, Saga]] = []
            for record, saga_id, change in replies:
                saga = found.get(saga_id)
                if saga is None:
                    REPLIES.labels("unknown").inc()
                elif saga.partition != record.partition:
                    forwards.append((record, saga))
                else:
                    changes[saga_id].append(change)
            if forwards:
                await self._forward(forwards)
            if changes:
                await self._change(changes, replies=True, found=found)

    async def _forward(self, forwards: Sequence[tuple[Record, Saga]]) -> None:
        """Hand replies to their sagas' partitions, keyed by saga id; only once Kafka has them does the
        consumer move past the originals."""
        await asyncio.gather(
            *(
                self._producer.produce(
                    self._reply_topic,
                    record.value,
                    key=saga.saga_id.encode(),
                    headers=record.headers,
                    partition=saga.partition,
                )
                for record, saga in forwards
            )
        )
        REPLIES.labels("forwarded").inc(len(forwards))

    def _reply_change(self, index: int, kind: Kind, reply: StepReply, now: datetime) -> Change:
        def change(saga: Saga) -> Saga | None:
            plan = self._plans.get(saga.saga_type)
            if plan is None:
                log.warning(
                    "saga %s has type %s, no longer defined: reply ignored", saga.saga_id, saga.saga_type
                )
                return None
            return on_reply(plan, saga, index, kind, reply, now)

        return change

    def _deadline_change(self, now: datetime) -> Change:
        def change(saga: Saga) -> Saga | None:
            plan = self._plans.get(saga.saga_type)
            return None if plan is None else on_deadline(plan, saga, now)

        return change

    async def _change(
        self, changes: dict[str, list[Change]], *, replies: bool, found: dict[str, Saga] | None = None
    ) -> None:
        """Apply each saga's changes in order and commit them compare-and-set; a saga another instance moved
        meanwhile is read again and its changes re-applied to what it is now. Then send what is due.
        `replies`: the changes are replies (counted in kpg_saga_replies_total), not deadlines. `found`: the
        sagas as just read, if the caller has them. The caller holds the driving lock."""
        pending = dict(changes)
        committed: list[tuple[Saga, Saga]] = []  # (before, after) of each committed version
        for _ in range(MAX_CAS_ROUNDS):
            if not pending:
                break
            if found is None:
                found = await asyncio.to_thread(self._store.get, list(pending))
            versions: list[tuple[Saga, Saga]] = []
            for saga_id, fns in pending.items():
                saga = found.get(saga_id)
                if saga is None:
                    if replies:
                        REPLIES.labels("unknown").inc(len(fns))
                    continue
                for fn in fns:
                    after = fn(saga)
                    if after is None:
                        if replies:
                            REPLIES.labels("stale").inc()
                        continue
                    versions.append((saga, after))
                    saga = after
            written = {
                (s.saga_id, s.version)
                for s in await asyncio.to_thread(self._store.save, [a for _, a in versions])
            }
            lost = {a.saga_id for _, a in versions if (a.saga_id, a.version) not in written}
            committed += [
                (b, a) for b, a in versions if (a.saga_id, a.version) in written and a.saga_id not in lost
            ]
            pending = {saga_id: pending[saga_id] for saga_id in lost}
            found = None
        if pending:
            raise BackendUnavailable(f"{len(pending)} sagas kept changing under this instance; retrying")
        for before, after in committed:
            _observe(before, after)
        if replies:
            REPLIES.labels("applied").inc(len(committed))
        latest: dict[str, Saga] = {}
        for _, after in committed:
            latest[after.saga_id] = after
        await self._dispatch([s for s in latest.values() if not s.dispatched])
        await self._announce([after for _, after in committed])

    async def _dispatch(self, sagas: Sequence[Saga]) -> None:
        """Send each saga's due record and mark it dispatched once Kafka has it. A send that fails leaves its
        saga undispatched for the sweep (logged, not raised: the change itself is committed)."""
        sends = []
        for saga in sagas:
            plan = self._plans.get(saga.saga_type)
            record = None if plan is None else outgoing(plan, saga, reply_topic=self._reply_topic)
            if record is not None:
                sends.append(
                    (
                        saga,
                        self._producer.produce(
                            record.topic, record.value, key=record.key, headers=record.headers
                        ),
                    )
                )
        if not sends:
            return
        results = await asyncio.gather(*(send for _, send in sends), return_exceptions=True)
        done = []
        for (saga, _), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                log.warning(
                    "saga %s: record not sent yet (%s); the sweep sends it again", saga.saga_id, result
                )
            else:
                done.append((saga.saga_id, saga.version))
                if saga.status is SagaStatus.FAILED:
                    DEAD_LETTERS.labels(SAGA_DLT, "kpg-sagas").inc()
        try:
            await asyncio.to_thread(self._store.mark_dispatched, done)
        except BackendUnavailable as exc:
            log.warning("could not mark %d saga records sent (%s); they may be sent again", len(done), exc)

    async def _announce(self, versions: Sequence[Saga]) -> None:
        """Hand committed versions (in commit order) to this instance's watchers, and announce them to every
        other instance through Redis: in the background and best effort, so a slow or absent Redis never
        holds up a saga (watchers also poll). Versions committed while a publish is on its way go out
        together in the next one; at most MAX_UNANNOUNCED sagas wait."""
        for saga in versions:
            for watcher in self._watchers.get(saga.saga_id, ()):
                watcher.pushed.append(saga)
                watcher.changed.set()
            if saga.saga_id in self._unannounced or len(self._unannounced) < MAX_UNANNOUNCED:
                self._unannounced[saga.saga_id] = saga.version
        if self._unannounced and (self._announcing is None or self._announcing.done()):
            self._announcing = spawn(self._publish(), name="saga-announce")

    async def _publish(self) -> None:
        while self._unannounced:
            announced, self._unannounced = self._unannounced, {}
            try:
                await self._changes.publish(
                    [f"{saga_id}:{version}" for saga_id, version in announced.items()]
                )
            except BackendUnavailable as exc:
                log.debug("saga change notification not published: %s", exc)
                return

    async def _listen(self) -> None:
        """Wake the watchers of sagas another instance changed (this instance's own announcements come back
        too: a watcher that already has the version ignores them)."""
        while True:
            try:
                async for announced in self._changes.notifications():
                    for entry in announced:
                        saga_id, _, version = entry.rpartition(":")
                        for watcher in self._watchers.get(saga_id, ()):
                            if not version.isdecimal() or int(version) > watcher.known_version():
                                watcher.elsewhere = True
                                watcher.changed.set()
            except BackendUnavailable as exc:
                raise_if_cancelling()
                log.warning("saga change notifications: %s; resubscribing", exc)
                await asyncio.sleep(1.0)

    # --- sweeps --------------------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = self._settings.sweep_interval_ms / 1000
        last_dispatch_sweep = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_deadlines()
                if time.monotonic() - last_dispatch_sweep >= min(
                    1.0, self._settings.dispatch_grace_ms / 2000
                ):
                    await self.sweep_undispatched()
                    last_dispatch_sweep = time.monotonic()
            except BackendUnavailable as exc:
                raise_if_cancelling()
                log.warning("saga sweep: %s; retrying", exc)
                await asyncio.sleep(min(5.0, interval * 4))
            except Exception:
                raise_if_cancelling()
                log.exception("saga sweep failed; retrying")
                await asyncio.sleep(min(5.0, interval * 4))

    def owned_partitions(self) -> list[int]:
        """The reply-topic partitions this instance's consumer holds: the sagas it drives."""
        if self._consumer is None:
            return []
        assignment = set(self._consumer.assignment)  # a copy: the consumer thread updates it on rebalances
        return sorted(p for t, p in assignment if t == self._reply_topic)

    async def sweep_deadlines(self) -> int:
        """Handle every action of this instance's sagas past its deadline (re-send or time out); returns
        how many were due."""
        async with self._driving:
            owned = self.owned_partitions()
            if not owned:
                return 0
            now = datetime.now(UTC)
            due = await asyncio.to_thread(self._store.due, int(now.timestamp() * 1000), SWEEP_BATCH, owned)
            if due:
                change = self._deadline_change(now)
                await self._change(
                    {s.saga_id: [change] for s in due}, replies=False, found={s.saga_id: s for s in due}
                )
            return len(due)

    async def sweep_undispatched(self) -> int:
        """Send again the records of this instance's sagas' changes, older than the grace period, that never
        reached Kafka."""
        async with self._driving:
            owned = self.owned_partitions()
            if not owned:
                return 0
            before = datetime.now(UTC) - timedelta(milliseconds=self._settings.dispatch_grace_ms)
            stale = await asyncio.to_thread(self._store.undispatched, before, SWEEP_BATCH, owned)
            if stale:
                log.info("sending %d saga records again (their instance did not confirm them)", len(stale))
                await self._dispatch(stale)
            return len(stale)


def _observe(before: Saga, after: Saga) -> None:
    """Metrics of one committed change."""
    saga_type = after.saga_type
    if after.status is not before.status:
        SAGAS.labels(saga_type, after.status.value).inc()
        if after.status.final:
            SAGA_SECONDS.labels(saga_type, after.status.value).observe(
                (after.updated_at - after.started_at).total_seconds()
            )
    now_ms = int(after.updated_at.timestamp() * 1000)
    for old, new in zip(before.steps, after.steps, strict=True):
        if old == new:
            continue
        if old.status is StepStatus.RUNNING and new.status is not StepStatus.RUNNING:
            outcome = new.status.value.lower()
            if old.started_ms is not None:
                STEP_SECONDS.labels(saga_type, new.name, outcome).observe((now_ms - old.started_ms) / 1000)
            if new.status is StepStatus.TIMED_OUT:
                TIMEOUTS.labels(saga_type, new.name, "timed_out").inc()
        elif new.attempts > old.attempts:
            TIMEOUTS.labels(saga_type, new.name, "resent").inc()
        if new.status is StepStatus.COMPENSATING and old.status is not StepStatus.COMPENSATING:
            COMPENSATIONS.labels(saga_type, new.name, "started").inc()
        elif new.status is StepStatus.COMPENSATED and old.status is StepStatus.COMPENSATING:
            COMPENSATIONS.labels(saga_type, new.name, "completed").inc()
        elif new.compensation_attempts > old.compensation_attempts and old.compensation_attempts:
            TIMEOUTS.labels(saga_type, new.name, "compensation_resent").inc()
    if after.status is SagaStatus.FAILED and before.status is not SagaStatus.FAILED:
        COMPENSATIONS.labels(saga_type, after.steps[after.cursor].name, "failed").inc()


def _encode_token(saga: Saga) -> str:
    raw = json.dumps([saga.started_at.isoformat(), saga.saga_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        started, saga_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        moment = datetime.fromisoformat(started)
        if not isinstance(saga_id, str) or moment.tzinfo is None:
            raise ValueError(token)
        return moment, saga_id
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgument.field("page_token", "is not a token this gateway returned") from None
