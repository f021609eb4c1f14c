"""`csv:MANIFEST`: a CSV or Parquet manifest with a `path` column; every other column becomes metadata.

Paths are relative to the manifest's folder and may not leave it (`--allow-outside` lifts that). Columns named
like the table's own (`id`, `source`, `domain`) are kept as `<name>_original`; `--multilabel COL` splits COL on
`--sep` into a list. pandas infers the column types; text columns that all parse as ISO dates become dates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cache_builder.errors import BuildError
from cache_builder.sources.base import RESERVED_COLUMNS, Source, SourceItem, SourceOptions, read_table, resolve_inside


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    if not arg:
        raise BuildError("csv source needs a manifest file, e.g. csv:/data/manifest.csv")
    manifest = Path(arg).expanduser()
    if not manifest.is_file():
        raise BuildError(f"csv source: manifest '{arg}' does not exist")
    frame = read_table(manifest)
    if "path" not in frame.columns:
        raise BuildError(
            f"csv source: {manifest.name} has no 'path' column (columns: {', '.join(map(str, frame.columns))})"
        )
    clashes = [c for c in RESERVED_COLUMNS if c in frame.columns and c != "path"]
    if clashes:
        frame = frame.rename(columns={c: f"{c}_original" for c in clashes})
    for column in options.multilabel:
        if column not in frame.columns:
            raise BuildError(f"--multilabel {column}: {manifest.name} has no such column")
        frame[column] = frame[column].map(lambda v: _split_labels(v, options.sep))
    root = manifest.resolve().parent
    items = []
    for row_number, record in enumerate(frame.to_dict("records"), start=2):
        raw = record.pop("path")
        if not isinstance(raw, str) or not raw.strip():
            raise BuildError(f"{manifest.name} row {row_number}: empty path")
        file = resolve_inside(root, raw, options.allow_outside, f"{manifest.name} row {row_number}")
        metadata = {column: _clean(value) for column, value in record.items()}
        items.append(SourceItem(path=raw, metadata=metadata, file=str(file)))
    return items


def _split_labels(value: Any, sep: str) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    return [part.strip() for part in str(value).split(sep) if part.strip()]


def _clean(value: Any) -> Any:
    """pandas' missing markers become None so DuckDB stores NULL."""
    if isinstance(value, list):
        return value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value
