"""The definitions file (YAML): categories, read models, sagas, request-reply topics and dead-letter targets.

Loaded once at start-up into frozen, validated objects. Any problem stops start-up with a
`DefinitionsError` whose message names the offending key (for example
`read_models.order_summary.category`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.domain.dead_letters import SAGA_DLT, dlt_source, never_a_target
from gateway.domain.projections import DeclarativeHandler, check_expression

# Always matched with fullmatch: `$` would also accept a trailing newline ("orders\n").
NAME_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,200}")
# Kafka's own rule for topic names.
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
PYTHON_REF_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
FIELD_PART_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,100}")


class DefinitionsError(ValueError):
    """The definitions file is missing, unreadable or invalid; the message names the bad key."""


class _Def(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def check_category_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"category {name!r} must be 1-200 characters of [A-Za-z0-9._:@-]")
    if name.startswith(("kpg.", "_")):
        raise ValueError(f"category {name!r} must not start with 'kpg.' or '_'")
    return name


def check_topic_name(topic: str) -> str:
    if not TOPIC_PATTERN.fullmatch(topic) or topic in {".", ".."}:
        raise ValueError(f"topic {topic!r} is not a valid Kafka topic name")
    return topic


class CategoryDef(_Def):
    topic: str | None = None
    partitions: int | None = Field(default=None, ge=1, le=10_000)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        return None if value is None else check_topic_name(value)


class HandlerDef(_Def):
    """Declarative fold of one event type into a read-model document."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    set_: dict[str, Any] = Field(default_factory=dict, alias="set")
    unset: list[str] = Field(default_factory=list)
    increment: dict[str, Any] = Field(default_factory=dict)
    append: dict[str, Any] = Field(default_factory=dict)
    delete: bool = False

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not (self.set_ or self.unset or self.increment or self.append or self.delete):
            raise ValueError("a handler needs at least one of set, unset, increment, append, delete")
        if self.delete and (self.set_ or self.unset or self.increment or self.append):
            raise ValueError("delete removes the document: it cannot be combined with other operations")
        for operation, fields in (("set", self.set_), ("increment", self.increment), ("append", self.append)):
            for field, expression in fields.items():
                check_field_path(field, f"{operation}.{field}")
                check_expression(expression, f"{operation}.{field}")
        for field in self.unset:
            check_field_path(field, f"unset.{field}")
        return self

    def compile(self) -> DeclarativeHandler:
        return DeclarativeHandler(
            set=self.set_,
            unset=tuple(self.unset),
            increment=self.increment,
            append=self.append,
            delete=self.delete,
        )


def check_field_path(field: str, where: str) -> None:
    if not all(FIELD_PART_PATTERN.fullmatch(part) for part in field.split(".")):
        raise ValueError(f"{where}: {field!r} must be a dotted path of names of [A-Za-z0-9_-]")


class ReadModelDef(_Def):
    category: str
    handlers: dict[str, HandlerDef] | None = None
    python: str | None = None

    @field_validator("python")
    @classmethod
    def _python(cls, value: str | None) -> str | None:
        if value is not None and not PYTHON_REF_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} must look like 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.handlers is None) == (self.python is None):
            raise ValueError("a read model needs exactly one of 'handlers' or 'python'")
        return self


class SagaStepDef(_Def):
    name: str = Field(min_length=1, max_length=200)
    topic: str
    command: str = Field(min_length=1, max_length=200)
    compensation: str | None = Field(default=None, min_length=1, max_length=200)
    timeout_ms: int | None = Field(default=None, ge=1)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return check_topic_name(value)


class SagaDef(_Def):
    step_timeout_ms: int = Field(default=30_000, ge=1)
    # Sends of a step's command before it counts as timed out (each waits the step's timeout).
    max_attempts: int = Field(default=3, ge=1)
    # Sends of a compensation (after a timeout or an error reply) before the saga ends FAILED.
    compensation_max_attempts: int = Field(default=5, ge=1)
    # Pause before a compensation that replied with an error is sent again.
    retry_backoff_ms: int = Field(default=1_000, ge=0)
    steps: list[SagaStepDef] = Field(min_length=1)

    @field_validator("steps")
    @classmethod
    def _unique_names(cls, steps: list[SagaStepDef]) -> list[SagaStepDef]:
        names = [step.name for step in steps]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"step names must be unique, repeated: {', '.join(duplicates)}")
        return steps


