from __future__ import annotations

from pathlib import Path

import pytest

from gateway.definitions import DefinitionsError, load_definitions, parse_definitions


def test_example_file_loads_with_its_topics(repo_root: Path) -> None:
    definitions = load_definitions(repo_root / "examples" / "definitions.yaml")

    assert definitions.category_topic("orders") == "orders.events"
    assert definitions.read_models["order_summary"].handlers is not None
    assert [s.name for s in definitions.sagas["place_order"].steps] == [
        "reserve_stock",
        "charge_payment",
        "confirm_order",
    ]
    assert definitions.request_reply.allows("pricing.quotes")
    assert not definitions.request_reply.allows("payments.requests")
    assert definitions.topics_to_create(default_partitions=3) == {
        "orders.events": 6,
        "inventory.commands": 3,
        "payment.commands": 3,
        "orders.commands": 3,
        "inventory.requests": 3,
    }


def test_default_topic_is_category_dot_events() -> None:
    definitions = parse_definitions({"categories": {"carts": None}})
    assert definitions.category_topic("carts") == "carts.events"
    assert definitions.topics_to_create(default_partitions=4) == {"carts.events": 4}


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"read_models": {"m": {"category": "ghost", "python": "a.b:c"}}}, "read_models.m.category"),
        ({"categories": {"kpg.internal": {}}}, "categories.kpg.internal"),
        ({"categories": {"orders": {"partitions": 0}}}, "categories.orders.partitions"),
        ({"categories": {"orders": {"topic": "bad topic"}}}, "categories.orders.topic"),
        ({"surprise": 1}, "surprise"),
        ({"categories": {"o": {}}, "read_models": {"m": {"category": "o"}}}, "read_models.m"),
        (
            {
                "categories": {"o": {}},
                "read_models": {"m": {"category": "o", "handlers": {"E": {"sett": {}}}}},
            },
            "read_models.m.handlers.E.sett",
        ),
        (
            {"categories": {"o": {}}, "read_models": {"m": {"category": "o", "python": "no-colon"}}},
            "read_models.m.python",
        ),
        ({"sagas": {"s": {"steps": []}}}, "sagas.s.steps"),
        ({"sagas": {"s": {"steps": [{"name": "a", "topic": "t", "command": "C"}] * 2}}}, "sagas.s.steps"),
        (
            {"sagas": {"s": {"max_attempts": 0, "steps": [{"name": "a", "topic": "t", "command": "C"}]}}},
            "sagas.s.max_attempts",
        ),
        ({"request_reply": {"topics": "not-a-list"}}, "request_reply.topics"),
        (
            {
                "categories": {"o": {}},
                "sagas": {"s": {"steps": [{"name": "a", "topic": "o.events", "command": "C"}]}},
            },
            "sagas.s.steps.0.topic",
        ),
        (
            {"sagas": {"s": {"steps": [{"name": "a", "topic": "kpg.sagas.x", "command": "C"}]}}},
            "sagas.s.steps.0.topic",
        ),
        (
            {"sagas": {"s": {"steps": [{"name": "a", "topic": "x.DLT", "command": "C"}]}}},
            "sagas.s.steps.0.topic",
        ),
        (
            {
                "sagas": {
                    "s": {
                        "compensation_max_attempts": 0,
                        "steps": [{"name": "a", "topic": "t", "command": "C"}],
                    }
                }
            },
            "sagas.s.compensation_max_attempts",
        ),
    ],
)
def test_invalid_definitions_name_the_bad_key(document: dict[str, object], key: str) -> None:
    with pytest.raises(DefinitionsError) as raised:
        parse_definitions(document)
    assert f"{key}:" in str(raised.value)


def test_undeclared_categories_can_be_allowed() -> None:
    definitions = parse_definitions(
        {"allow_undeclared_categories": True, "read_models": {"m": {"category": "ghost", "python": "a.b:c"}}}
    )
    assert definitions.read_models["m"].category == "ghost"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(DefinitionsError, match="cannot read definitions file"):
        load_definitions(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("categories: [unclosed\n")
    with pytest.raises(DefinitionsError, match="not valid YAML"):
        load_definitions(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(DefinitionsError, match="top level must be a mapping"):
        load_definitions(scalar)
