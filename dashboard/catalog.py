"""Which caches exist in a caches folder (the folder itself is a setting: `dashboard.settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_builder import cache_format as fmt

DEMO_CACHE_NAME = "demo"
# An early layer and the last one (EfficientNet-Lite0 at 224: 28x28x40 and 7x7x320), so the Layers view and
# Compare have something to show from the first start; the last is stored first, the one every page opens.
DEMO_LAYERS = ("blocks.6", "blocks.2")


@dataclass(frozen=True)
class CacheEntry:
    name: str
    path: Path
    manifest: fmt.Manifest | None
    problem: str | None  # why it cannot be opened, shown instead of hiding the folder


def find_caches(root: Path) -> list[CacheEntry]:
    """Every direct subfolder holding a manifest, usable or not, sorted by name."""
    entries = []
    if not root.is_dir():
        return entries
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / fmt.MANIFEST_FILE).is_file()):
        try:
            manifest = fmt.read_manifest(folder)
            fmt.check_manifest(manifest, folder)
            entries.append(CacheEntry(folder.name, folder, manifest, None))
        except fmt.CacheError as exc:
            entries.append(CacheEntry(folder.name, folder, None, str(exc)))
    return entries


def companion(entries: list[CacheEntry], chosen: CacheEntry, layer: str | None = None) -> tuple[str, str | None] | None:
    """(cache name, layer) to compare `chosen` (at `layer`) with: another layer of the same cache, when it holds
    several; else another cache of the same images (same count, another model or layer), else any other usable
    one (layer None: its first); None when there is nothing else."""
    names = chosen.manifest.layer_names if chosen.manifest else []
    other_layers = [name for name in names if name != (layer or names[0])]
    if other_layers:
        return chosen.name, other_layers[0]
    others = [e for e in entries if e.problem is None and e.name != chosen.name]
    same_images = [e for e in others if chosen.manifest and e.manifest.image_count == chosen.manifest.image_count]
    return ((same_images or others)[0].name, None) if others else None
