"""`imagenet:ROOT`: ImageNet-style class folders (<wnid>/<image>): val, ImageNet-A/-R/-Sketch line up by `wnid`.

Folders are named by WordNet ids ("n02124075"); `label` is the class name timm ships for the wnid, so no label
file is needed. Images of a wnid outside ImageNet-1k are kept with a NULL label and counted. Files named as
ImageNet names its training images ("n02124075_1234.JPEG") carry their wnid themselves: in a folder that is not a
wnid ("images/", a flattened copy) or loose in ROOT, that wnid is theirs.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from cache_builder.errors import BuildError
from cache_builder.sources.base import (IMAGE_EXTENSIONS, UNKNOWN_WNID, Source, SourceItem, SourceOptions, disk_item,
                                        display_path, existing_dir, walked_file)

# ImageNet-1k has two classes named "crane" and two whose first lemma is "maillot": distinct labels instead.
IMAGENET_LABEL_OVERRIDES = {"n02012849": "crane (bird)", "n03126707": "crane (machine)",
                            "n03710637": "maillot", "n03710721": "tank suit"}
WNID = re.compile(r"n\d{8}")
WNID_PREFIX = re.compile(r"(n\d{8})_")


def wnid_of(path: Path, folder: str | None) -> str | None:
    """An image's wnid: its class folder's name when that is a wnid, else its file name's ImageNet prefix, else
    the folder's name (None: a loose file without one)."""
    if folder is not None and WNID.fullmatch(folder):
        return folder
    named = WNID_PREFIX.match(path.name)
    return named.group(1) if named else folder


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    root = existing_dir(arg, "imagenet")
    source.label_column = "label"
    source.frame = "crop"  # the models' own evaluation recipe
    labels = imagenet_labels()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    named = [p for p in loose if wnid_of(p, None)]
    if loose and not folders and not named:
        raise BuildError(f"imagenet: {root} holds images but no <wnid>/ class folders and no wnid-named files "
                         "(n01440764_123.JPEG); sort ImageNet val into class folders first, or use folder:ROOT")
    if len(loose) > len(named):
        source.notes["images outside class folders"] += len(loose) - len(named)
    files = [(p, None) for p in named] + [
        (p, display_path(folder, root)) for folder in folders
        for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    items = []
    for path, folder in files:
        wnid = wnid_of(path, folder)
        label = labels.get(wnid)
        if label is None:
            source.notes[UNKNOWN_WNID] += 1
        items.append(disk_item(path, root, {"wnid": wnid, "label": label},
                               walked_file(path, root, options, "imagenet")))
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
