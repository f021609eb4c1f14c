"""Result tables as files to share: the same columns from the dashboard's download buttons and the CLI."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

LIST_SEPARATOR = "|"


def _flatten_lists(table: pd.DataFrame) -> pd.DataFrame:
    """Spreadsheets have no list type: list cells become `a|b` strings."""
    flat = table.copy()
    for column in flat.columns:
        if flat[column].map(is_list_value).any():
            flat[column] = flat[column].map(lambda v: LIST_SEPARATOR.join(map(str, v)) if is_list_value(v) else "")
    return flat


def is_list_value(value: object) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def to_csv(table: pd.DataFrame) -> str:
    return _flatten_lists(table).to_csv(index=False)


def to_json(table: pd.DataFrame) -> str:
    return table.to_json(orient="records", date_format="iso", indent=2)


def to_parquet(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def format_value(value) -> str:
    """Short display form of a metadata cell: lists joined as in the CSV, missing values as a dash."""
    if is_list_value(value):
        return LIST_SEPARATOR.join(map(str, value)) or "–"
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
