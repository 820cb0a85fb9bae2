"""Declarative and Python handlers folding events into documents (pure: no Kafka, no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from gateway.definitions import DefinitionsError, HandlerDef, parse_definitions
from gateway.domain.events import StoredEvent
from gateway.domain.projections import EventView, HandlerFailed, fold
from gateway.services.read_models import compile_handlers

AT = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _event(
    event_type: str, data: Any, *, version: int = 1, content_type: str = "application/json"
) -> EventView:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return EventView.of(
        StoredEvent(
            "e-1", "orders", "order-1", version, event_type, raw, content_type, {}, AT, "orders.events", 0, 7
        )
    )


def _handler(body: dict[str, Any]) -> Any:
    return HandlerDef.model_validate(body).compile()


def test_the_contract_example_folds_an_order() -> None:
    placed = _handler({"set": {"customer": "$.customer", "total": "$.total", "status": "PLACED"}})
    added = _handler({"append": {"items": "$.item"}, "increment": {"item_count": 1}})
    shipped = _handler({"set": {"status": "SHIPPED", "shipped_at": "$event.recorded_at"}})
    archived = _handler({"delete": True})

    doc = fold(placed, None, _event("OrderPlaced", {"customer": "c-1", "total": 12.5}))
    doc = fold(added, doc, _event("ItemAdded", {"item": "apple"}, version=2))
    doc = fold(added, doc, _event("ItemAdded", {"item": "pear"}, version=3))
    doc = fold(shipped, doc, _event("OrderShipped", {}, version=4))
    assert doc == {
        "customer": "c-1",
        "total": 12.5,
        "status": "SHIPPED",
        "items": ["apple", "pear"],
        "item_count": 2,
        "shipped_at": "2026-11-23T12:00:00Z",
    }
    assert fold(archived, doc, _event("OrderArchived", {}, version=5)) is None


def test_nested_paths_envelope_fields_unset_and_expressions_inside_literals() -> None:
    handler = _handler(
        {
            "set": {"address.city": "$.to.city", "last": {"type": "$event.type", "v": "$event.version"}},
            "unset": ["draft", "nothing.here"],
            "increment": {"stats.weight": "$.kg"},
        }
    )
    doc = fold(
        handler, {"draft": True, "stats": {"weight": 1}}, _event("Moved", {"to": {"city": "Oslo"}, "kg": 2.5})
    )
    assert doc == {"address": {"city": "Oslo"}, "last": {"type": "Moved", "v": 1}, "stats": {"weight": 3.5}}


def test_the_input_document_is_never_mutated() -> None:
    before = {"items": ["a"], "n": 1}
    fold(_handler({"append": {"items": "$.x"}, "increment": {"n": 1}}), before, _event("T", {"x": "b"}))
    assert before == {"items": ["a"], "n": 1}


@pytest.mark.parametrize(
    ("body", "document", "data"),
    [
        ({"increment": {"n": "$.qty"}}, None, {"qty": "lots"}),  # not a number
        ({"increment": {"n": 1}}, {"n": "x"}, {}),  # the document holds a string
        ({"increment": {"n": "$.missing"}}, None, {}),  # a missing value is not 0
        ({"append": {"items": 1}}, {"items": {}}, {}),  # not a list
        ({"set": {"a.b": 1}}, {"a": 5}, {}),  # a scalar in the way
    ],
)
def test_bad_data_fails_the_event(body: dict[str, Any], document: dict[str, Any] | None, data: Any) -> None:
    with pytest.raises(HandlerFailed):
        fold(_handler(body), document, _event("T", data))


def test_invalid_json_data_fails_the_event() -> None:
    with pytest.raises(HandlerFailed, match="not valid JSON"):
        _event("T", b"{oops")


def test_python_handlers_fail_cleanly() -> None:
    def boom(document: Any, event: EventView) -> Any:
        raise KeyError("customer")

    with pytest.raises(HandlerFailed, match="KeyError"):
        fold(boom, None, _event("T", {}))
    with pytest.raises(HandlerFailed, match="not a dict"):
        fold(lambda d, e: cast("dict[str, Any]", [1]), None, _event("T", {}))
    with pytest.raises(HandlerFailed, match="not JSON"):
        fold(lambda d, e: {"at": e.recorded_at}, None, _event("T", {}))
    assert fold(lambda d, e: {"type": e.type, "data": e.data}, None, _event("T", {"a": 1})) == {
        "type": "T",
        "data": {"a": 1},
    }


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (
            {"set": {"x": "$event.nope"}},
            "read_models.m.handlers.T.set.x: unknown envelope field '$event.nope'",
        ),
        ({"set": {"x": "$.a..b"}}, "is not a path like $.a.b"),
        ({"set": {"bad key!": 1}}, "must be a dotted path"),
        ({"delete": True, "set": {"x": 1}}, "cannot be combined"),
    ],
)
def test_bad_handlers_stop_start_up_naming_the_key(handler: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionsError, match=r"read_models\.m\.handlers\.T") as raised:
        parse_definitions(
            {"categories": {"c": None}, "read_models": {"m": {"category": "c", "handlers": {"T": handler}}}}
        )
    assert message.split(": ", 1)[-1] in str(raised.value)


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        ("no_such_module_xyz:f", "cannot load"),
        ("json:no_such_function", "cannot load"),
        ("json:__doc__", "not callable"),
    ],
)
def test_a_python_handler_that_cannot_be_loaded_stops_start_up(reference: str, problem: str) -> None:
    definitions = parse_definitions(
        {"categories": {"c": None}, "read_models": {"m": {"category": "c", "python": reference}}}
    )
    with pytest.raises(DefinitionsError, match=r"read_models\.m\.python: ") as raised:
        compile_handlers("m", definitions.read_models["m"])
    assert problem in str(raised.value)


def test_a_python_handler_gets_every_event_type() -> None:
    definitions = parse_definitions(
        {
            "categories": {"c": None},
            "read_models": {"m": {"category": "c", "python": "tests.e2e.projections:tally"}},
        }
    )
    handler_for = compile_handlers("m", definitions.read_models["m"])
    handler = handler_for("Anything")
    assert handler is not None and handler is handler_for("Else")
    assert fold(handler, None, _event("Anything", {})) == {"events": 1, "types": {"Anything": 1}}
