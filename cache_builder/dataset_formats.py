"""Public datasets in their own on-disk formats, with the metadata that matters already named and typed.

Why a module of its own: each format has its index files, id scheme and quirks (WILDS' remapped locations,
NIH's pipe-separated findings and split box header, COCO's image/annotation join, ImageNet's wnids), and a
user should get clear, typed, filterable columns from the one `--source KIND:ROOT` argument instead of
writing a manifest by hand. `sources.parse_source` stays the single entry point; it registers these listers.

Each lister reads a format's index files, keeps the rows whose image exists, and counts what it had to drop
(missing files, duplicated ids) or keep with a NULL/"unknown" value (unknown category ids or wnids) in
`source.notes`, which the manifest records and the CLI prints. Malformed index files are a `BuildError`
naming what is wrong; nothing here opens an image: decoding happens in the builder's workers, where
unreadable files are skipped and listed too. Each lister also names its `source.label_column`, the column
that holds an image's class (the dashboard's label agreement).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd

from cache_builder.errors import BuildError

if TYPE_CHECKING:
    from cache_builder.sources import Source, SourceItem, SourceOptions

IWILDCAM_IN_SPLITS = frozenset({"train", "id_val", "id_test"})
IWILDCAM_OUT_SPLITS = frozenset({"val", "test"})
MISSING_FILE = "rows without an image file"
NOT_UTF8 = "rows whose file name is not UTF-8"  # read as U+FFFD, so the file cannot be found
DUPLICATE = "duplicated image ids"
UNKNOWN_CATEGORY = "unknown category ids"
UNKNOWN_WNID = "images of unknown wnids"
KEPT_REASONS = frozenset({UNKNOWN_CATEGORY, UNKNOWN_WNID})  # counted, but the image stays (class NULL/"unknown")
# ImageNet-1k has two classes named "crane" and two whose first lemma is "maillot": distinct labels instead.
IMAGENET_LABEL_OVERRIDES = {"n02012849": "crane (bird)", "n03126707": "crane (machine)",
                            "n03710637": "maillot", "n03710721": "tank suit"}
_EXIF_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})")


def _root(arg: str, kind: str) -> Path:
    from cache_builder.sources import existing_dir  # sources imports this module: import at call time

    return existing_dir(arg, kind)


def _require_columns(frame: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BuildError(f"{what} lacks the column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})")


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    """Bytes that are not UTF-8 become U+FFFD: such a row's file is then not found and counted, never a crash."""
    if not path.is_file():
        raise BuildError(f"{what}: {path} does not exist")
    try:
        frame = pd.read_csv(path, encoding_errors="replace", dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise BuildError(f"{what}: cannot read {path.name}: {exc}".splitlines()[0]) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _timestamp(value: Any) -> pd.Timestamp | None:
    try:
        parsed = pd.to_datetime(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return None if pd.isna(parsed) else parsed.tz_localize(None) if parsed.tzinfo else parsed


def _timestamps(values: Iterable[Any]) -> list[pd.Timestamp | None]:
    """A whole column at once (one value at a time costs ~0.3 ms: a minute on iWildCam, hours on big LILA sets).

    EXIF-style `2019:05:01 08:00:00` reads as a date (pandas alone makes it year 1); time zones are dropped;
    text that is not a date becomes NULL.
    """
    texts = pd.Series([_EXIF_DATE.sub(r"\1-\2-\3", v.strip()) if isinstance(v, str) else None for v in values],
                      dtype=object)
    if texts.empty:
        return []
    try:
        parsed = pd.to_datetime(texts, errors="coerce", format="ISO8601")
        if getattr(parsed.dt, "tz", None) is not None:
            parsed = parsed.dt.tz_localize(None)
        result = [None if pd.isna(v) else v for v in parsed]
    except (ValueError, TypeError, OverflowError):  # mixed time zones, out-of-range years: value by value
        result = [None] * len(texts)
    return [r if r is not None or t is None else _timestamp(t) for r, t in zip(result, texts)]


def display_path(path: Path, root: Path) -> str:
    """Relative path as text; names that are not UTF-8 are shown with U+FFFD instead of breaking the table."""
    raw = path.relative_to(root).as_posix()
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _item(path: Path, root: Path, metadata: dict[str, Any], file: Path | None = None) -> "SourceItem":
    """`path` as the table shows it (relative to ROOT), `file` what the worker opens (default: `path`)."""
    from cache_builder.sources import SourceItem

    return SourceItem(path=display_path(path, root), metadata=metadata, file=str(file or path))


def _walked(path: Path, root: Path, options: "SourceOptions", kind: str) -> Path:
    """A file found by walking ROOT, refused (like folder sources) if it is a link leading outside ROOT."""
    from cache_builder.sources import _inside

    real = path.resolve()
    if not options.allow_outside and not _inside(root, real):
        raise BuildError(f"{kind} source: '{display_path(path, root)}' is a link to a file outside {root}; "
                         "pass --allow-outside to follow it")
    return real


def _missing(name: str) -> str:
    """Why a row's file was not found: a name that was not UTF-8 in the index is told apart from a missing file."""
    return NOT_UTF8 if "\ufffd" in name else MISSING_FILE


def _integer(value: Any) -> int | None:
    try:
        return None if pd.isna(value) else int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # not a scalar
        pass
    text = str(value).strip()
    return text or None


# ------------------------------------------------------------------------------------------------ iWildCam


def list_iwildcam(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """WILDS iWildCam v2.0: metadata.csv + categories.csv, images in train/."""
    from cache_builder.sources import _resolve_inside

    root = _root(arg, "iwildcam")
    source.label_column = "species"
    metadata = _read_csv(root / "metadata.csv", "iwildcam")
    categories = _read_csv(root / "categories.csv", "iwildcam")
    _require_columns(metadata, ("split", "location_remapped", "y", "filename"), "iwildcam metadata.csv")
    _require_columns(categories, ("y", "name"), "iwildcam categories.csv")
    names = {y: name for y, name in zip(map(_integer, categories["y"]), map(_text, categories["name"]))
             if y is not None and name is not None}
    unknown_splits = set(options.splits) - IWILDCAM_IN_SPLITS - IWILDCAM_OUT_SPLITS
    if unknown_splits:
        raise BuildError(f"--split {', '.join(sorted(unknown_splits))}: iWildCam splits are "
                         f"{', '.join(sorted(IWILDCAM_IN_SPLITS | IWILDCAM_OUT_SPLITS))}")
    if options.splits:
        metadata = metadata[metadata["split"].isin(options.splits)]
    rows = metadata.to_dict("records")
    datetimes = _timestamps(row.get("datetime") for row in rows)
    images = root / "train"
    seen: set[str] = set()
    items = []
    for number, (row, when) in enumerate(zip(rows, datetimes), start=2):
        filename = _text(row["filename"])
        if filename is None:
            source.notes[MISSING_FILE] += 1
            continue
        if filename in seen:
            source.notes[DUPLICATE] += 1
            continue
        seen.add(filename)
        file = _resolve_inside(images, filename, options.allow_outside, f"iwildcam metadata.csv row {number}")
        if not file.is_file():
            source.notes[_missing(filename)] += 1
            continue
        y = _integer(row["y"])
        species = names.get(y) if y is not None else None
        if species is None:
            source.notes[UNKNOWN_CATEGORY] += 1
        location = _integer(row["location_remapped"])
        split = _text(row["split"])
        items.append(_item(images / filename, root, {
            "location": None if location is None else f"loc{location:04d}",
            "species": species,
            "split": split,
            "domain": "in" if split in IWILDCAM_IN_SPLITS else "out" if split in IWILDCAM_OUT_SPLITS else None,
            "datetime": when,
            "sequence": _text(row.get("sequence")),
        }, file))
    return items


# ------------------------------------------------------------------------------------------ ChestX-ray14


def list_chestxray14(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """NIH ChestX-ray14: Data_Entry_2017*.csv, images in images*/ folders, optional BBox_List_2017.csv."""
    root = _root(arg, "chestxray14")
    source.label_column = "diagnoses"
    tables = sorted(root.glob("Data_Entry_2017*.csv"))
    if not tables:
        raise BuildError(f"chestxray14: no Data_Entry_2017*.csv in {root}")
    table = tables[-1]  # the 2017 table and its v2020 revision list the same images: the latest one wins
    entries = _read_csv(table, "chestxray14")
    _require_columns(entries, ("Image Index", "Finding Labels"), table.name)
    files: dict[str, Path] = {}
    for folder in sorted(p for p in root.glob("images*") if p.is_dir()):
        for path in sorted(folder.rglob("*.png")):
            files.setdefault(path.name, path)
    boxes = _chestxray_boxes(root / "BBox_List_2017.csv")
    seen: set[str] = set()
    items = []
    for row in entries.to_dict("records"):
        name = _text(row["Image Index"])
        if name is not None and name in seen:
            source.notes[DUPLICATE] += 1
            continue
        seen.add(name)
        path = files.get(name)
        if path is None:
            source.notes[_missing(name or "")] += 1
            continue
        found = boxes.get(name, [])
        items.append(_item(path, root, {
            "diagnoses": _findings(row["Finding Labels"]),
            "patient_id": _integer(row.get("Patient ID")),
            "age": _age(row.get("Patient Age")),
            "sex": _text(row.get("Patient Gender")),
            "view_position": _text(row.get("View Position")),
            "follow_up": _integer(row.get("Follow-up #")),
            "bbox_labels": [label for label, *_ in found],
            "bboxes": json.dumps(found) if found else None,
        }, _walked(path, root, options, "chestxray14")))
    return items


def _findings(value: Any) -> list[str]:
    """"Cardiomegaly|Effusion" -> both; "No Finding" stays a value of its own; an empty cell is no list item."""
    text = _text(value)
    return [] if text is None else [d.strip() for d in text.split("|") if d.strip()]


def _age(value: Any) -> int | None:
    """Years as an integer; early releases of the table wrote ages as "058Y"."""
    text = _text(value)
    match = re.match(r"^(\d+)\s*[Yy]?$", text) if text else None
    return int(match.group(1)) if match else _integer(value)


def _chestxray_boxes(path: Path) -> dict[str, list[list[Any]]]:
    """Image name -> [[finding, x, y, w, h], ...]; the file's header splits "Bbox [x,y,w,h]" over four columns."""
    if not path.is_file():
        return {}
    frame = _read_csv(path, "chestxray14 boxes")
    if frame.shape[1] < 6:
        raise BuildError(f"chestxray14: {path.name} needs Image Index, Finding Label and four box columns "
                         f"(has: {', '.join(map(str, frame.columns))})")
    boxes: dict[str, list[list[Any]]] = {}
    for row in frame.itertuples(index=False):
        try:
            x, y, w, h = (round(float(v), 1) for v in row[2:6])
        except (TypeError, ValueError):
            continue
        if not all(map(pd.notna, (x, y, w, h))) or _text(row[0]) is None:
            continue
        boxes.setdefault(str(row[0]).strip(), []).append([_text(row[1]) or "unknown", x, y, w, h])
    return boxes


# ------------------------------------------------------------------------------------- COCO Camera Traps


def list_coco_cameratraps(arg: str, options: "SourceOptions", source: "Source") -> list["SourceItem"]:
    """LILA's COCO Camera Traps JSON: images with location/datetime/seq_id, annotations with categories."""
    from cache_builder.sources import _resolve_inside

    source.label_column = "species"
    json_part, _, image_root_part = arg.partition(":")
    index = Path(json_part).expanduser()
    if not index.is_file():
        raise BuildError(f"coco-cameratraps: {json_part or '(no file)'} is not a JSON file; use "
                         "coco-cameratraps:FILE.json[:IMAGE_ROOT]")
    images, annotations, categories = _coco_lists(index, source)
    image_root = Path(image_root_part).expanduser().resolve() if image_root_part else index.resolve().parent
    if not image_root.is_dir():
        raise BuildError(f"coco-cameratraps: image folder '{image_root_part}' is not a folder")
    names = {_key(c.get("id")): str(c["name"]) for c in categories if "id" in c and c.get("name") is not None}
    species: dict[Any, set[str]] = {}
    boxes: Counter = Counter()
    for annotation in annotations:
        name = names.get(_key(annotation.get("category_id")))
        if name is None:
            source.notes[UNKNOWN_CATEGORY] += 1
            name = "unknown"
        image_key = _key(annotation.get("image_id"))
        species.setdefault(image_key, set()).add(name)
        boxes[image_key] += 1 if annotation.get("bbox") else 0
    in_domain = _domain_locations(options.domain_locations)
    seen: set[Any] = set()
    kept: list[tuple[Path, Path, dict[str, Any]]] = []
    for image in images:
        image_key, file_name = _key(image.get("id")), image.get("file_name")
        if image_key is None or not isinstance(file_name, str) or not file_name.strip():
            source.notes["image entries without an id or file_name"] += 1
            continue
        if image_key in seen:
            source.notes[DUPLICATE] += 1
            continue
        seen.add(image_key)
        file = _resolve_inside(image_root, file_name, options.allow_outside, f"{index.name} image {image_key}")
        if not file.is_file():
            source.notes[_missing(file_name)] += 1
            continue
        kept.append((image_root / file_name, file, image))
    datetimes = _timestamps(image.get("datetime") for _, _, image in kept)
    items = []
    for (path, file, image), when in zip(kept, datetimes):
        image_key = _key(image["id"])
        location = _text(image.get("location"))
        items.append(_item(path, image_root, {
            "image_id": str(image["id"]),
            "location": location,
            "domain": None if in_domain is None else ("in" if location in in_domain else "out"),
            "datetime": when,
            "seq_id": _text(image.get("seq_id")),
            "species": sorted(species.get(image_key, set())),
            "bbox_count": int(boxes.get(image_key, 0)),
        }, file))
    return items


def _coco_lists(index: Path, source: "Source") -> tuple[list[dict], list[dict], list[dict]]:
    """images, annotations, categories; entries that are not JSON objects are counted and ignored, a file of
    another shape is an error."""
    try:
        data = json.loads(index.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as exc:
        raise BuildError(f"coco-cameratraps: {index.name} is not COCO Camera Traps JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BuildError(f"coco-cameratraps: {index.name} is not COCO Camera Traps JSON (no \"images\" list)")
    lists = []
    for name in ("images", "annotations", "categories"):
        value = [] if data.get(name) is None else data[name]
        if not isinstance(value, list):
            raise BuildError(f"coco-cameratraps: {index.name}: \"{name}\" is not a list")
        entries = [entry for entry in value if isinstance(entry, dict)]
        if len(entries) < len(value):
            source.notes[f"{name} entries that are not JSON objects"] += len(value) - len(entries)
        lists.append(entries)
    return lists[0], lists[1], lists[2]


def _key(value: Any) -> Any:
    """Ids as dictionary keys: COCO ids are ints or strings, but a malformed file may hold anything."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


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
    source.label_column = "label"
    labels = imagenet_labels()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose and not folders:
        raise BuildError(f"imagenet: {root} holds images but no <wnid>/ class folders; sort ImageNet val into "
                         "class folders first, or use folder:ROOT")
    if loose:
        source.notes["images outside class folders"] += len(loose)
    items = []
    for folder in folders:
        wnid = display_path(folder, root)
        label = labels.get(wnid)
        files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        if label is None and files:
            source.notes[UNKNOWN_WNID] += len(files)
        items.extend(_item(p, root, {"wnid": wnid, "label": label}, _walked(p, root, options, "imagenet"))
                     for p in files)
    return items


@lru_cache(maxsize=1)
def imagenet_labels() -> dict[str, str]:
    """wnid -> class name ("n02124075" -> "Egyptian cat"): the first lemma of the synset list timm ships
    (no download), made unique for the two ImageNet-1k names that occur twice."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    labels = {wnid: info.label_name_to_description(wnid).split(",")[0].strip() for wnid in info.label_names()}
    labels.update(IMAGENET_LABEL_OVERRIDES)
    return labels
