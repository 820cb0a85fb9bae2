"""Read-model documents in SQL: one table per read model, queried by any field of the JSON document.

SQLite keeps `data` as JSON1 text and PostgreSQL as JSONB (with a GIN index for EQ containment); both
answer a query the same way, because every comparison is typed:

- numbers compare numerically (2 < 10, 2 == 2.0), strings by code point (case-sensitive, no locale),
  booleans and null only by EQ/NE/IN; a value never equals one of another JSON type (1 is not true).
- a document that lacks the field (or reaches a non-object on the way) matches no filter, NE included;
  a JSON null is a value: `EQ null` matches it and `NE 5` matches it.
- ordering by a data path sorts numbers, then strings, then booleans (reversed when descending);
  documents where the field is missing, null, an object or an array sort last either way. Ties, and
  those last documents, are ordered by key in the query's direction.
- page tokens are keysets, not offsets: a page resumes strictly after the last row returned, so
  documents written between pages never shift or repeat the documents already being paged through.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    case,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    type_coerce,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.sql.elements import ColumnElement

from gateway.errors import BackendUnavailable, InvalidArgument

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_IN_VALUES = 1000
MAX_FILTERS = 50
MAX_PATH_PARTS = 8
MAX_KEY_LENGTH = 200
OPS = frozenset({"EQ", "NE", "LT", "LTE", "GT", "GTE", "IN", "PREFIX"})
# The columns a query can order by besides a data path ("" means key).
ORDER_COLUMNS = frozenset({"key", "version", "updated_at"})

_PATH_PART = re.compile(r"[A-Za-z0-9_-]{1,100}")
_INT64 = 2**63
_MAX_TOKEN_LENGTH = 4096
_TOKEN_VERSION = 1


def document_table(metadata: MetaData, name: str) -> Table:
    """The table of one read model (create it with `metadata.create_all`)."""
    # Keys sort by code point on PostgreSQL too (as on SQLite), so ORDER BY key can use the primary key.
    key_type = String(MAX_KEY_LENGTH).with_variant(String(MAX_KEY_LENGTH, collation="C"), "postgresql")
    table = Table(
        name,
        metadata,
        Column("key", key_type, primary_key=True),
        Column("data", JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        Column("version", BigInteger, nullable=False),
        Column("position", String, nullable=False),
        Column("partition", Integer, nullable=False),
        Column("offset", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )
    # jsonb_path_ops answers only @> (what EQ filters use), with a smaller index than the default opclass.
    Index(
        _index_name(name),
        table.c.data,
        postgresql_using="gin",
        postgresql_ops={"data": "jsonb_path_ops"},
    ).ddl_if(dialect="postgresql")
    return table


def _index_name(table_name: str) -> str:
    name = f"{table_name}_data_gin"
    if len(name) <= 63:  # PostgreSQL's identifier limit
        return name
    return f"{table_name[:40]}_{hashlib.sha256(table_name.encode()).hexdigest()[:12]}_data_gin"


@dataclass(frozen=True, slots=True)
class DocumentRow:
    key: str
    data: dict[str, Any]
    version: int
    position: str
    partition: int
    offset: int
    updated_at: datetime  # always timezone-aware (SQLite returns naive UTC, made aware here)


@dataclass(frozen=True, slots=True)
class FieldFilter:
    field: str  # dotted path into data: parts of [A-Za-z0-9_-]{1,100}, at most 8
    op: str  # one of OPS
    # A JSON scalar; IN takes a non-empty list of them; LT..GTE a number or string; PREFIX a string.
    value: Any


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[DocumentRow]
    next_page_token: str  # "" when there is no further page


def get_document(connection: Connection, table: Table, key: str) -> DocumentRow | None:
    if "\x00" in key:
        raise InvalidArgument.field("key", "must not contain NUL characters")
    if len(key) > MAX_KEY_LENGTH:
        return None  # no stored key is that long
    row = _execute(connection, select(table).where(table.c.key == key)).mappings().first()
    return _document(row) if row is not None else None


def get_documents(connection: Connection, table: Table, keys: Iterable[str]) -> dict[str, DocumentRow]:
    """The stored documents among `keys`, by key: one SELECT per 500 keys, not one per key."""
    wanted = sorted({k for k in keys if "\x00" not in k and len(k) <= MAX_KEY_LENGTH})
    found: dict[str, DocumentRow] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        for row in _execute(connection, select(table).where(table.c.key.in_(chunk))).mappings():
            found[row["key"]] = _document(row)
    return found


def count_documents(connection: Connection, table: Table) -> int:
    return int(_execute(connection, select(func.count()).select_from(table)).scalar_one())


def query_documents(
    connection: Connection,
    table: Table,
    *,
    filters: Sequence[FieldFilter],
    order_by: str,
    descending: bool,
    limit: int,
    page_token: str,
) -> Page:
    """Up to `limit` documents (0 = 100) matching every filter, in order, after `page_token`'s row."""
    if limit < 0 or limit > MAX_LIMIT:
        raise InvalidArgument.field("limit", f"must be between 0 and {MAX_LIMIT} (0 means {DEFAULT_LIMIT})")
    limit = limit or DEFAULT_LIMIT
    checked = _check_filters(filters)
    order = _check_order_by(order_by)
    json_field = _json_field_factory(connection, table)
    fingerprint = _fingerprint(table.name, checked, order, descending)
    sort = _sort_columns(table, json_field, order, descending)

    query = select(table, *(column.expr.label(f"sort_{i}") for i, column in enumerate(sort)))
    conditions = [_condition(json_field(f.parts), f) for f in checked]
    if page_token:
        after = _decode_token(page_token, fingerprint, sort, connection.dialect.name)
        conditions.append(_after(sort, after))
    query = query.where(*conditions).order_by(
        *(column.expr.asc() if column.ascending else column.expr.desc() for column in sort)
    )
    rows = _execute(connection, query.limit(limit + 1)).mappings().all()
    token = ""
    if len(rows) > limit:
        last = rows[limit - 1]
        token = _encode_token(fingerprint, [column.dump(last[f"sort_{i}"]) for i, column in enumerate(sort)])
    return Page(rows=[_document(row) for row in rows[:limit]], next_page_token=token)


