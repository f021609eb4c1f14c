"""Metadata queries: every read of metadata.duckdb, and its SQL, goes through `MetadataStore`.

Filters are a dataclass turned into SQL here, with column names checked against the table and quoted, and
every value bound as a parameter: a filter value never becomes SQL text.
"""

from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import duckdb
import numpy as np
import pandas as pd

from cache_builder.cache_format import METADATA_TABLE, CacheError, quote_identifier
from dashboard.analysis import chartable_columns

LIST_TYPE_SUFFIX = "[]"
DENSE_READ_SHARE = 0.125  # `rows` reads the whole table once when asked for more than this share of it


class FilterError(ValueError):
    """A filter that names an unknown column or a value of the wrong type; the message says which."""


NOTHING_LABELS = ("empty", "none", "background", "nothing", "")  # labels that say an image shows no object


@dataclass(frozen=True)
class MetadataFilter:
    """Conditions ANDed together. `equals`: column IN values; `ranges`: lo <= column <= hi (None = open);
    `contains_any`: a list column holds at least one of the values."""

    equals: dict[str, Sequence[Any]] = field(default_factory=dict)
    ranges: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    contains_any: dict[str, Sequence[Any]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.equals or self.ranges or self.contains_any)


class MetadataStore:
    """Read-only view of the `images` table; safe to share between threads (one cursor per query)."""

    def __init__(self, path: Path):
        try:
            self._con = duckdb.connect(str(path), read_only=True)
            described = self._con.execute(f"DESCRIBE {METADATA_TABLE}").fetchall()
        except duckdb.Error as exc:
            raise CacheError(f"{path} has no readable `{METADATA_TABLE}` table: {exc}".splitlines()[0]) from None
        self.column_types: dict[str, str] = {row[0]: row[1] for row in described}
        for required in ("id", "path"):
            if required not in self.column_types:
                raise CacheError(f"{path}: table `{METADATA_TABLE}` has no `{required}` column")
        self._lock = threading.Lock()
        _OPEN_STORES.add(self)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> duckdb.DuckDBPyConnection:
        with self._lock:
            cursor = self._con.cursor()
        return cursor.execute(sql, list(params))

    @property
    def columns(self) -> list[str]:
        return list(self.column_types)

    def is_list(self, column: str) -> bool:
        return self.column_types[column].endswith(LIST_TYPE_SUFFIX)

    def is_numeric(self, column: str) -> bool:
        kind = self.column_types[column]
        return any(kind.startswith(t) for t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "FLOAT",
                                                 "DOUBLE", "DECIMAL", "UTINYINT", "USMALLINT", "UINTEGER",
                                                 "UBIGINT"))

    def is_temporal(self, column: str) -> bool:
        return self.column_types[column].startswith(("DATE", "TIMESTAMP", "TIME"))

    def count(self) -> int:
        return int(self._query(f"SELECT count(*) FROM {METADATA_TABLE}").fetchone()[0])

    @functools.cached_property
    def size(self) -> int:
        """Rows in the table (read-only, so counted once)."""
        return self.count()

    def id_range_ok(self, n: int) -> bool:
        row = self._query(f"SELECT count(*), min(id), max(id), count(DISTINCT id) FROM {METADATA_TABLE}").fetchone()
        return row == (n, 0, n - 1, n) if n else row[0] == 0

    def _check_column(self, column: str) -> str:
        if column not in self.column_types:
            raise FilterError(f"no metadata column '{column}'; columns: {', '.join(self.columns)}")
        return quote_identifier(column)

    def where_clause(self, flt: MetadataFilter) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, values in flt.equals.items():
            ident = self._check_column(column)
            values = list(values)
            if not values:
                clauses.append("FALSE")
                continue
            if self.is_list(column):
                clauses.append(f"list_has_any({ident}, ?::VARCHAR[])")
                params.append([str(v) for v in values])
                continue
            nulls = any(v is None for v in values)
            present = [v for v in values if v is not None]
            parts = []
            if present:
                parts.append(f"{ident} IN ({', '.join('?' for _ in present)})")
                params.extend(present)
            if nulls:
                parts.append(f"{ident} IS NULL")
            clauses.append("(" + " OR ".join(parts) + ")")
        for column, (lo, hi) in flt.ranges.items():
            ident = self._check_column(column)
            if lo is not None:
                clauses.append(f"{ident} >= ?")
                params.append(lo)
            if hi is not None:
                clauses.append(f"{ident} <= ?")
                params.append(hi)
        for column, values in flt.contains_any.items():
            ident = self._check_column(column)
            if not self.is_list(column):
                raise FilterError(f"'{column}' is not a list column; use an equality filter")
            clauses.append(f"list_has_any({ident}, ?::VARCHAR[])")
            params.append([str(v) for v in values])
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def first_labelled_id(self, column: str | None) -> int | None:
        """The first image whose `column` names something (not null, not a "nothing here" label such as the
        camera traps' "empty"): the Search page's first query. None without such a column or image."""
        if column is None or column not in self.column_types or self.is_list(column):
            return None
        name, marks = quote_identifier(column), ", ".join("?" * len(NOTHING_LABELS))
        row = self._query(f"SELECT id FROM {METADATA_TABLE} WHERE {name} IS NOT NULL AND "
                          f"lower(CAST({name} AS VARCHAR)) NOT IN ({marks}) ORDER BY id LIMIT 1",
                          NOTHING_LABELS).fetchone()
        return None if row is None else int(row[0])

    def filter_ids(self, flt: MetadataFilter | None) -> np.ndarray:
        """Sorted ids of the rows that pass the filter (all ids for no filter)."""
        flt = flt or MetadataFilter()
        where, params = self.where_clause(flt)
        try:
            rows = self._query(f"SELECT id FROM {METADATA_TABLE}{where} ORDER BY id", params).fetchnumpy()
        except (duckdb.ConversionException, duckdb.BinderException, duckdb.InvalidInputException) as exc:
            misfit = self._misfit_value(flt)
            raise FilterError(misfit or f"a filter value does not fit its column's type: {exc}".splitlines()[0]) \
                from None
        return np.asarray(rows["id"], dtype=np.int64)

    def _misfit(self, column: str, value: Any) -> str | None:
        """Why `value` cannot be compared with the (non-list) column, naming both; None when it converts to the
        column's type, as the filter's comparison would convert it."""
        try:
            self._query(f"SELECT CAST(? AS {self.column_types[column]})", [value]).fetchone()
        except duckdb.Error:
            return f"the filter value {value!r} does not fit column '{column}', which holds " \
                f"{self.column_types[column]} values"
        return None

    def _misfit_value(self, flt: MetadataFilter) -> str | None:
        """The first filter value that does not convert to its column's type."""
        pairs = [(c, v) for c, values in flt.equals.items() for v in values if v is not None]
        pairs += [(c, v) for c, bounds in flt.ranges.items() for v in bounds if v is not None]
        misfits = (self._misfit(column, value) for column, value in pairs
                   if column in self.column_types and not self.is_list(column))
        return next((misfit for misfit in misfits if misfit), None)

    def absent_filter_values(self, flt: MetadataFilter) -> list[str]:
        """One note for each filter column this table lacks and each filter value no row holds (a shared link
        made on other or older data): the filter widgets cannot show them, so they would be dropped silently."""
        notes: list[str] = []
        for column in {**flt.equals, **flt.ranges, **flt.contains_any}:
            if column not in self.column_types:
                notes.append(f"the link filters on '{column}', which this cache has no column for: ignored")
        for column, values in [*flt.equals.items(), *flt.contains_any.items()]:
            if column not in self.column_types:
                continue
            ident = quote_identifier(column)
            for value in values:
                if self.is_list(column):
                    sql, params = f"SELECT bool_or(list_contains({ident}, ?)) FROM {METADATA_TABLE}", [str(value)]
                elif value is None:
                    sql, params = f"SELECT bool_or({ident} IS NULL) FROM {METADATA_TABLE}", []
                elif (misfit := self._misfit(column, value)) is not None:
                    notes.append(f"the link's {misfit.removeprefix('the ')}: ignored")
                    continue
                else:
                    sql, params = f"SELECT bool_or({ident} = ?) FROM {METADATA_TABLE}", [value]
                if not self._query(sql, params).fetchone()[0]:
                    shown = "(missing)" if value is None else repr(value)
                    notes.append(f"the link's filter value {shown} of '{column}' no longer occurs in this cache: "
                                 "ignored")
        return notes

    def rows(self, ids: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Rows for `ids` in the order given (all rows when None).

        Many ids (a search's every searched image) are taken from one ordered read of the table: joining a
        million-id list took 1.4 s at 1M rows, reading them all 0.3 s. Ids are the table's rows 0..n-1 (the
        cache checks that when it opens), so an id is its row's position.
        """
        selected = ", ".join(self._check_column(c) for c in (columns or self.columns))
        if ids is None:
            return self._query(f"SELECT {selected} FROM {METADATA_TABLE} ORDER BY id").df()
        wanted = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if len(wanted) > DENSE_READ_SHARE * self.size and 0 <= wanted.min() and wanted.max() < self.size:
            table = self._query(f"SELECT {selected}, id AS __id FROM {METADATA_TABLE} ORDER BY id").df()
            if np.array_equal(table["__id"].to_numpy(), np.arange(len(table))):  # else: the join below
                return table.drop(columns=["__id"]).iloc[wanted].reset_index(drop=True)
        id_list = wanted.tolist()
        if not id_list:
            return self._query(f"SELECT {selected} FROM {METADATA_TABLE} LIMIT 0").df()
        frame = self._query(
            f"SELECT t.* FROM (SELECT {selected}, id AS __id FROM {METADATA_TABLE}) t "
            "JOIN (SELECT unnest(?::BIGINT[]) AS __want, generate_subscripts(?::BIGINT[], 1) AS __pos) w "
            "ON t.__id = w.__want ORDER BY w.__pos",
            [id_list, id_list],
        ).df()
        return frame.drop(columns=["__id"]).reset_index(drop=True)

    def distinct_values(self, column: str, limit: int = 200) -> list[Any]:
        ident = self._check_column(column)
        if self.is_list(column):
            sql = f"SELECT DISTINCT unnest({ident}) AS v FROM {METADATA_TABLE} ORDER BY v LIMIT ?"
        else:
            sql = f"SELECT DISTINCT {ident} AS v FROM {METADATA_TABLE} ORDER BY v NULLS LAST LIMIT ?"
        return [row[0] for row in self._query(sql, [limit]).fetchall()]

    @functools.cached_property
    def distinct_counts(self) -> dict[str, int]:
        """Distinct values per column (list columns: per element), computed once per opened cache."""
        parts = [
            f"(SELECT count(DISTINCT v) FROM (SELECT unnest({quote_identifier(c)}) AS v FROM {METADATA_TABLE}))"
            if self.is_list(c) else f"count(DISTINCT {quote_identifier(c)})"
            for c in self.columns
        ]
        row = self._query(f"SELECT {', '.join(parts)} FROM {METADATA_TABLE}").fetchone()
        return dict(zip(self.columns, (int(v) for v in row)))

    def chartable_columns(self) -> list[str]:
        return chartable_columns(self.column_types, self.distinct_counts)

    def value_range(self, column: str) -> tuple[Any, Any]:
        ident = self._check_column(column)
        return tuple(self._query(f"SELECT min({ident}), max({ident}) FROM {METADATA_TABLE}").fetchone())

    def close(self) -> None:
        self._con.close()
        _OPEN_STORES.discard(self)


_OPEN_STORES: "weakref.WeakSet[MetadataStore]" = weakref.WeakSet()


def close_all_stores() -> None:
    """Close every store still open: a long-lived process (the app) calls it at exit, before DuckDB's module is
    torn down, which otherwise reports each connection still alive as a leak (dozens of alarming lines)."""
    for store in list(_OPEN_STORES):
        store.close()
