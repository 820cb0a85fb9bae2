"""Read-model document queries on a real SQLite file and a real PostgreSQL server: the same answers from
both, typed comparisons, ordering with missing fields, and keyset page tokens."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, Table, insert

from gateway.adapters.sql.database import Database
from gateway.adapters.sql.documents import (
    FieldFilter,
    Page,
    count_documents,
    document_table,
    get_document,
    query_documents,
)
from gateway.errors import InvalidArgument

DOCS: dict[str, dict[str, Any]] = {
    "a": {"n": 2, "name": "apple", "tags": ["x"], "nested": {"city": "Oslo"}, "flag": True},
    "b": {"n": 10, "name": "Apricot", "nested": {"city": "Bergen"}, "flag": False},
    "c": {"n": 2.5, "name": "banana", "nested": {"city": "Oslo"}},
    "d": {"n": "7", "name": "a%_*?[x"},  # a string that looks like a number, and LIKE/GLOB metacharacters
    "e": {"name": None},
    "f": {"n": -1},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'docs.db'}")
    else:
        db = Database(request.getfixturevalue("postgres_url"))
    yield db
    db.close()


@pytest.fixture
def table(database: Database) -> Iterator[Table]:
    table = document_table(MetaData(), f"kpg_test_docs_{uuid.uuid4().hex[:8]}")
    table.create(database.engine)
    _put(database, table, DOCS)
    yield table
    table.drop(database.engine)


def _put(database: Database, table: Table, docs: dict[str, dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    with database.engine.begin() as connection:
        connection.execute(
            insert(table),
            [
                {
                    "key": k,
                    "data": d,
                    "version": i + 1,
                    "position": f"p{i}",
                    "partition": 0,
                    "offset": i,
                    "updated_at": now,
                }
                for i, (k, d) in enumerate(docs.items())
            ],
        )


def _query(database: Database, table: Table, *filters: FieldFilter, **options: Any) -> Page:
    settings: dict[str, Any] = {"order_by": "", "descending": False, "limit": 0, "page_token": ""} | options
    with database.engine.connect() as connection:
        return query_documents(connection, table, filters=list(filters), **settings)


def _keys(database: Database, table: Table, *filters: FieldFilter, **options: Any) -> list[str]:
    return [row.key for row in _query(database, table, *filters, **options).rows]


@pytest.mark.parametrize(
    ("field", "op", "value", "expected"),
    [
        ("n", "EQ", 2, ["a"]),
        ("n", "EQ", 2.0, ["a"]),  # numbers are numbers, whatever their JSON spelling
        ("n", "EQ", "7", ["d"]),  # a string never equals a number
        ("n", "NE", 2, ["b", "c", "d", "f"]),  # a missing field matches no filter, NE included
        ("n", "LT", 3, ["a", "c", "f"]),  # 10 > 3 numerically (lexically "10" < "3")
        ("n", "GTE", 10, ["b"]),
        ("name", "GT", "b", ["c"]),  # code point order: "Apricot" < "a..." < "b"
        ("name", "LTE", "apple", ["a", "b", "d"]),
        ("name", "IN", ["apple", "banana", "cherry"], ["a", "c"]),
        ("n", "IN", [10, "7"], ["b", "d"]),
        ("name", "PREFIX", "ap", ["a"]),  # case-sensitive
        ("name", "PREFIX", "a%_*?[", ["d"]),  # metacharacters are literal
        ("name", "PREFIX", "a%", ["d"]),
        ("nested.city", "EQ", "Oslo", ["a", "c"]),
        ("flag", "EQ", True, ["a"]),
        ("flag", "EQ", False, ["b"]),
        ("name", "EQ", None, ["e"]),  # JSON null is a value
    ],
)
def test_filters_compare_typed_json_values(
    database: Database, table: Table, field: str, op: str, value: Any, expected: list[str]
) -> None:
    assert _keys(database, table, FieldFilter(field, op, value)) == expected


def test_filters_combine_with_and(database: Database, table: Table) -> None:
    keys = _keys(database, table, FieldFilter("nested.city", "EQ", "Oslo"), FieldFilter("n", "GT", 2))
    assert keys == ["c"]


def test_ordering_puts_missing_fields_last_both_ways(database: Database, table: Table) -> None:
    # Numbers first, then strings; documents without a number or string there ("e", whose n is missing) last.
    assert _keys(database, table, order_by="n") == ["f", "a", "c", "b", "d", "e"]
    assert _keys(database, table, order_by="n", descending=True) == ["d", "b", "c", "a", "f", "e"]
    assert _keys(database, table, order_by="key", descending=True) == ["f", "e", "d", "c", "b", "a"]
    assert _keys(database, table, order_by="version") == ["a", "b", "c", "d", "e", "f"]


def test_paging_is_stable_while_documents_are_written(database: Database, table: Table) -> None:
    _put(database, table, {f"k{i:03d}": {"rank": i % 17, "i": i} for i in range(250)})
    expected = [
        row.key
        for row in _query(database, table, FieldFilter("i", "GTE", 0), order_by="rank", limit=1000).rows
    ]
    seen: list[str] = []
    token = ""
    page_number = 0
    while True:
        page = _query(database, table, FieldFilter("i", "GTE", 0), order_by="rank", limit=7, page_token=token)
        seen += [row.key for row in page.rows]
        # Writes between pages: new documents, some sorting before the cursor, some after.
        _put(database, table, {f"new{page_number}-{j}": {"rank": j * 8, "i": 1000 + j} for j in range(3)})
        page_number += 1
        token = page.next_page_token
        if not token:
            break
    old = [key for key in seen if key.startswith("k")]
    assert old == expected and len(old) == 250  # every earlier document exactly once, in order
    assert len(seen) == len(set(seen))


def test_a_page_token_belongs_to_its_query(database: Database, table: Table) -> None:
    page = _query(database, table, order_by="n", limit=2)
    assert page.next_page_token
    with pytest.raises(InvalidArgument) as other_query:
        _query(database, table, order_by="name", limit=2, page_token=page.next_page_token)
    with pytest.raises(InvalidArgument):
        _query(database, table, page_token="garbage")
    assert other_query.value.violations[0].field == "page_token"


@pytest.mark.parametrize(
    ("filters", "options", "field"),
    [
        ([FieldFilter("a b", "EQ", 1)], {}, "filters[0].field"),
        ([FieldFilter("n", "LIKE", 1)], {}, "filters[0].op"),
        ([FieldFilter("n", "IN", [])], {}, "filters[0].value"),
        ([FieldFilter("n", "PREFIX", 1)], {}, "filters[0].value"),
        ([FieldFilter("n", "LT", True)], {}, "filters[0].value"),
        ([FieldFilter("n", "EQ", {"a": 1})], {}, "filters[0].value"),
        ([], {"limit": 5000}, "limit"),
        ([], {"order_by": "x;drop table"}, "order_by"),
    ],
)
def test_bad_queries_name_the_field(
    database: Database, table: Table, filters: list[FieldFilter], options: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        _query(database, table, *filters, **options)
    assert raised.value.violations[0].field == field


def test_get_and_count(database: Database, table: Table) -> None:
    with database.engine.connect() as connection:
        row = get_document(connection, table, "a")
        assert row is not None and row.data == DOCS["a"] and row.version == 1
        assert row.updated_at.tzinfo is not None
        assert get_document(connection, table, "zzz") is None
        assert count_documents(connection, table) == len(DOCS)
