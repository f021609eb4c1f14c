"""Dataset sources: where a build's images come from and which metadata travels with each.

A source turns a `--source KIND:ARG[@DOMAIN]` argument into an ordered list of `SourceItem`s. Every source
is parsed in `parse_source` and nowhere else. Items hold only what is needed to open the image later (in a
DataLoader worker), so listing a large dataset stays cheap.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from PIL import Image, ImageOps

from cache_builder import dataset_formats
from cache_builder.errors import BuildError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_DOMAIN_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED_COLUMNS = ("id", "path", "source", "domain")


@dataclass(frozen=True)
class SourceItem:
    """One image to extract: `path` is what the metadata table shows, `open_image` what the worker reads."""

    path: str
    metadata: dict[str, Any]
    file: str | None = None  # absolute file path, for sources on disk
    demo_index: int | None = None  # frame index, for the generated demo


@dataclass
class Source:
    spec: str
    kind: str
    domain: str | None
    items: list[SourceItem] = field(default_factory=list)
    demo_seed: int | None = None
    notes: Counter = field(default_factory=Counter)  # rows dropped while listing, by reason
    label_column: str | None = None  # the metadata column holding an image's class, where the format has one

    def describe(self) -> dict[str, Any]:
        described = {"spec": self.spec, "kind": self.kind, "domain": self.domain, "images": len(self.items)}
        if self.label_column:
            described["label_column"] = self.label_column
        if self.notes:
            described["dropped"] = dict(self.notes)
        return described


@dataclass(frozen=True)
class SourceOptions:
    """Options shared by every source of one build (CLI flags)."""

    multilabel: tuple[str, ...] = ()
    sep: str = "|"
    allow_outside: bool = False
    demo_size: int | None = None
    demo_seed: int = 0
    splits: tuple[str, ...] = ()  # iwildcam: only these splits
    domain_locations: str | None = None  # coco-cameratraps: file of in-domain locations


def split_domain(spec: str) -> tuple[str, str | None]:
    """`folder:val@in` -> (`folder:val`, `in`). A trailing `@x` counts as a tag only if it is a plain word."""
    body, at, tag = spec.rpartition("@")
    if at and body and _DOMAIN_TAG.match(tag):
        return body, tag
    return spec, None


def parse_source(spec: str, options: SourceOptions = SourceOptions()) -> Source:
    body, domain = split_domain(spec.strip())
    kind, _, arg = body.partition(":")
    kind = kind.lower()
    if kind not in _LISTERS:
        raise BuildError(
            f"unknown source '{spec}': use one of {', '.join(k + (':PATH' if k != 'demo' else '') for k in _LISTERS)}"
            " with an optional @DOMAIN tag"
        )
    source = Source(spec=spec, kind=kind, domain=domain)
    source.items = _LISTERS[kind](arg, options, source)
    if not source.items:
        raise BuildError(f"source '{spec}' holds no images")
    return source


def _list_demo(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    from cache_builder import demo

    if arg:
        raise BuildError(f"the demo source takes no argument (got 'demo:{arg}')")
    n = options.demo_size or demo.DEFAULT_DEMO_SIZE
    source.demo_seed = options.demo_seed
    source.label_column = "species"
    return [
        SourceItem(
            path=f"demo/{f.metadata['location']}/{f.index:05d}.png",
            metadata=dict(f.metadata),
            demo_index=f.index,
        )
        for f in demo.demo_frames(n, seed=options.demo_seed)
    ]


def existing_dir(arg: str, what: str) -> Path:
    if not arg:
        raise BuildError(f"{what} source needs a folder, e.g. {what}:/data/{what}")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise BuildError(f"{what} source: '{arg}' is not a folder")
    return root.resolve()


def _inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _list_folder(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
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
            if not options.allow_outside and not _inside(root, real):
                raise BuildError(
                    f"folder source: '{rel}' is a link to a file outside {root}; pass --allow-outside to follow it"
                )
            label = rel.parts[0] if len(rel.parts) > 1 else None
            label = None if label is None else dataset_formats.display_path(root / label, root)
            items.append(SourceItem(path=dataset_formats.display_path(full, root), metadata={"label": label},
                                    file=str(real)))
    return items


def read_table(path: Path) -> pd.DataFrame:
    """CSV or Parquet manifest with pandas' type inference, then dates parsed where a whole column parses."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BuildError(f"cannot read manifest {path}: {exc}".splitlines()[0]) from None
    for column in frame.columns:
        if frame[column].dtype == object or str(frame[column].dtype).startswith("str"):
            frame[column] = _maybe_datetime(frame[column])
    return frame


