"""`csv:MANIFEST`: a CSV or Parquet manifest with a `path` column; every other column becomes metadata.

Paths are relative to the manifest's folder and may not leave it (`--allow-outside` lifts that). A `domain`
column fills the cache's `domain` (in/out, or any value such as a hospital's name; an `@DOMAIN` tag overrides
it, with a note) and a `source` column fills the cache's `source`. A user's `id` column is kept as
`id_original`, since `id` is the row of the feature arrays. `--multilabel COL` splits COL on `--sep` into a
list. pandas infers the column types; text columns that all parse as ISO dates become dates. The first of the
columns `label`, `class`, `species`, `category` is the cache's label column (the page's label agreement, the
captions, the first view's "an image that shows something").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cache_builder.errors import BuildError
from cache_builder.sources.base import Source, SourceItem, SourceOptions, read_table, resolve_inside


OWN_COLUMNS = ("domain", "source")  # the manifest's values become the cache's columns of these names
LABEL_COLUMNS = ("label", "class", "species", "category")  # names a manifest's class column goes by


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
    if "id" in frame.columns:
        frame = frame.rename(columns={"id": "id_original"})
    for column in OWN_COLUMNS:  # text like every other source's, whatever pandas inferred
        if column in frame.columns:
            frame[column] = frame[column].map(lambda v: None if _clean(v) is None else str(v))
    if "domain" in frame.columns and source.domain is not None:
        source.remarks.append(f"@{source.domain} overrides the manifest's own domain column for all "
                              f"{len(frame)} rows")
    for column in options.multilabel:
        if column not in frame.columns:
            raise BuildError(f"--multilabel {column}: {manifest.name} has no such column")
        frame[column] = frame[column].map(lambda v: _split_labels(v, options.sep))
    source.label_column = next((column for column in LABEL_COLUMNS if column in frame.columns), None)
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
