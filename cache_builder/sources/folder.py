"""`folder:ROOT`: every image below ROOT, labelled by its first-level subfolder (ImageFolder layout).

Images directly in ROOT have no label. Links that lead outside ROOT are refused unless `--allow-outside`.
"""

from __future__ import annotations

import os
from pathlib import Path

from cache_builder.errors import BuildError
from cache_builder.sources.base import (IMAGE_EXTENSIONS, Source, SourceItem, SourceOptions, display_path, existing_dir,
                                        is_inside)


def list_items(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    root = existing_dir(arg, "folder")
    source.label_column = "label"
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = full.relative_to(root)
            real = full.resolve()
            if not options.allow_outside and not is_inside(root, real):
                raise BuildError(
                    f"folder source: '{rel}' is a link to a file outside {root}; pass --allow-outside to follow it"
                )
            label = rel.parts[0] if len(rel.parts) > 1 else None
            label = None if label is None else display_path(root / label, root)
            items.append(SourceItem(path=display_path(full, root), metadata={"label": label}, file=str(real)))
    return items