def _maybe_datetime(column: pd.Series) -> pd.Series:
    values = column.dropna()
    if values.empty or not values.map(lambda v: isinstance(v, str)).all():
        return column
    if not values.str.match(r"^\d{4}-\d{2}-\d{2}").all():
        return column
    try:
        return pd.to_datetime(column, format="ISO8601")
    except (ValueError, TypeError):
        return column


def _list_csv(arg: str, options: SourceOptions, source: Source) -> list[SourceItem]:
    if not arg:
        raise BuildError("csv source needs a manifest file, e.g. csv:/data/manifest.csv")
    manifest = Path(arg).expanduser()
    if not manifest.is_file():
        raise BuildError(f"csv source: manifest '{arg}' does not exist")
    frame = read_table(manifest)
    if "path" not in frame.columns:
        raise BuildError(
            f"csv source: {manifest.name} has no 'path' column (columns: {', '.join(map(str, frame.columns))})"
        )
    clashes = [c for c in RESERVED_COLUMNS if c in frame.columns and c != "path"]
    if clashes:
        frame = frame.rename(columns={c: f"{c}_original" for c in clashes})
    for column in options.multilabel:
        if column not in frame.columns:
            raise BuildError(f"--multilabel {column}: {manifest.name} has no such column")
        frame[column] = frame[column].map(lambda v: _split_labels(v, options.sep))
    root = manifest.resolve().parent
    items = []
    for row_number, record in enumerate(frame.to_dict("records"), start=2):
        raw = record.pop("path")
        if not isinstance(raw, str) or not raw.strip():
            raise BuildError(f"{manifest.name} row {row_number}: empty path")
        file = _resolve_inside(root, raw, options.allow_outside, f"{manifest.name} row {row_number}")
        metadata = {column: _clean(value) for column, value in record.items()}
        items.append(SourceItem(path=raw, metadata=metadata, file=str(file)))
    return items


def _resolve_inside(root: Path, raw: str, allow_outside: bool, where: str) -> Path:
    """Manifest paths are relative to the manifest's folder and may not leave it (nor link out of it)."""
    candidate = Path(raw)
    if not allow_outside:
        if candidate.is_absolute():
            raise BuildError(f"{where}: path '{raw}' is absolute; paths must be relative (or pass --allow-outside)")
        if ".." in candidate.parts:
            raise BuildError(f"{where}: path '{raw}' escapes the manifest's folder (or pass --allow-outside)")
    full = (root / candidate).resolve()
    if not allow_outside and not _inside(root, full):
        raise BuildError(f"{where}: path '{raw}' leads outside the manifest's folder via a link (--allow-outside)")
    return full


def _split_labels(value: Any, sep: str) -> list[str]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return []
    return [part.strip() for part in str(value).split(sep) if part.strip()]


def _clean(value: Any) -> Any:
    """pandas' missing markers become None so DuckDB stores NULL."""
    if isinstance(value, list):
        return value
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


_LISTERS: dict[str, Callable[[str, SourceOptions, Source], list[SourceItem]]] = {
    "demo": _list_demo,
    "folder": _list_folder,
    "csv": _list_csv,
    "iwildcam": dataset_formats.list_iwildcam,
    "chestxray14": dataset_formats.list_chestxray14,
    "coco-cameratraps": dataset_formats.list_coco_cameratraps,
    "imagenet": dataset_formats.list_imagenet,
}


def open_item(item: SourceItem, demo_seed: int | None) -> Image.Image:
    """The decoded image of one item; raises on unreadable files (the builder skips and lists those)."""
    if item.demo_index is not None:
        from cache_builder import demo

        frame = demo.DemoFrame(index=item.demo_index, metadata=item.metadata)
        return demo.render_demo_image(frame, seed=demo_seed or 0)
    with Image.open(item.file) as image:
        image.load()
        return ImageOps.exif_transpose(image)
