"""`iwildcam:ROOT`: WILDS iWildCam v2.0 (metadata.csv + categories.csv, images in train/).

WILDS remaps the camera locations to numbers (`location_remapped`, shown as `loc0042`) and splits them into
in-domain (`train`, `id_val`, `id_test`) and out-of-domain (`val`, `test`) cameras: that split is the `domain`
column. `--split` keeps only some splits.
"""

from __future__ import annotations

from cache_builder.errors import BuildError
from cache_builder.sources.base import (MISSING_FILE, UNKNOWN_CATEGORY, Source, SourceItem, SourceOptions, as_integer,
                                        as_text, disk_item, existing_dir, first_sighting, indexed_file,
                                        parse_timestamps, read_index_csv, require_columns)

IWILDCAM_IN_SPLITS = frozenset({"train", "id_val", "id_test"})
IWILDCAM_OUT_SPLITS = frozenset({"val", "test"})


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    root = existing_dir(arg, "iwildcam")
    source.label_column = "species"
    source.frame = "fit"  # camera-trap frames are wide: an animal at the edge must stay searchable
    metadata = read_index_csv(root / "metadata.csv", "iwildcam")
    categories = read_index_csv(root / "categories.csv", "iwildcam")
    require_columns(metadata, ("split", "location_remapped", "y", "filename"), "iwildcam metadata.csv")
    require_columns(categories, ("y", "name"), "iwildcam categories.csv")
    names = {y: name for y, name in zip(map(as_integer, categories["y"]), map(as_text, categories["name"]))
             if y is not None and name is not None}
    unknown_splits = set(options.splits) - IWILDCAM_IN_SPLITS - IWILDCAM_OUT_SPLITS
    if unknown_splits:
        raise BuildError(f"--split {', '.join(sorted(unknown_splits))}: iWildCam splits are "
                         f"{', '.join(sorted(IWILDCAM_IN_SPLITS | IWILDCAM_OUT_SPLITS))}")
    if options.splits:
        metadata = metadata[metadata["split"].isin(options.splits)]
    rows = metadata.to_dict("records")
    datetimes = parse_timestamps(row.get("datetime") for row in rows)
    images = root / "train"
    seen: set[str] = set()
    items = []
    for number, (row, when) in enumerate(zip(rows, datetimes), start=2):
        filename = as_text(row["filename"])
        if filename is None:
            source.notes[MISSING_FILE] += 1
            continue
        if not first_sighting(filename, seen, source):
            continue
        file = indexed_file(images, filename, options, f"iwildcam metadata.csv row {number}", source)
        if file is None:
            continue
        y = as_integer(row["y"])
        species = names.get(y) if y is not None else None
        if species is None:
            source.notes[UNKNOWN_CATEGORY] += 1
        location = as_integer(row["location_remapped"])
        split = as_text(row["split"])
        items.append(disk_item(images / filename, root, {
            "location": None if location is None else f"loc{location:04d}",
            "species": species,
            "split": split,
            "domain": "in" if split in IWILDCAM_IN_SPLITS else "out" if split in IWILDCAM_OUT_SPLITS else None,
            "datetime": when,
            "sequence": as_text(row.get("sequence")),
        }, file))
    return items