class RequestReplyDef(_Def):
    # Allowlist of request topics; `*` and `?` are wildcards.
    topics: list[str] = Field(default_factory=list)

    def allows(self, topic: str) -> bool:
        return any(fnmatch.fnmatchcase(topic, pattern) for pattern in self.topics)

    def literal_topics(self) -> list[str]:
        return [t for t in self.topics if not any(c in t for c in "*?[")]


class DeadLettersDef(_Def):
    # Topics dead letters may be reprocessed to besides the topic their DLT is named after (and, for
    # `kpg.sagas.DLT`, the saga step topics); `*` and `?` are wildcards. Internal topics never.
    targets: list[str] = Field(default_factory=list)


class Definitions(_Def):
    categories: dict[str, CategoryDef] = Field(default_factory=dict)
    read_models: dict[str, ReadModelDef] = Field(default_factory=dict)
    sagas: dict[str, SagaDef] = Field(default_factory=dict)
    request_reply: RequestReplyDef = RequestReplyDef()
    dead_letters: DeadLettersDef = DeadLettersDef()
    allow_undeclared_categories: bool = False

    @field_validator("categories", mode="before")
    @classmethod
    def _categories(cls, value: Any) -> Any:
        # `orders:` with no body declares a category with every default.
        if isinstance(value, Mapping):
            for name in value:
                try:
                    check_category_name(str(name))
                except ValueError as exc:
                    raise _KeyedError(f"categories.{name}", str(exc)) from None
            return {name: body if body is not None else {} for name, body in value.items()}
        return value

    @model_validator(mode="after")
    def _references(self) -> Self:
        if not self.allow_undeclared_categories:
            for name, model in self.read_models.items():
                if model.category not in self.categories:
                    raise _KeyedError(
                        f"read_models.{name}.category",
                        f"unknown category {model.category!r} (declare it under 'categories')",
                    )
        event_topics = {self.category_topic(c) for c in self.categories}
        for name, saga in self.sagas.items():
            for i, step in enumerate(saga.steps):
                topic = step.topic
                if (
                    topic in event_topics
                    or topic.endswith((".events", ".DLT"))
                    or topic.startswith(("kpg.", "_"))
                ):
                    raise _KeyedError(
                        f"sagas.{name}.steps.{i}.topic",
                        f"{topic!r} is an event, dead-letter or internal topic: not for commands",
                    )
        return self

    def replay_allowed(self, dlt: str, target: str) -> bool:
        """Whether records of the dead-letter topic `dlt` may be reprocessed to `target`: the topic `dlt`
        is named after, a saga step topic for the saga DLT, or one `dead_letters.targets` names; never an
        internal (`kpg.*`, `_*`) or dead-letter topic."""
        if not target or never_a_target(target):
            return False
        if target == dlt_source(dlt) or any(
            fnmatch.fnmatchcase(target, pattern) for pattern in self.dead_letters.targets
        ):
            return True
        return dlt == SAGA_DLT and any(
            step.topic == target for saga in self.sagas.values() for step in saga.steps
        )

    def category_topic(self, category: str) -> str:
        declared = self.categories.get(category)
        return (declared.topic if declared and declared.topic else None) or f"{category}.events"

    def topics_to_create(self, default_partitions: int) -> dict[str, int]:
        """Every topic the file names, with its partition count."""
        topics: dict[str, int] = {}
        for name, category in self.categories.items():
            topics[self.category_topic(name)] = category.partitions or default_partitions
        for saga in self.sagas.values():
            for step in saga.steps:
                topics.setdefault(step.topic, default_partitions)
        for topic in self.request_reply.literal_topics():
            topics.setdefault(topic, default_partitions)
        return topics


class _KeyedError(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


def parse_definitions(document: Any, *, source: str = "definitions") -> Definitions:
    if document is None:
        document = {}
    if not isinstance(document, Mapping):
        raise DefinitionsError(f"{source}: the top level must be a mapping of keys")
    try:
        return Definitions.model_validate(document)
    except ValidationError as exc:
        raise DefinitionsError(f"{source}: {_describe(exc)}") from None


def load_definitions(path: Path | None) -> Definitions:
    """Read and validate the file; `None` gives empty definitions."""
    if path is None:
        return Definitions()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionsError(f"cannot read definitions file {path}: {exc.strerror or exc}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DefinitionsError(f"{path}: not valid YAML: {exc}") from None
    return parse_definitions(document, source=str(path))


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"] if part != "set_")
        message = str(error["msg"]).removeprefix("Value error, ")
        context = error.get("ctx", {}).get("error")
        if isinstance(context, _KeyedError):
            problems.append(str(context))
        elif loc:
            problems.append(f"{loc}: {message}")
        else:
            problems.append(message)
    return "; ".join(problems)
