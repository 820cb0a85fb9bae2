"""Read-model documents on SQLite (JSON1) and PostgreSQL (JSONB): the same answers from both."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import MetaData, Table, event, insert, inspect, text, update
from sqlalchemy.engine import make_url

from gateway.adapters.sql.database import Database
from gateway.adapters.sql.documents import (
    DocumentRow,
    FieldFilter,
    Page,
    count_documents,
    document_table,
    get_document,
    query_documents,
)
from gateway.errors import InvalidArgument

pytestmark = pytest.mark.integration

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'documents.db'}")
    else:
        db = Database(request.getfixturevalue("postgres_url"))
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
def table(database: Database, unique: str) -> Iterator[Table]:
    metadata = MetaData()
    docs = document_table(metadata, f"it_docs_{unique}")
    metadata.create_all(database.engine)
    try:
        yield docs
    finally:
        metadata.drop_all(database.engine)


def put(database: Database, table: Table, docs: dict[str, dict[str, Any]], *, version: int = 1) -> None:
    rows = [
        {
            "key": key,
            "data": data,
            "version": version + i,
            "position": f"0:{i}",
            "partition": 0,
            "offset": i,
            "updated_at": EPOCH + timedelta(seconds=i),
        }
        for i, (key, data) in enumerate(docs.items())
    ]
    with database.engine.begin() as connection:
        connection.execute(insert(table), rows)


def query(
    database: Database,
    table: Table,
    *filters: FieldFilter,
    order_by: str = "",
    descending: bool = False,
    limit: int = 0,
    page_token: str = "",
) -> Page:
    with database.engine.connect() as connection:
        return query_documents(
            connection,
            table,
            filters=filters,
            order_by=order_by,
            descending=descending,
            limit=limit,
            page_token=page_token,
        )


def keys(page: Page) -> list[str]:
    return [row.key for row in page.rows]


def matching(database: Database, table: Table, field: str, op: str, value: Any) -> set[str]:
    page = query(database, table, FieldFilter(field, op, value), limit=1000)
    assert page.next_page_token == ""
    return set(keys(page))


# One field, many JSON types: typed comparisons must not mix them up.
TYPED: dict[str, dict[str, Any]] = {
    "int-2": {"v": 2},
    "float-2": {"v": 2.0},
    "int-10": {"v": 10},
    "float-2.5": {"v": 2.5},
    "neg": {"v": -1},
    "big": {"v": 1e3},
    "str-2": {"v": "2"},
    "str-10": {"v": "10"},
    "str-apple": {"v": "apple"},
    "str-Banana": {"v": "Banana"},
    "true": {"v": True},
    "false": {"v": False},
    "null": {"v": None},
    "object": {"v": {"a": 1}},
    "array": {"v": [2]},
    "missing": {"other": 2},
}
PRESENT = set(TYPED) - {"missing"}


def test_eq_and_ne_compare_typed_values(database: Database, table: Table) -> None:
    put(database, table, TYPED)
    assert matching(database, table, "v", "EQ", 2) == {"int-2", "float-2"}
    assert matching(database, table, "v", "EQ", 2.0) == {"int-2", "float-2"}
    assert matching(database, table, "v", "EQ", "2") == {"str-2"}
    assert matching(database, table, "v", "EQ", 1) == set()  # true is not 1
    assert matching(database, table, "v", "EQ", 0) == set()  # false is not 0
    assert matching(database, table, "v", "EQ", True) == {"true"}
    assert matching(database, table, "v", "EQ", False) == {"false"}
    assert matching(database, table, "v", "EQ", None) == {"null"}
    assert matching(database, table, "v", "EQ", "apple") == {"str-apple"}
    assert matching(database, table, "v", "EQ", "APPLE") == set()
    # NE: every document that has the field (null, objects and arrays included), but not a missing one.
    assert matching(database, table, "v", "NE", 2) == PRESENT - {"int-2", "float-2"}
    assert matching(database, table, "v", "NE", True) == PRESENT - {"true"}
    assert matching(database, table, "v", "NE", None) == PRESENT - {"null"}
    assert matching(database, table, "v", "NE", "apple") == PRESENT - {"str-apple"}


def test_range_ops_compare_numbers_numerically_and_strings_lexically(
    database: Database, table: Table
) -> None:
    put(database, table, TYPED)
    assert matching(database, table, "v", "LT", 10) == {"int-2", "float-2", "float-2.5", "neg"}
    assert matching(database, table, "v", "LTE", 10) == {"int-2", "float-2", "float-2.5", "neg", "int-10"}
    assert matching(database, table, "v", "GT", 2) == {"float-2.5", "int-10", "big"}
    assert matching(database, table, "v", "GTE", 2) == {"int-2", "float-2", "float-2.5", "int-10", "big"}
    assert matching(database, table, "v", "GT", 2.4) == {"float-2.5", "int-10", "big"}
    assert matching(database, table, "v", "LT", -1) == set()
    # Strings: "10" < "2" and "Banana" < "apple" (code points, not numbers, not a locale).
    assert matching(database, table, "v", "LT", "2") == {"str-10"}
    assert matching(database, table, "v", "GTE", "2") == {"str-2", "str-apple", "str-Banana"}
    assert matching(database, table, "v", "LT", "a") == {"str-2", "str-10", "str-Banana"}
    assert matching(database, table, "v", "GT", "Banana") == {"str-apple"}
    assert matching(database, table, "v", "LTE", "Banana") == {"str-2", "str-10", "str-Banana"}


def test_in_matches_any_listed_value_of_the_same_type(database: Database, table: Table) -> None:
    put(database, table, TYPED)
    assert matching(database, table, "v", "IN", [10, "apple"]) == {"int-10", "str-apple"}
    assert matching(database, table, "v", "IN", [2.0, "10"]) == {"int-2", "float-2", "str-10"}
    assert matching(database, table, "v", "IN", [True, None]) == {"true", "null"}
    assert matching(database, table, "v", "IN", [False]) == {"false"}
    assert matching(database, table, "v", "IN", [1, 0, "x"]) == set()
    assert matching(database, table, "v", "IN", list(range(100, 1100))) == {"big"}


def test_booleans(database: Database, table: Table) -> None:
    put(database, table, {"a": {"paid": True}, "b": {"paid": False}, "c": {"paid": 1}, "d": {}})
    assert matching(database, table, "paid", "EQ", True) == {"a"}
    assert matching(database, table, "paid", "EQ", False) == {"b"}
    assert matching(database, table, "paid", "NE", True) == {"b", "c"}
    assert matching(database, table, "paid", "EQ", 1) == {"c"}


def test_nested_paths(database: Database, table: Table) -> None:
    put(
        database,
        table,
        {
            "paris": {"customer": {"address": {"city": "Paris", "zip": 75001}}},
            "lyon": {"customer": {"address": {"city": "Lyon", "zip": 69001}}},
            "flat": {"customer": "Paris"},
            "dotted": {"customer.address.city": "Paris"},
            "array": {"customer": [{"address": {"city": "Paris"}}]},
            "digits": {"items": {"0": "first"}},
            "list": {"items": ["first"]},
            "dash": {"a-b": {"c_d": 5}},
        },
    )
    assert matching(database, table, "customer.address.city", "EQ", "Paris") == {"paris"}
    assert matching(database, table, "customer.address.city", "NE", "Paris") == {"lyon"}
    assert matching(database, table, "customer.address.zip", "GT", 70000) == {"paris"}
    assert matching(database, table, "customer", "EQ", "Paris") == {"flat"}
    # A digit part names an object key, never an array slot (the same on both databases).
    assert matching(database, table, "items.0", "EQ", "first") == {"digits"}
    assert matching(database, table, "a-b.c_d", "GTE", 5) == {"dash"}


def test_a_missing_field_matches_no_filter(database: Database, table: Table) -> None:
    put(database, table, {"has": {"a": {"b": 1}}, "lacks": {"a": {}}, "scalar": {"a": 3}, "empty": {}})
    for op, value in [
        ("EQ", 1),
        ("NE", 1),
        ("NE", None),
        ("LT", 100),
        ("GTE", -100),
        ("IN", [1, 2]),
        ("PREFIX", ""),
        ("LT", "zzz"),
    ]:
        found = matching(database, table, "a.b", op, value)
        assert found <= {"has"}, (op, value, found)
    assert matching(database, table, "a.b", "NE", 2) == {"has"}
    assert matching(database, table, "nowhere", "NE", 1) == set()


def test_prefix_is_case_sensitive_and_literal(database: Database, table: Table) -> None:
    put(
        database,
        table,
        {
            "pct-us": {"s": "50%_off"},
            "pct-x": {"s": "50%Xoff"},
            "us": {"s": "50_off"},
            "five": {"s": "5000"},
            "number": {"s": 50},
            "star-lower": {"s": "a*b"},
            "star-upper": {"s": "A*b"},
            "ab": {"s": "aXb"},
            "bracket": {"s": "[x]y"},
            "x": {"s": "xy"},
            "question": {"s": "?q"},
            "accent": {"s": "élan"},
        },
    )
    assert matching(database, table, "s", "PREFIX", "50%_") == {"pct-us"}
    assert matching(database, table, "s", "PREFIX", "50%") == {"pct-us", "pct-x"}
    assert matching(database, table, "s", "PREFIX", "50_") == {"us"}
    assert matching(database, table, "s", "PREFIX", "50") == {"pct-us", "pct-x", "us", "five"}
    assert matching(database, table, "s", "PREFIX", "a*") == {"star-lower"}
    assert matching(database, table, "s", "PREFIX", "A") == {"star-upper"}
    assert matching(database, table, "s", "PREFIX", "a") == {"star-lower", "ab"}
    assert matching(database, table, "s", "PREFIX", "[x") == {"bracket"}
    assert matching(database, table, "s", "PREFIX", "?") == {"question"}
    assert matching(database, table, "s", "PREFIX", "él") == {"accent"}
    assert matching(database, table, "s", "PREFIX", "50%_off and more") == set()
    assert len(matching(database, table, "s", "PREFIX", "")) == 11  # every string, not the number


def test_values_are_bound_not_spliced(database: Database, table: Table) -> None:
    put(database, table, {"quote": {"s": "x' OR '1'='1"}, "other": {"s": "y"}})
    assert matching(database, table, "s", "EQ", "x' OR '1'='1") == {"quote"}
    assert matching(database, table, "s", "EQ", "' OR '1'='1") == set()
    assert matching(database, table, "s", "PREFIX", "x'") == {"quote"}


ORDERED: dict[str, dict[str, Any]] = {
    "n-10": {"o": 10},
    "n-2": {"o": 2},
    "n-2.5": {"o": 2.5},
    "n-neg": {"o": -3},
    "s-b": {"o": "b"},
    "s-B": {"o": "B"},
    "s-10": {"o": "10"},
    "t": {"o": True},
    "f": {"o": False},
    "null": {"o": None},
    "obj": {"o": {"x": 1}},
    "missing-1": {},
    "missing-2": {"p": 1},
    "tie-2": {"o": 2},
}


def test_order_by_a_field_sorts_missing_last_in_both_directions(database: Database, table: Table) -> None:
    put(database, table, ORDERED)
    last = ["missing-1", "missing-2", "null", "obj"]
    ascending = ["n-neg", "n-2", "tie-2", "n-2.5", "n-10", "s-10", "s-B", "s-b", "f", "t"]
    assert keys(query(database, table, order_by="o")) == [*ascending, *last]
    descending = ["t", "f", "s-b", "s-B", "s-10", "n-10", "n-2.5", "tie-2", "n-2", "n-neg"]
    assert keys(query(database, table, order_by="o", descending=True)) == [*descending, *reversed(last)]
    # Filters and ordering combine.
    page = query(database, table, FieldFilter("o", "GT", 0), order_by="o", descending=True)
    assert keys(page) == ["n-10", "n-2.5", "tie-2", "n-2"]


def test_order_by_columns(database: Database, table: Table) -> None:
    put(database, table, {"c": {}, "a": {}, "b": {}, "B": {}})  # versions 1..4, updated_at in that order
    assert keys(query(database, table)) == ["B", "a", "b", "c"]
    assert keys(query(database, table, order_by="key", descending=True)) == ["c", "b", "a", "B"]
    assert keys(query(database, table, order_by="version")) == ["c", "a", "b", "B"]
    assert keys(query(database, table, order_by="version", descending=True)) == ["B", "b", "a", "c"]
    assert keys(query(database, table, order_by="updated_at", descending=True)) == ["B", "b", "a", "c"]
    first = query(database, table, order_by="updated_at", limit=2)
    assert keys(first) == ["c", "a"]
    second = query(database, table, order_by="updated_at", limit=2, page_token=first.next_page_token)
    assert keys(second) == ["b", "B"]
    assert second.next_page_token == ""


def _sort_key(doc: dict[str, Any], key: str) -> tuple[Any, ...]:
    value = doc.get("n")
    return (0, value, key) if isinstance(value, int | float) else (1, 0, key)


@pytest.mark.parametrize(
    ("order_by", "descending"), [("n", False), ("n", True), ("", False), ("version", True)]
)
def test_paging_is_stable_while_documents_are_inserted(
    database: Database, table: Table, order_by: str, descending: bool
) -> None:
    rng = random.Random(7)
    # Few distinct values (many ties), ints and floats mixed, and some documents without the field.
    existing: dict[str, dict[str, Any]] = {}
    for i in range(250):
        existing[f"doc-{i:03d}"] = {} if i % 25 == 0 else {"n": rng.choice([1, 2, 2.5, 10, 100, -7])}
    put(database, table, existing)
    seen: list[DocumentRow] = []
    token = ""
    pages = 0
    while pages < 200:  # a cursor that never advances fails here instead of hanging
        page = query(database, table, order_by=order_by, descending=descending, limit=7, page_token=token)
        assert len(page.rows) <= 7
        seen.extend(page.rows)
        pages += 1
        # New documents land before, inside and after the pages already read.
        new = {f"new-{pages:03d}-{j}": {"n": rng.choice([0, 2, 5.5, 1000])} for j in range(3)}
        put(database, table, new, version=1000 + pages * 10)
        if not page.next_page_token:
            break
        assert len(page.rows) == 7
        token = page.next_page_token
    else:
        pytest.fail("paging never ended")
    old = [row.key for row in seen if row.key in existing]
    assert sorted(old) == sorted(existing)  # every pre-existing document exactly once
    assert len({row.key for row in seen}) == len(seen)  # nothing twice, new documents included
    if order_by == "n":
        expected = sorted(existing, key=lambda k: _sort_key(existing[k], k), reverse=descending)
        if descending:  # missing documents stay last, still in descending key order
            expected = [k for k in expected if "n" in existing[k]] + [
                k for k in expected if "n" not in existing[k]
            ]
        assert old == expected
        everything = {row.key: row.data for row in seen}
        ordered = [k for k, _ in sorted(everything.items(), key=lambda kv: _sort_key(kv[1], kv[0]))]
        if descending:
            ordered = [k for k in reversed(ordered) if "n" in everything[k]] + [
                k for k in reversed(ordered) if "n" not in everything[k]
            ]
        assert [row.key for row in seen] == ordered  # what was returned is in order too
    elif order_by == "":
        assert old == sorted(existing)
    else:
        assert old == sorted(existing, key=lambda k: int(k.split("-")[1]), reverse=True)


@pytest.mark.parametrize("descending", [False, True])
def test_page_tokens_keep_numbers_exact(database: Database, table: Table, descending: bool) -> None:
    # Neighbours a float would merge (2**60 + 1 == 2**60 as a double): the cursor must not skip or repeat.
    values = {f"k{i}": {"n": 2**60 + i} for i in range(6)} | {
        "f1": {"n": 0.1},
        "f2": {"n": 0.30000000000000004},
    }
    values |= {"f3": {"n": 0.3}, "f4": {"n": 1e-300}, "f5": {"n": 1e300}}
    put(database, table, values)
    seen: list[str] = []
    token = ""
    for _ in range(50):
        page = query(database, table, order_by="n", descending=descending, limit=1, page_token=token)
        seen += keys(page)
        token = page.next_page_token
        if not token:
            break
    else:
        pytest.fail(f"paging never ended: {seen}")
    expected = ["f4", "f1", "f3", "f2", *(f"k{i}" for i in range(6)), "f5"]
    assert seen == (list(reversed(expected)) if descending else expected)


def test_limit_defaults_to_100_and_a_token_survives_a_new_limit(database: Database, table: Table) -> None:
    put(database, table, {f"k{i:03d}": {"i": i} for i in range(120)})
    first = query(database, table, order_by="i", limit=0)
    assert keys(first) == [f"k{i:03d}" for i in range(100)]
    rest = query(database, table, order_by="i", limit=50, page_token=first.next_page_token)
    assert keys(rest) == [f"k{i:03d}" for i in range(100, 120)]
    assert rest.next_page_token == ""
    exact = query(database, table, order_by="i", limit=20, page_token=first.next_page_token)
    assert len(exact.rows) == 20
    assert exact.next_page_token == ""  # the limit+1 probe found nothing more


def test_a_token_only_pages_the_query_it_came_from(database: Database, table: Table, unique: str) -> None:
    put(database, table, {f"k{i}": {"n": i, "s": "x"} for i in range(10)})
    eq = FieldFilter("s", "EQ", "x")
    token = query(database, table, eq, order_by="n", limit=3).next_page_token
    assert token
    assert keys(query(database, table, eq, order_by="n", limit=3, page_token=token)) == ["k3", "k4", "k5"]
    other_queries: list[dict[str, Any]] = [
        {"filters": [FieldFilter("s", "EQ", "y")]},
        {"filters": [eq, FieldFilter("n", "GT", 0)]},
        {"filters": [], "order_by": "n"},
        {"order_by": ""},
        {"order_by": "s"},
        {"descending": True},
    ]
    for change in other_queries:
        args: dict[str, Any] = {"filters": [eq], "order_by": "n", "descending": False, **change}
        with pytest.raises(InvalidArgument) as caught:
            query(
                database,
                table,
                *args["filters"],
                order_by=args["order_by"],
                descending=args["descending"],
                page_token=token,
            )
        assert caught.value.violations[0].field == "page_token"
        assert "another query" in caught.value.message
    # The same query on another read model.
    metadata = MetaData()
    twin = document_table(metadata, f"it_docs_twin_{unique}")
    metadata.create_all(database.engine)
    try:
        with pytest.raises(InvalidArgument, match="page_token"):
            query(database, twin, eq, order_by="n", page_token=token)
    finally:
        metadata.drop_all(database.engine)


def _tampered(token: str, after: list[Any]) -> str:
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    body["after"] = after
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "AAAA",
        "e30",
        base64.urlsafe_b64encode(b'{"v":1,"q":"x","after":[]}').decode(),
        "x" * 5000,
    ],
)
def test_malformed_tokens_are_rejected(database: Database, table: Table, token: str) -> None:
    put(database, table, {"a": {"n": 1}})
    with pytest.raises(InvalidArgument) as caught:
        query(database, table, order_by="n", page_token=token)
    assert caught.value.violations[0].field == "page_token"


def test_tampered_token_values_are_rejected(database: Database, table: Table) -> None:
    put(database, table, {f"k{i}": {"n": i} for i in range(3)})
    token = query(database, table, order_by="n", limit=1).next_page_token
    invalid: list[list[Any]] = [
        [0, "x", "", "k0"],
        [0, "1", "", 5],
        ["0", "1", "", "k0"],
        [0, "nan", "", "k0"],
        [0, "1e999999", "", "k0"],
        [0, "1", ""],
    ]
    if database.engine.dialect.name == "sqlite":
        invalid.append([0, str(2**70), "", "k0"])  # SQLite binds 64-bit integers only (PostgreSQL: numeric)
    for after in invalid:
        with pytest.raises(InvalidArgument, match="page_token"):
            query(database, table, order_by="n", page_token=_tampered(token, after))
    assert keys(query(database, table, order_by="n", page_token=_tampered(token, [0, "0", "", "k0"]))) == [
        "k1",
        "k2",
    ]


@pytest.mark.parametrize(
    ("filters", "limit", "order_by", "field"),
    [
        ([FieldFilter("", "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter("a", "EQ", 1), FieldFilter("a..b", "EQ", 1)], 0, "", "filters[1].field"),
        ([FieldFilter("a b", "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter("a'b", "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter('a"b', "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter("$.a", "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter(".".join("abcdefghi"), "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter("a" * 101, "EQ", 1)], 0, "", "filters[0].field"),
        ([FieldFilter("a", "eq", 1)], 0, "", "filters[0].op"),
        ([FieldFilter("a", "LIKE", 1)], 0, "", "filters[0].op"),
        ([FieldFilter("a", "EQ", [1])], 0, "", "filters[0].value"),
        ([FieldFilter("a", "NE", {"b": 1})], 0, "", "filters[0].value"),
        ([FieldFilter("a", "LT", True)], 0, "", "filters[0].value"),
        ([FieldFilter("a", "GTE", None)], 0, "", "filters[0].value"),
        ([FieldFilter("a", "LT", float("nan"))], 0, "", "filters[0].value"),
        ([FieldFilter("a", "EQ", float("inf"))], 0, "", "filters[0].value"),
        ([FieldFilter("a", "EQ", 2**63)], 0, "", "filters[0].value"),
        ([FieldFilter("a", "EQ", "nul\x00")], 0, "", "filters[0].value"),
        ([FieldFilter("a", "EQ", b"bytes")], 0, "", "filters[0].value"),
        ([FieldFilter("a", "PREFIX", 5)], 0, "", "filters[0].value"),
        ([FieldFilter("a", "IN", [])], 0, "", "filters[0].value"),
        ([FieldFilter("a", "IN", "abc")], 0, "", "filters[0].value"),
        ([FieldFilter("a", "IN", list(range(1001)))], 0, "", "filters[0].value"),
        ([FieldFilter("a", "IN", [1, [2]])], 0, "", "filters[0].value[1]"),
        ([], -1, "", "limit"),
        ([], 1001, "", "limit"),
        ([], 0, "a..b", "order_by"),
        ([], 0, "data->'a'", "order_by"),
    ],
)
def test_bad_queries_are_rejected_naming_the_field(
    database: Database, table: Table, filters: Sequence[FieldFilter], limit: int, order_by: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        query(database, table, *filters, order_by=order_by, limit=limit)
    assert [v.field for v in caught.value.violations] == [field]


def test_limits_at_the_edges_are_accepted(database: Database, table: Table) -> None:
    put(database, table, {"a": {"x": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}})
    deep = FieldFilter(".".join("xbcdefgh"), "EQ", 1)
    assert keys(query(database, table, deep, limit=1000)) == ["a"]
    assert keys(query(database, table, FieldFilter("a" * 100, "EQ", 2**63 - 1))) == []
    assert keys(query(database, table, FieldFilter("x", "IN", list(range(1000))))) == []


def test_get_and_count(database: Database, table: Table) -> None:
    with database.engine.connect() as connection:
        assert count_documents(connection, table) == 0
    put(database, table, {"a": {"n": 1, "nested": {"list": [1, "two", None]}}, "b": {}}, version=7)
    with database.engine.connect() as connection:
        assert count_documents(connection, table) == 2
        row = get_document(connection, table, "a")
        assert row == DocumentRow(
            key="a",
            data={"n": 1, "nested": {"list": [1, "two", None]}},
            version=7,
            position="0:0",
            partition=0,
            offset=0,
            updated_at=EPOCH,
        )
        assert row.updated_at.tzinfo is not None
        assert get_document(connection, table, "A") is None
        assert get_document(connection, table, "x" * 500) is None
        with pytest.raises(InvalidArgument, match="key"):
            get_document(connection, table, "a\x00")
    with database.engine.begin() as connection:
        connection.execute(update(table).where(table.c.key == "b").values(data={"n": 5}, version=9))
    with database.engine.connect() as connection:
        changed = get_document(connection, table, "b")
        assert changed is not None and changed.data == {"n": 5} and changed.version == 9


@pytest.fixture
def postgres_table(postgres_url: str, unique: str) -> Iterator[tuple[Database, Table]]:
    database = Database(postgres_url)
    metadata = MetaData()
    docs = document_table(metadata, f"it_gin_{unique}")
    metadata.create_all(database.engine)
    try:
        yield database, docs
    finally:
        metadata.drop_all(database.engine)
        database.close()


def test_postgres_eq_filters_use_the_gin_index(postgres_table: tuple[Database, Table]) -> None:
    database, table = postgres_table
    indexes = inspect(database.engine).get_indexes(table.name)
    assert [(i["column_names"], i.get("dialect_options", {}).get("postgresql_using")) for i in indexes] == [
        (["data"], "gin")
    ]
    put(database, table, {f"k{i}": {"c": {"city": f"city-{i % 50}"}} for i in range(500)})
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        statements.append((statement, parameters))

    with database.engine.connect() as connection:
        connection.execute(text(f'ANALYZE "{table.name}"'))
        connection.execute(text("SET enable_seqscan = off"))
        event.listen(connection, "before_cursor_execute", capture)
        page = query_documents(
            connection,
            table,
            filters=[FieldFilter("c.city", "EQ", "city-7")],
            order_by="version",
            descending=False,
            limit=100,
            page_token="",
        )
        event.remove(connection, "before_cursor_execute", capture)
        assert keys(page) == [f"k{i}" for i in range(7, 500, 50)]
        # The very statement query_documents ran, explained with its own parameters.
        [(statement, parameters)] = statements
        plan = "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    assert f"{table.name}_data_gin" in plan, plan


def test_sqlite_is_the_default_engine_for_documents(tmp_path: Path, unique: str) -> None:
    # The SQLite file a Database creates works without any extension loading (JSON1 is built in).
    db = Database(f"sqlite:///{tmp_path / 'sub' / 'docs.db'}")
    try:
        metadata = MetaData()
        docs = document_table(metadata, f"d_{unique}")
        metadata.create_all(db.engine)
        put(db, docs, {"a": {"x": 1}})
        assert keys(query(db, docs, FieldFilter("x", "EQ", 1))) == ["a"]
    finally:
        db.close()


def test_filters_combine_with_and(database: Database, table: Table) -> None:
    put(
        database,
        table,
        {"a": {"c": "Oslo", "n": 2}, "b": {"c": "Oslo", "n": 3}, "c": {"c": "Bergen", "n": 3}},
    )
    both = [FieldFilter("c", "EQ", "Oslo"), FieldFilter("n", "GT", 2)]
    assert keys(query(database, table, *both)) == ["b"]


@pytest.fixture
def locale_database(postgres_url: str, unique: str) -> Iterator[Database]:
    """A PostgreSQL database whose default collation is a language's (ICU en-US), not code points."""
    url = make_url(postgres_url)
    name = f"kpg_icu_{unique}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C' "
            "LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        )
    db = Database(url.set(database=name).render_as_string(hide_password=False))
    try:
        yield db
    finally:
        db.close()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_strings_and_keys_use_code_point_order_whatever_the_database_collation(
    locale_database: Database, unique: str
) -> None:
    with locale_database.engine.connect() as connection:
        # The premise: this database's own collation sorts "apple" before "Banana".
        assert connection.execute(text("SELECT 'apple' < 'Banana'")).scalar_one() is True
    metadata = MetaData()
    docs = document_table(metadata, f"it_docs_{unique}")
    metadata.create_all(locale_database.engine)
    put(locale_database, docs, {"a": {"s": "apple"}, "B": {"s": "Banana"}, "c": {"s": "cherry"}})
    assert keys(query(locale_database, docs)) == ["B", "a", "c"]
    assert keys(query(locale_database, docs, order_by="s")) == ["B", "a", "c"]
    assert keys(query(locale_database, docs, FieldFilter("s", "LT", "apple"))) == ["B"]
    assert keys(query(locale_database, docs, FieldFilter("s", "GT", "Banana"))) == ["a", "c"]
    first = query(locale_database, docs, order_by="s", limit=1)
    assert keys(query(locale_database, docs, order_by="s", page_token=first.next_page_token)) == ["a", "c"]
