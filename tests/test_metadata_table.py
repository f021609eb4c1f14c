"""metadata.duckdb's table, written from a frame: the types come from every row, not from a sample."""

from __future__ import annotations

import duckdb
import pandas as pd

from cache_builder.metadata_table import write_metadata_frame


def test_a_list_column_whose_first_thousand_sampled_rows_are_empty(tmp_path):
    """DuckDB infers an object column's type from 1,000 rows taken at a stride (every 3rd of 3,000 here): all
    empty lists there made the column NULL[] and the build fail after its whole feature extraction."""
    n = 3000
    tags = [["rain", "night"][: i % 3] for i in range(n)]
    frame = pd.DataFrame({"id": range(n), "path": [f"img/{i:07d}.jpg" for i in range(n)], "tags": tags})
    frame.attrs["list_columns"] = ["tags"]
    write_metadata_frame(tmp_path / "metadata.duckdb", frame)
    with duckdb.connect(str(tmp_path / "metadata.duckdb"), read_only=True) as con:
        assert dict(con.execute("DESCRIBE images").fetchall()[i][:2] for i in range(3))["tags"] == "VARCHAR[]"
        assert [row[0] for row in con.execute("SELECT tags FROM images ORDER BY id").fetchall()] == tags
