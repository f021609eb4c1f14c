"""Public datasets in their own on-disk formats, with the metadata that matters already named and typed.

Each lister reads a format's index files, keeps the rows whose image exists, and counts what it had to drop
(missing files, unknown categories, duplicated ids) in `source.notes`, which the manifest records. Nothing
here opens an image: decoding happens in the builder's workers, where unreadable files are skipped too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd

from cache_builder.errors import BuildError

if TYPE_CHECKING:
    from cache_builder.sources import Source, SourceItem, SourceOptions


def _root(arg: str, kind: str) -> Path:
    from cache_builder.sources import existing_dir  # sources imports this module: import at call time

    return existing_dir(arg, kind)

IWILDCAM_IN_SPLITS = frozenset({"train", "id_val", "id_test"})
IWILDCAM_OUT_SPLITS = frozenset({"val", "test"})


def _require_columns(frame: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BuildError(f"{what} lacks the column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})")


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise BuildError(f"{what}: {path} does not exist")
    try:
        return pd.read_csv(path, encoding_errors="replace")
    except (OSError, ValueError) as exc:
        raise BuildError(f"{what}: cannot read {path.name}: {exc}".splitlines()[0]) from None


def _timestamp(value: Any) -> pd.Timestamp | None:
    try:
        parsed = pd.to_datetime(value)
    except (ValueError, TypeError):
        return None
    return None if pd.isna(parsed) else parsed.tz_localize(None) if parsed.tzinfo else parsed


def display_path(path: Path, root: Path) -> str:
    """Relative path as text; names that are not UTF-8 are shown with U+FFFD instead of breaking the table."""
    raw = path.relative_to(root).as_posix()
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _item(path: Path, root: Path, metadata: dict[str, Any]) -> "SourceItem":
    from cache_builder.sources import SourceItem

    return SourceItem(path=display_path(path, root), metadata=metadata, file=str(path))


def _integer(value: Any) -> int | None:
    try:
        return None if pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ iWildCam


def list_iwildcam(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """WILDS iWildCam v2.0: metadata.csv + categories.csv, images in train/."""
    root = _root(arg, "iwildcam")
    metadata = _read_csv(root / "metadata.csv", "iwildcam")
    categories = _read_csv(root / "categories.csv", "iwildcam")
    _require_columns(metadata, ("split", "location_remapped", "y", "filename"), "iwildcam metadata.csv")
    _require_columns(categories, ("y", "name"), "iwildcam categories.csv")
    names = dict(zip(categories["y"].astype(int), categories["name"].astype(str)))
    unknown_splits = set(options.splits) - IWILDCAM_IN_SPLITS - IWILDCAM_OUT_SPLITS
    if unknown_splits:
        raise BuildError(f"--split {', '.join(sorted(unknown_splits))}: iWildCam splits are "
                         f"{', '.join(sorted(IWILDCAM_IN_SPLITS | IWILDCAM_OUT_SPLITS))}")
    seen: set[str] = set()
    items = []
    for row in metadata.to_dict("records"):
        split = str(row["split"])
        if options.splits and split not in options.splits:
            continue
        filename = str(row["filename"])
        if filename in seen:
            source.notes["duplicated image ids"] += 1
            continue
        seen.add(filename)
        path = root / "train" / filename
        if not path.is_file():
            source.notes["rows without an image file"] += 1
            continue
        y = _integer(row["y"])
        species = names.get(y) if y is not None else None
        if species is None:
            source.notes["unknown category ids"] += 1
        items.append(_item(path, root, {
            "location": f"loc{_integer(row['location_remapped']):04d}" if _integer(row["location_remapped"])
            is not None else None,
            "species": species,
            "split": split,
            "domain": "in" if split in IWILDCAM_IN_SPLITS else "out" if split in IWILDCAM_OUT_SPLITS else None,
            "datetime": _timestamp(row.get("datetime")),
            "sequence": None if pd.isna(row.get("sequence")) else str(row.get("sequence")),
        }))
    return items


# ------------------------------------------------------------------------------------------ ChestX-ray14


def list_chestxray14(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """NIH ChestX-ray14: Data_Entry_2017*.csv, images in images*/ folders, optional BBox_List_2017.csv."""
    root = _root(arg, "chestxray14")
    tables = sorted(root.glob("Data_Entry_2017*.csv"))
    if not tables:
        raise BuildError(f"chestxray14: no Data_Entry_2017*.csv in {root}")
    entries = pd.concat([_read_csv(t, "chestxray14") for t in tables], ignore_index=True)
    entries.columns = [str(c).strip() for c in entries.columns]
    _require_columns(entries, ("Image Index", "Finding Labels"), tables[0].name)
    files: dict[str, Path] = {}
    for folder in sorted(p for p in root.glob("images*") if p.is_dir()):
        for path in sorted(folder.rglob("*.png")):
            files.setdefault(path.name, path)
    boxes = _chestxray_boxes(root / "BBox_List_2017.csv")
    seen: set[str] = set()
    items = []
    for row in entries.to_dict("records"):
        name = str(row["Image Index"])
        if name in seen:
            source.notes["duplicated image ids"] += 1
            continue
        seen.add(name)
        path = files.get(name)
        if path is None:
            source.notes["rows without an image file"] += 1
            continue
        found = boxes.get(name, [])
        items.append(_item(path, root, {
            "diagnoses": [d.strip() for d in str(row["Finding Labels"]).split("|") if d.strip()],
            "patient_id": _integer(row.get("Patient ID")),
            "age": _integer(row.get("Patient Age")),
            "sex": row.get("Patient Gender") if isinstance(row.get("Patient Gender"), str) else None,
            "view_position": row.get("View Position") if isinstance(row.get("View Position"), str) else None,
            "follow_up": _integer(row.get("Follow-up #")),
            "bbox_labels": [label for label, *_ in found],
            "bboxes": json.dumps(found) if found else None,
        }))
    return items


def _chestxray_boxes(path: Path) -> dict[str, list[list[Any]]]:
    """Image name -> [[finding, x, y, w, h], ...]; the file's header splits "Bbox [x,y,w,h]" over four columns."""
    if not path.is_file():
        return {}
    frame = _read_csv(path, "chestxray14 boxes")
    if frame.shape[1] < 6:
        raise BuildError(f"chestxray14: {path.name} needs Image Index, Finding Label and four box columns")
    boxes: dict[str, list[list[Any]]] = {}
    for row in frame.itertuples(index=False):
        try:
            x, y, w, h = (round(float(v), 1) for v in row[2:6])
        except (TypeError, ValueError):
            continue
        boxes.setdefault(str(row[0]), []).append([str(row[1]), x, y, w, h])
    return boxes