def _execute(connection: Connection, statement: Any) -> Any:
    try:
        return connection.execute(statement)
    except (OperationalError, InterfaceError) as exc:
        raise BackendUnavailable(f"the read-model database failed: {exc}") from exc


def _document(row: RowMapping) -> DocumentRow:
    updated_at: datetime = row["updated_at"]
    if updated_at.tzinfo is None:
        updated_at = updated_at.replace(tzinfo=UTC)
    return DocumentRow(
        key=row["key"],
        data=row["data"],
        version=row["version"],
        position=row["position"],
        partition=row["partition"],
        offset=row["offset"],
        updated_at=updated_at,
    )


# --- validation -------------------------------------------------------------------------------------------

Scalar = None | bool | int | float | str


@dataclass(frozen=True, slots=True)
class _Filter:
    parts: tuple[str, ...]
    op: str
    value: Any


def _parse_path(path: str, where: str) -> tuple[str, ...]:
    parts = tuple(path.split("."))
    if len(parts) > MAX_PATH_PARTS:
        raise InvalidArgument.field(where, f"a path has at most {MAX_PATH_PARTS} parts")
    for part in parts:
        if not _PATH_PART.fullmatch(part):
            raise InvalidArgument.field(
                where, "must be a dotted path of names made of letters, digits, '_' and '-' (1 to 100 each)"
            )
    return parts


