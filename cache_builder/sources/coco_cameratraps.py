"""`coco-cameratraps:FILE.json[:IMAGE_ROOT]`: LILA's COCO Camera Traps JSON (most LILA camera-trap datasets).

COCO keeps images and annotations apart: an image's species are joined in from the annotations that name its
id (an image may show several; an empty frame has none), `bbox_count` counts the boxes among them. Images carry
location, datetime and seq_id. Image paths are relative to IMAGE_ROOT (default: the JSON's folder).
`--domain-locations FILE` names the in-domain locations; the others are `out`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from cache_builder.errors import BuildError
from cache_builder.sources.base import (UNKNOWN_CATEGORY, Source, SourceItem, SourceOptions, as_text, disk_item,
                                        first_sighting, indexed_file, parse_timestamps)


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    source.label_column = "species"
    source.frame = "fit"  # camera-trap frames are wide: an animal at the edge must stay searchable
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
        if not first_sighting(image_key, seen, source):
            continue
        file = indexed_file(image_root, file_name, options, f"{index.name} image {image_key}", source)
        if file is None:
            continue
        kept.append((image_root / file_name, file, image))
    datetimes = parse_timestamps(image.get("datetime") for _, _, image in kept)
    items = []
    for (path, file, image), when in zip(kept, datetimes):
        image_key = _key(image["id"])
        location = as_text(image.get("location"))
        items.append(disk_item(path, image_root, {
            "image_id": str(image["id"]),
            "location": location,
            "domain": None if in_domain is None else ("in" if location in in_domain else "out"),
            "datetime": when,
            "seq_id": as_text(image.get("seq_id")),
            "species": sorted(species.get(image_key, set())),
            "bbox_count": int(boxes.get(image_key, 0)),
        }, file))
    return items


def _coco_lists(index: Path, source: Source) -> tuple[list[dict], list[dict], list[dict]]:
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
