"""The one place SQL text is assembled: identifiers are quoted here, values are always bound parameters."""

from __future__ import annotations


def quote_identifier(name: str) -> str:
    """A column name from a user's CSV as a DuckDB identifier, whatever characters it holds."""
    return '"' + str(name).replace('"', '""') + '"'