def _check_scalar(value: Any, where: str) -> Scalar:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise InvalidArgument.field(where, "an integer must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument.field(where, "a number must be finite")
        return value
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidArgument.field(where, "a string must not contain NUL characters")
        return value
    raise InvalidArgument.field(where, "must be null, a boolean, a number or a string")


def _check_filters(filters: Sequence[FieldFilter]) -> list[_Filter]:
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument.field("filters", f"at most {MAX_FILTERS} filters")
    checked = []
    for i, f in enumerate(filters):
        where = f"filters[{i}]"
        parts = _parse_path(f.field, f"{where}.field")
        if f.op not in OPS:
            raise InvalidArgument.field(f"{where}.op", f"must be one of {', '.join(sorted(OPS))}")
        value: Any
        if f.op == "IN":
            if not isinstance(f.value, list | tuple) or not f.value or len(f.value) > MAX_IN_VALUES:
                raise InvalidArgument.field(
                    f"{where}.value", f"IN takes a list of 1 to {MAX_IN_VALUES} values"
                )
            value = [_check_scalar(v, f"{where}.value[{j}]") for j, v in enumerate(f.value)]
        elif f.op == "PREFIX":
            if not isinstance(f.value, str):
                raise InvalidArgument.field(f"{where}.value", "PREFIX takes a string")
            value = _check_scalar(f.value, f"{where}.value")
        elif f.op in ("EQ", "NE"):
            value = _check_scalar(f.value, f"{where}.value")
        else:
            value = _check_scalar(f.value, f"{where}.value")
            if value is None or isinstance(value, bool):
                raise InvalidArgument.field(f"{where}.value", f"{f.op} compares a number or a string")
        checked.append(_Filter(parts, f.op, value))
    return checked


def _check_order_by(order_by: str) -> str | tuple[str, ...]:
    """A column name, or the parts of a data path."""
    if order_by in ("", "key"):
        return "key"
    if order_by in ORDER_COLUMNS:
        return order_by
    return _parse_path(order_by, "order_by")


# --- typed access to one field of the document -------------------------------------------------------

JsonKind = Literal["null", "true", "false"]


class _JsonField:
    """One path into `data`, with dialect-neutral typed views (each SQL NULL unless the field has that
    type)."""

    def number(self) -> ColumnElement[Any]:
        raise NotImplementedError

    def string(self) -> ColumnElement[Any]:
        """The string, compared by code point."""
        raise NotImplementedError

    def is_kind(self, kind: JsonKind) -> ColumnElement[bool]:
        raise NotImplementedError

    def present(self) -> ColumnElement[bool]:
        raise NotImplementedError

    def equals(self, value: Scalar) -> ColumnElement[bool]:
        """True or false (never NULL) when the field is present; NULL or false when it is missing."""
        if value is None:
            return self.is_kind("null")
        if isinstance(value, bool):
            return self.is_kind("true" if value else "false")
        if isinstance(value, int | float):
            return self.number() == value
        return self.string() == literal(value, String)


class _SqliteField(_JsonField):
    def __init__(self, data: ColumnElement[Any], parts: tuple[str, ...]) -> None:
        # The parts are validated names, quoted as JSON path labels; the path itself is a bound parameter.
        path = "$" + "".join(f'."{part}"' for part in parts)
        self._type = func.json_type(data, literal(path, String))
        self._value = func.json_extract(data, literal(path, String))

    def number(self) -> ColumnElement[Any]:
        return case((self._type.in_(["integer", "real"]), self._value))

    def string(self) -> ColumnElement[Any]:
        return case((self._type == "text", self._value))  # SQLite's BINARY collation: code point order

    def is_kind(self, kind: JsonKind) -> ColumnElement[bool]:
        return self._type == kind  # json_type names them 'null', 'true', 'false'

    def present(self) -> ColumnElement[bool]:
        return self._type.is_not(None)


class _PostgresField(_JsonField):
    def __init__(self, data: ColumnElement[Any], parts: tuple[str, ...]) -> None:
        self._data = data
        self._parts = parts
        # `->` with a text operand looks up object keys only (as SQLite's quoted labels do), never array
        # slots.
        parent = data
        for part in parts[:-1]:
            parent = parent[part]
        self._parent = parent
        self._value = parent[parts[-1]]
        self._type = func.jsonb_typeof(self._value)

    def number(self) -> ColumnElement[Any]:
        return case((self._type == "number", self._value.cast(postgresql.NUMERIC())))

    def string(self) -> ColumnElement[Any]:
        text = self._parent[self._parts[-1]].astext
        return case((self._type == "string", text)).collate("C")  # code point order, as on SQLite

    def is_kind(self, kind: JsonKind) -> ColumnElement[bool]:
        if kind == "null":
            return self._type == "null"
        return self._value == literal(kind == "true", postgresql.JSONB())

    def present(self) -> ColumnElement[bool]:
        return self._value.is_not(None)

    def equals(self, value: Scalar) -> ColumnElement[bool]:
        # Containment, so the GIN index answers. Below the top level it is exact for a scalar: 2 is not
        # contained in [2] nor in {"x": 2}, 2.0 is 2, and "2" is not 2.
        document: Any = value
        for part in reversed(self._parts):
            document = {part: document}
        return self._data.op("@>", is_comparison=True)(literal(document, postgresql.JSONB()))


def _json_field_factory(connection: Connection, table: Table) -> Callable[[tuple[str, ...]], _JsonField]:
    dialect = connection.dialect.name
    if dialect == "sqlite":
        return lambda parts: _SqliteField(table.c.data, parts)
    if dialect == "postgresql":
        jsonb = type_coerce(table.c.data, postgresql.JSONB())
        return lambda parts: _PostgresField(jsonb, parts)
    raise NotImplementedError(f"read-model documents support SQLite and PostgreSQL, not {dialect}")


# --- filters ---------------------------------------------------------------------------------------------


def _condition(field: _JsonField, f: _Filter) -> ColumnElement[bool]:
    if f.op == "EQ":
        return field.equals(f.value)
    if f.op == "NE":
        # The typed views are NULL for other types; coalesce so NOT turns "not equal" into a match.
        return and_(field.present(), not_(func.coalesce(field.equals(f.value), false())))
    if f.op == "IN":
        return _any_of(field, f.value)
    if f.op == "PREFIX":
        prefix: str = f.value
        # substr, not LIKE/GLOB: no wildcard to escape, and case-sensitive on both databases.
        return func.substr(field.string(), 1, len(prefix)) == literal(prefix, String)
    view = field.number() if isinstance(f.value, int | float) else field.string()
    bound = literal(f.value) if isinstance(f.value, int | float) else literal(f.value, String)
    comparisons: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
        "LT": lambda a, b: a < b,
        "LTE": lambda a, b: a <= b,
        "GT": lambda a, b: a > b,
        "GTE": lambda a, b: a >= b,
    }
    return comparisons[f.op](view, bound)