# ------------------------------------------------------------------------------------- COCO Camera Traps


def list_coco_cameratraps(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """LILA's COCO Camera Traps JSON: images with location/datetime/seq_id, annotations with categories."""
    from cache_builder.sources import _resolve_inside

    json_part, _, image_root_part = arg.partition(":")
    index = Path(json_part).expanduser()
    if not index.is_file():
        raise BuildError(f"coco-cameratraps: {json_part or '(no file)'} is not a JSON file; use "
                         "coco-cameratraps:FILE.json[:IMAGE_ROOT]")
    try:
        data = json.loads(index.read_text(encoding="utf-8", errors="replace"))
        images, annotations, categories = data["images"], data.get("annotations", []), data.get("categories", [])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BuildError(f"coco-cameratraps: {index.name} is not COCO Camera Traps JSON ({exc})") from None
    image_root = Path(image_root_part).expanduser().resolve() if image_root_part else index.resolve().parent
    names = {c["id"]: str(c["name"]) for c in categories if "id" in c and "name" in c}
    species: dict[Any, set[str]] = {}
    boxes: Counter = Counter()
    for annotation in annotations:
        name = names.get(annotation.get("category_id"))
        if name is None:
            source.notes["unknown category ids"] += 1
            name = "unknown"
        species.setdefault(annotation.get("image_id"), set()).add(name)
        boxes[annotation.get("image_id")] += 1 if annotation.get("bbox") else 0
    in_domain = _domain_locations(options.domain_locations)
    seen: set[Any] = set()
    items = []
    for image in images:
        image_id = image.get("id")
        if image_id in seen:
            source.notes["duplicated image ids"] += 1
            continue
        seen.add(image_id)
        file_name = image.get("file_name")
        if not isinstance(file_name, str):
            source.notes["rows without an image file"] += 1
            continue
        path = _resolve_inside(image_root, file_name, options.allow_outside, f"{index.name} image {image_id}")
        if not path.is_file():
            source.notes["rows without an image file"] += 1
            continue
        location = None if image.get("location") is None else str(image["location"])
        items.append(_item(path, image_root, {
            "image_id": str(image_id),
            "location": location,
            "domain": None if in_domain is None else ("in" if location in in_domain else "out"),
            "datetime": _timestamp(image.get("datetime")),
            "seq_id": None if image.get("seq_id") is None else str(image["seq_id"]),
            "species": sorted(species.get(image_id, set())),
            "bbox_count": int(boxes.get(image_id, 0)),
        }))
    return items


def _domain_locations(path: str | None) -> set[str] | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise BuildError(f"--domain-locations {path}: no such file (one in-domain location per line)")
    return {line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()}


# ----------------------------------------------------------------------------------------------- ImageNet


def list_imagenet(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """ImageNet-style class folders (<wnid>/<image>): val, ImageNet-A/-R/-Sketch line up by `wnid`."""
    from cache_builder.sources import IMAGE_EXTENSIONS

    root = _root(arg, "imagenet")
    describe = _wnid_descriptions()
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        wnid = display_path(folder, root)
        label = describe.get(wnid)
        files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if label is None and files:
            source.notes["images of unknown wnids"] += len(files)
        items.extend(_item(p, root, {"wnid": wnid, "label": label}) for p in files)
    return items


def _wnid_descriptions() -> dict[str, str]:
    """wnid -> first lemma ("n02124075" -> "Egyptian cat"), from the class list timm ships (no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return {wnid: info.label_name_to_description(wnid).split(",")[0].strip() for wnid in info.label_names()}
