"""Folding events into read-model documents: declarative handlers and Python handlers.

A document is the JSON object of one stream (its key is the stream id). A handler turns (document or
None, event) into the new document, or None to delete it. Handlers are pure: the projection engine
retries a failing one and, past its attempts, sends the event to the dead-letter topic.

Expressions (contract, "Definitions file"): `$.a.b` reads the event's JSON data (`$` is all of it),
`$event.type`, `$event.version`, `$event.stream_id`, `$event.recorded_at` (and `$event.event_id`,
`$event.category`) read the envelope; anything else is a literal. Strings, lists and mappings are
evaluated all the way down, so `{set: {last: {type: $event.type, at: $event.recorded_at}}}` works.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.domain.events import StoredEvent, is_json

ENVELOPE_FIELDS = frozenset({"type", "version", "stream_id", "recorded_at", "event_id", "category"})
_MISSING = object()


class HandlerFailed(Exception):
    """This event cannot be folded (bad data, or an exception in user code)."""


@dataclass(frozen=True, slots=True)
class EventView:
    """What a handler sees of an event: the envelope, and `data` parsed when it is JSON."""

    type: str
    data: Any
    stream_id: str
    version: int
    recorded_at: datetime
    event_id: str
    category: str
    metadata: Mapping[str, str]

    @classmethod
    def of(cls, event: StoredEvent) -> EventView:
        data: Any = None
        if is_json(event.content_type) and event.data:
            try:
                data = json.loads(event.data)
            except ValueError as exc:
                raise HandlerFailed(f"the event's data is not valid JSON: {exc}") from exc
        return cls(
            type=event.type,
            data=data,
            stream_id=event.stream_id,
            version=event.version,
            recorded_at=event.recorded_at,
            event_id=event.event_id,
            category=event.category,
            metadata=event.metadata,
        )

    def envelope(self, name: str) -> Any:
        if name == "recorded_at":
            return self.recorded_at.isoformat().replace("+00:00", "Z")
        return getattr(self, name)


def check_expression(value: Any, where: str) -> None:
    """Reject `$event.<unknown>` and malformed `$.` paths when the definitions file is loaded."""
    if isinstance(value, str):
        if value.startswith("$event."):
            name = value.removeprefix("$event.")
            if name not in ENVELOPE_FIELDS:
                raise ValueError(
                    f"{where}: unknown envelope field {value!r} (one of {', '.join(sorted(ENVELOPE_FIELDS))})"
                )
        elif value.startswith("$.") and not all(value[2:].split(".")):
            raise ValueError(f"{where}: {value!r} is not a path like $.a.b")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            check_expression(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_expression(item, f"{where}[{i}]")


def evaluate(expression: Any, event: EventView) -> Any:
    if isinstance(expression, str):
        if expression == "$":
            return copy.deepcopy(event.data)
        if expression.startswith("$."):
            found = _get(event.data, expression[2:].split("."))
            return None if found is _MISSING else copy.deepcopy(found)
        if expression.startswith("$event."):
            return event.envelope(expression.removeprefix("$event."))
        return expression
    if isinstance(expression, Mapping):
        return {key: evaluate(value, event) for key, value in expression.items()}
    if isinstance(expression, list):
        return [evaluate(item, event) for item in expression]
    return expression


def _get(value: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _parent(document: dict[str, Any], field: str, *, create: bool) -> tuple[dict[str, Any] | None, str]:
    *parents, last = field.split(".")
    node: Any = document
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            if not create:
                return None, last
            if child is not None:
                raise HandlerFailed(f"{field}: {part!r} is not an object in the document")
            child = node[part] = {}
        node = child
    return node, last


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class DeclarativeHandler:
    """`set`, `unset`, `increment`, `append` (applied in that order) or `delete`."""

    set: Mapping[str, Any]
    unset: tuple[str, ...]
    increment: Mapping[str, Any]
    append: Mapping[str, Any]
    delete: bool

    def __call__(self, document: dict[str, Any] | None, event: EventView) -> dict[str, Any] | None:
        if self.delete:
            return None
        result = copy.deepcopy(document) if document is not None else {}
        for field, expression in self.set.items():
            parent, name = _parent(result, field, create=True)
            assert parent is not None
            parent[name] = evaluate(expression, event)
        for field in self.unset:
            parent, name = _parent(result, field, create=False)
            if parent is not None:
                parent.pop(name, None)
        for field, expression in self.increment.items():
            amount = evaluate(expression, event)
            parent, name = _parent(result, field, create=True)
            assert parent is not None
            current = parent.get(name, 0)
            if not _is_number(amount) or not _is_number(current):
                raise HandlerFailed(f"increment {field}: {current!r} + {amount!r} is not a sum of numbers")
            parent[name] = current + amount
        for field, expression in self.append.items():
            parent, name = _parent(result, field, create=True)
            assert parent is not None
            current = parent.setdefault(name, [])
            if not isinstance(current, list):
                raise HandlerFailed(f"append {field}: the document holds {current!r}, not a list")
            current.append(evaluate(expression, event))
        return result


Handler = Callable[[dict[str, Any] | None, EventView], dict[str, Any] | None]


def fold(handler: Handler, document: dict[str, Any] | None, event: EventView) -> dict[str, Any] | None:
    """Run a handler, turning any failure into HandlerFailed, and check it returned a JSON object."""
    try:
        result = handler(copy.deepcopy(document), event)
    except HandlerFailed:
        raise
    except Exception as exc:
        raise HandlerFailed(f"{type(exc).__name__}: {exc}") from exc
    if result is None:
        return None
    if not isinstance(result, dict):
        raise HandlerFailed(f"the handler returned {type(result).__name__}, not a dict or None")
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise HandlerFailed(f"the handler returned a document that is not JSON: {exc}") from exc
    return result