def _any_of(field: _JsonField, values: list[Scalar]) -> ColumnElement[bool]:
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    strings = [v for v in values if isinstance(v, str)]
    options: list[ColumnElement[bool]] = []
    if numbers:
        options.append(field.number().in_(numbers))
    if strings:
        options.append(field.string().in_(strings))
    for kind, value in (("null", None), ("true", True), ("false", False)):
        if any(v is value for v in values):
            options.append(field.is_kind(kind))  # type: ignore[arg-type]
    return or_(*options)


# --- ordering and page tokens -----------------------------------------------------------------------------

SortKind = Literal["int", "number", "string", "time"]


@dataclass(frozen=True, slots=True)
class _SortColumn:
    expr: ColumnElement[Any]
    ascending: bool
    kind: SortKind

    def dump(self, value: Any) -> Any:
        if self.kind == "number":
            return str(value)  # exact: a Decimal from PostgreSQL, an int or a float (repr round-trips)
        if self.kind == "time":
            return value.isoformat()
        return value


def _sort_columns(
    table: Table,
    json_field: Callable[[tuple[str, ...]], _JsonField],
    order: str | tuple[str, ...],
    descending: bool,
) -> list[_SortColumn]:
    ascending = not descending
    key = _SortColumn(table.c.key, ascending, "string")
    if order == "key":
        return [key]
    if order == "version":
        return [_SortColumn(table.c.version, ascending, "int"), key]
    if order == "updated_at":
        return [_SortColumn(table.c.updated_at, ascending, "time"), key]
    assert isinstance(order, tuple)
    field = json_field(order)
    number, string = field.number(), field.string()
    # The type group always ascends, so "not a sortable value" (3) stays last in both directions.
    groups = (0, 1, 2) if ascending else (2, 1, 0)
    group = case(
        (number.is_not(None), groups[0]),
        (string.is_not(None), groups[1]),
        (or_(field.is_kind("true"), field.is_kind("false")), groups[2]),
        else_=3,
    )
    # Within a group one of these decides (booleans as 0/1); the other is a constant.
    numeric = case((field.is_kind("true"), 1), else_=func.coalesce(number, 0))
    text = func.coalesce(string, literal("", String))
    return [
        _SortColumn(group, True, "int"),
        _SortColumn(numeric, ascending, "number"),
        _SortColumn(text, ascending, "string"),
        key,
    ]


