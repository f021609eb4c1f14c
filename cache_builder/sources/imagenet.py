"""`imagenet:ROOT`: ImageNet-style class folders (<wnid>/<image>): val, ImageNet-A/-R/-Sketch line up by `wnid`.

Folders are named by WordNet ids ("n02124075"); `label` is the class name timm ships for the wnid, so no label
file is needed. Images of a wnid outside ImageNet-1k are kept with a NULL label and counted.
"""

from __future__ import annotations

from functools import lru_cache

from cache_builder.errors import BuildError
from cache_builder.sources.base import (IMAGE_EXTENSIONS, UNKNOWN_WNID, Source, SourceItem, SourceOptions, disk_item,
                                        display_path, existing_dir, walked_file)

# ImageNet-1k has two classes named "crane" and two whose first lemma is "maillot": distinct labels instead.
IMAGENET_LABEL_OVERRIDES = {"n02012849": "crane (bird)", "n03126707": "crane (machine)",
                            "n03710637": "maillot", "n03710721": "tank suit"}


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    root = existing_dir(arg, "imagenet")
    source.label_column = "label"
    source.frame = "crop"  # the models' own evaluation recipe
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
        items.extend(disk_item(p, root, {"wnid": wnid, "label": label}, walked_file(p, root, options, "imagenet"))
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
