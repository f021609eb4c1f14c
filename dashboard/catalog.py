"""Which caches exist in a caches folder (the folder itself is a setting: `dashboard.settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cache_builder import cache_format as fmt

DEMO_CACHE_NAME = "demo"


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