def _after(sort: list[_SortColumn], values: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after `values` in the sort order (a lexicographic comparison, each column its
    direction)."""
    options = []
    for i, column in enumerate(sort):
        earlier = [sort[j].expr == values[j] for j in range(i)]
        beyond = column.expr > values[i] if column.ascending else column.expr < values[i]
        options.append(and_(*earlier, beyond))
    return or_(*options) if options else true()


def _fingerprint(
    table_name: str, filters: list[_Filter], order: str | tuple[str, ...], descending: bool
) -> str:
    query = {
        "table": table_name,
        "filters": [[list(f.parts), f.op, f.value] for f in filters],
        "order": order if isinstance(order, str) else list(order),
        "descending": descending,
    }
    canonical = json.dumps(query, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _encode_token(fingerprint: str, values: list[Any]) -> str:
    body = json.dumps({"v": _TOKEN_VERSION, "q": fingerprint, "after": values}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_token(token: str, fingerprint: str, sort: list[_SortColumn], dialect: str) -> list[Any]:
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument.field("page_token", why)

    if len(token) > _MAX_TOKEN_LENGTH:
        raise bad("is not a page token of this service")
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise bad("is not a page token of this service") from exc
    if not isinstance(body, dict) or body.get("v") != _TOKEN_VERSION or not isinstance(body.get("q"), str):
        raise bad("is not a page token of this service")
    if body["q"] != fingerprint:
        raise bad("belongs to another query: page with the same read model, filters, order_by and descending")
    values = body.get("after")
    if not isinstance(values, list) or len(values) != len(sort):
        raise bad("is not a page token of this service")
    try:
        return [
            _load_sort_value(column.kind, value, dialect) for column, value in zip(sort, values, strict=True)
        ]
    except ValueError as exc:
        raise bad("is not a page token of this service") from exc


def _load_sort_value(kind: SortKind, value: Any, dialect: str) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not -_INT64 <= value < _INT64:
            raise ValueError("not an integer")
        return value
    if not isinstance(value, str) or "\x00" in value or len(value) > 1000:
        raise ValueError("not a string")
    if kind == "string":
        return value
    if kind == "time":
        return datetime.fromisoformat(value)
    # A number as the database produced it: exact on both sides of the comparison.
    if dialect == "postgresql":
        try:
            number = Decimal(value)
        except ArithmeticError as exc:  # decimal.InvalidOperation
            raise ValueError("not a number") from exc
        # Within what PostgreSQL's numeric holds (else the server, not the token check, would refuse it).
        if not number.is_finite() or not -16000 < number.adjusted() < 131000:
            raise ValueError("not a storable number")
        return number
    if re.fullmatch(r"-?[0-9]+", value):
        integer = int(value)
        if not -_INT64 <= integer < _INT64:
            raise ValueError("not a 64-bit integer")
        return integer
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError("not finite")
    return as_float
