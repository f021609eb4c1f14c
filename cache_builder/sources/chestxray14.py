"""`chestxray14:ROOT`: NIH ChestX-ray14 (Data_Entry_2017*.csv, images in images*/ folders, BBox_List_2017.csv).

NIH writes an image's findings pipe-separated in one cell ("Cardiomegaly|Effusion"): they become the list column
`diagnoses`, the dataset's label. The optional box table splits its "Bbox [x,y,w,h]" header over four columns;
its boxes are stored per image as JSON (`bboxes`) with their findings in `bbox_labels`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from cache_builder.errors import BuildError
from cache_builder.sources.base import (Source, SourceItem, SourceOptions, as_integer, as_text, disk_item, existing_dir,
                                        first_sighting, missing_reason, read_index_csv, require_columns, walked_file)


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    root = existing_dir(arg, "chestxray14")
    source.label_column = "diagnoses"
    source.frame = "crop"  # NIH's frames are square: a crop loses nothing
    tables = sorted(root.glob("Data_Entry_2017*.csv"))
    if not tables:
        raise BuildError(f"chestxray14: no Data_Entry_2017*.csv in {root}")
    table = tables[-1]  # the 2017 table and its v2020 revision list the same images: the latest one wins
    entries = read_index_csv(table, "chestxray14")
    require_columns(entries, ("Image Index", "Finding Labels"), table.name)
    files: dict[str, Path] = {}
    for folder in sorted(p for p in root.glob("images*") if p.is_dir()):
        for path in sorted(folder.rglob("*.png")):
            files.setdefault(path.name, path)
    boxes = _boxes(root / "BBox_List_2017.csv")
    seen: set[str] = set()
    items = []
    for row in entries.to_dict("records"):
        name = as_text(row["Image Index"])
        if not first_sighting(name, seen, source):
            continue
        path = files.get(name)
        if path is None:
            source.notes[missing_reason(name or "")] += 1
            continue
        found = boxes.get(name, [])
        items.append(disk_item(path, root, {
            "diagnoses": _findings(row["Finding Labels"]),
            "patient_id": as_integer(row.get("Patient ID")),
            "age": _age(row.get("Patient Age")),
            "sex": as_text(row.get("Patient Gender")),
            "view_position": as_text(row.get("View Position")),
            "follow_up": as_integer(row.get("Follow-up #")),
            "bbox_labels": [label for label, *_ in found],
            "bboxes": json.dumps(found) if found else None,
        }, walked_file(path, root, options, "chestxray14")))
    return items


def _findings(value: Any) -> list[str]:
    """"Cardiomegaly|Effusion" -> both; "No Finding" stays a value of its own; an empty cell is no list item."""
    text = as_text(value)
    return [] if text is None else [d.strip() for d in text.split("|") if d.strip()]


def _age(value: Any) -> int | None:
    """Years as an integer; early releases of the table wrote ages as "058Y"."""
    text = as_text(value)
    match = re.match(r"^(\d+)\s*[Yy]?$", text) if text else None
    return int(match.group(1)) if match else as_integer(value)


def _boxes(path: Path) -> dict[str, list[list[Any]]]:
    """Image name -> [[finding, x, y, w, h], ...]; the file's header splits "Bbox [x,y,w,h]" over four columns."""
    if not path.is_file():
        return {}
    frame = read_index_csv(path, "chestxray14 boxes")
    if frame.shape[1] < 6:
        raise BuildError(f"chestxray14: {path.name} needs Image Index, Finding Label and four box columns "
                         f"(has: {', '.join(map(str, frame.columns))})")
    boxes: dict[str, list[list[Any]]] = {}
    for row in frame.itertuples(index=False):
        try:
            x, y, w, h = (round(float(v), 1) for v in row[2:6])
        except (TypeError, ValueError):
            continue
        if not all(map(pd.notna, (x, y, w, h))) or as_text(row[0]) is None:
            continue
        boxes.setdefault(str(row[0]).strip(), []).append([as_text(row[1]) or "unknown", x, y, w, h])
    return boxes
