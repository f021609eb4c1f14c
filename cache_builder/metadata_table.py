"""The `images` table of metadata.duckdb: written here (row `id` of the table is row `id` of the feature arrays)
and summarised for `python -m cache_builder info`. The dashboard's reads are in `dashboard.metadata`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from cache_builder import cache_format as fmt
from cache_builder.cache_format import quote_identifier
from cache_builder.errors import BuildError
from cache_builder.sources import Source, SourceItem


def metadata_frame(rows: list[tuple[Source, SourceItem]]) -> pd.DataFrame:
    """One typed column per metadata field; lists stay lists (stored as VARCHAR[])."""
    records: list[dict[str, Any]] = []
    for image_id, (source, item) in enumerate(rows):
        own_source = item.metadata.get("source")  # a manifest's own source column, where it has one
        record: dict[str, Any] = {"id": image_id, "path": item.path,
                                  "source": own_source if own_source is not None else source.spec}
        record["domain"] = source.domain if source.domain is not None else item.metadata.get("domain")
        record.update({k: v for k, v in item.metadata.items() if k not in record})
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    list_columns = [c for c in frame.columns if frame[c].map(lambda v: isinstance(v, list)).any()]
    plain = [c for c in frame.columns if c not in list_columns]
    frame[plain] = frame[plain].convert_dtypes()
    for column in list_columns:
        frame[column] = frame[column].map(_as_list)
    frame.attrs["list_columns"] = list_columns
    return frame


def _as_list(value: Any) -> list[str]:
    """A list cell as text; a scalar from a source that stores the column as text becomes a one-value list."""
    if isinstance(value, list):
        return [str(x) for x in value]
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return []
    return [str(value)]


def write_metadata(path: Path, rows: list[tuple[Source, SourceItem]]) -> None:
    write_metadata_frame(path, metadata_frame(rows))


def write_metadata_frame(path: Path, frame: pd.DataFrame) -> None:
    """Written to a temporary file and renamed, so a reader never sees a half-written table."""
    list_columns = frame.attrs.get("list_columns") or [
        c for c in frame.columns if frame[c].map(lambda v: isinstance(v, list)).any()
    ]
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    leftovers = (tmp, tmp.with_name(tmp.name + ".wal"))  # a stale write-ahead log would be replayed into tmp
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    casts = ", ".join(
        f"CAST({quote_identifier(c)} AS VARCHAR[]) AS {quote_identifier(c)}" if c in list_columns
        else quote_identifier(c)
        for c in frame.columns
    )
    try:
        with duckdb.connect(str(tmp)) as con:
            # DuckDB guesses an object column's type from a sample of 1,000 rows; a list column whose sampled
            # rows are all empty would get the type NULL[] and fail on the first value. Look at every row.
            con.execute(f"SET pandas_analyze_sample = {max(len(frame), 1)}")
            con.register("frame", frame)
            con.execute(f"CREATE TABLE {fmt.METADATA_TABLE} AS SELECT {casts} FROM frame ORDER BY id")
            con.unregister("frame")
            # Move the table from the write-ahead log into the file now: a checkpoint that fails when the
            # connection closes (disk full) is silent and leaves the table only in the .wal, which the rename
            # below would leave behind, giving a metadata.duckdb without its table.
            con.execute("CHECKPOINT")
    except duckdb.Error as exc:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        raise BuildError(f"could not write {path}: {str(exc).splitlines()[0]}; fix the cause and rerun the same "
                         "command to resume (the extracted features are kept)") from None
    os.replace(tmp, path)


_RANGE_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "FLOAT", "DOUBLE", "DECIMAL", "UTINYINT",
                "USMALLINT", "UINTEGER", "UBIGINT", "DATE", "TIMESTAMP", "TIME")


def column_summaries(path: Path, limit: int = 5) -> dict[str, str]:
    """Per column: the range of numbers and dates, else the `limit` most frequent values (list elements counted)."""
    table = fmt.METADATA_TABLE
    summary = {}
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise fmt.CacheError(f"{path} is unreadable: {str(exc).splitlines()[0]}") from None
    with con:
        for column, kind, *_ in con.execute(f"DESCRIBE {table}").fetchall():
            if column in ("id", "path"):
                continue
            ident = quote_identifier(column)
            if kind.startswith(_RANGE_TYPES) and not kind.endswith("[]"):
                lo, hi = con.execute(f"SELECT min({ident}), max({ident}) FROM {table}").fetchone()
                summary[column] = f"{kind} from {lo} to {hi}"
                continue
            values = f"unnest({ident})" if kind.endswith("[]") else ident
            rows = con.execute(f"SELECT v, count(*) AS n FROM (SELECT {values} AS v FROM {table}) "
                               "GROUP BY v ORDER BY n DESC, v LIMIT ?", [limit]).fetchall()
            summary[column] = f"{kind}: " + ", ".join(f"{v}={n}" for v, n in rows)
    return summary
