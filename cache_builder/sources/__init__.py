"""Dataset sources: where a build's images come from and which metadata travels with each.

A source turns a `--source KIND:ARG[@DOMAIN]` argument into an ordered list of `SourceItem`s. Every source
is parsed in `parse_source` and nowhere else; `open_item` decodes one item (in a DataLoader worker).

Besides the generic `folder` and `csv` sources, public datasets are read in their own on-disk formats: each
has its index files, id scheme and quirks (WILDS' remapped locations, NIH's pipe-separated findings and split
box header, COCO's image/annotation join, ImageNet's wnids), and a user should get clear, typed, filterable
columns from the one `--source KIND:ROOT` argument instead of writing a manifest by hand.

Adding a format takes one module and one line:

1. `cache_builder/sources/<format>.py` with `list_items(arg: str, options: SourceOptions, source: Source)
   -> list[SourceItem]`, built from the shared types and helpers of `base` (see its docstring for what a
   lister does: count dropped rows in `source.notes`, set `source.label_column`, open no image);
2. one entry `"<kind>": <format>.list_items` in `SOURCES` below (its position is its place in the
   "unknown source" message). The kind need not be the module's name: `csv` lives in `manifest.py`, since
   a module named `csv` would hide the standard library's wherever this folder is on `sys.path`.

Format modules import from `base` only, never from each other or from this module, so there is no cycle.
"""

from __future__ import annotations

from PIL import Image, ImageOps

from cache_builder.errors import BuildError
from cache_builder.sources import chestxray14, coco_cameratraps, demo, folder, imagenet, iwildcam, manifest
from cache_builder.sources.base import KEPT_REASONS, Lister, Source, SourceItem, SourceOptions, split_domain

__all__ = ["KEPT_REASONS", "SOURCES", "Source", "SourceItem", "SourceOptions", "open_item", "parse_source"]

SOURCES: dict[str, Lister] = {
    "demo": demo.list_items,
    "folder": folder.list_items,
    "csv": manifest.list_items,
    "iwildcam": iwildcam.list_items,
    "chestxray14": chestxray14.list_items,
    "coco-cameratraps": coco_cameratraps.list_items,
    "imagenet": imagenet.list_items,
}


def parse_source(spec: str, options: SourceOptions = SourceOptions()) -> Source:
    body, domain = split_domain(spec.strip())
    kind, _, arg = body.partition(":")
    kind = kind.lower()
    if kind not in SOURCES:
        raise BuildError(
            f"unknown source '{spec}': use one of {', '.join(k + (':PATH' if k != 'demo' else '') for k in SOURCES)}"
            " with an optional @DOMAIN tag"
        )
    source = Source(spec=spec, kind=kind, domain=domain)
    source.items = SOURCES[kind](arg, options, source)
    if not source.items:
        raise BuildError(f"source '{spec}' holds no images")
    return source


def open_item(item: SourceItem, demo_seed: int | None) -> Image.Image:
    """The decoded image of one item; raises on unreadable files (the builder skips and lists those)."""
    if item.demo_index is not None:
        frame = demo.DemoFrame(index=item.demo_index, metadata=item.metadata)
        return demo.render_demo_image(frame, seed=demo_seed or 0)
    with Image.open(item.file) as image:
        image.load()
        return ImageOps.exif_transpose(image)
