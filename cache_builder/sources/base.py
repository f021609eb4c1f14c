"""What every dataset format shares: the item and source types, and the helpers several formats use.

A format's `list_items(arg, options, source)` turns the ARG of `--source KIND:ARG[@DOMAIN]` into an ordered
list of `SourceItem`s. Items hold only what is needed to open the image later (in a DataLoader worker), so
listing a large dataset stays cheap: nothing here opens an image. Decoding happens in the builder's workers,
where unreadable files are skipped and listed.

A lister reads the format's index files, keeps the rows whose image exists, and counts what it had to drop
(missing files, duplicated ids) or keep with a NULL/"unknown" value (unknown category ids or wnids) in
`source.notes`, which the manifest records and the CLI prints; the reasons are the constants below.
Malformed index files are a `BuildError` naming what is wrong. Each lister also names its
`source.label_column`, the column that holds an image's class (the dashboard's label agreement).

This module imports nothing from the rest of the package, so format modules depend on it alone.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from cache_builder.errors import BuildError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_DOMAIN_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
_EXIF_DATE = re.compile(r"^(\d{4}):(\d{2}):(\d{2})")

# Reasons counted in `source.notes`.
MISSING_FILE = "rows without an image file"
NOT_UTF8 = "rows whose file name is not UTF-8"  # read as U+FFFD, so the file cannot be found
DUPLICATE = "duplicated image ids"
UNKNOWN_CATEGORY = "unknown category ids"
UNKNOWN_WNID = "images of unknown wnids"
KEPT_REASONS = frozenset({UNKNOWN_CATEGORY, UNKNOWN_WNID})  # counted, but the image stays (class NULL/"unknown")


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
    remarks: list[str] = field(default_factory=list)  # decisions the user should hear about (printed as notes)
    frame: str = "auto"  # how this format's images are best framed: "crop", "fit", or "auto" (by their shapes)

    def describe(self) -> dict[str, Any]:
        described = {"spec": self.spec, "kind": self.kind, "domain": self.domain, "images": len(self.items)}
        if self.label_column:
            described["label_column"] = self.label_column
        if self.notes:
            described["dropped"] = dict(self.notes)
        if self.remarks:
            described["remarks"] = list(self.remarks)
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


# What each format module exposes as `list_items`.
Lister = Callable[[str, SourceOptions, Source], list[SourceItem]]


def split_domain(spec: str) -> tuple[str, str | None]:
    """`folder:val@in` -> (`folder:val`, `in`). A trailing `@x` counts as a tag only if it is a plain word."""
    body, at, tag = spec.rpartition("@")
    if at and body and _DOMAIN_TAG.match(tag):
        return body, tag
    return spec, None


# ------------------------------------------------------------------------------------------ paths on disk


def existing_dir(arg: str, what: str) -> Path:
    if not arg:
        raise BuildError(f"{what} source needs a folder, e.g. {what}:/data/{what}")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise BuildError(f"{what} source: '{arg}' is not a folder")
    return root.resolve()


def is_inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_inside(root: Path, raw: str, allow_outside: bool, where: str) -> Path:
    """Manifest paths are relative to the manifest's folder and may not leave it (nor link out of it)."""
    candidate = Path(raw)
    if not allow_outside:
        if candidate.is_absolute():
            raise BuildError(f"{where}: path '{raw}' is absolute; paths must be relative (or pass --allow-outside)")
        if ".." in candidate.parts:
            raise BuildError(f"{where}: path '{raw}' escapes the manifest's folder (or pass --allow-outside)")
    full = (root / candidate).resolve()
    if not allow_outside and not is_inside(root, full):
        raise BuildError(f"{where}: path '{raw}' leads outside the manifest's folder via a link (--allow-outside)")
    return full


def display_path(path: Path, root: Path) -> str:
    """Relative path as text; names that are not UTF-8 are shown with U+FFFD instead of breaking the table."""
    raw = path.relative_to(root).as_posix()
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def walked_file(path: Path, root: Path, options: SourceOptions, kind: str) -> Path:
    """A file found by walking ROOT, refused (like folder sources) if it is a link leading outside ROOT."""
    real = path.resolve()
    if not options.allow_outside and not is_inside(root, real):
        raise BuildError(f"{kind} source: '{display_path(path, root)}' is a link to a file outside {root}; "
                         "pass --allow-outside to follow it")
    return real


def disk_item(path: Path, root: Path, metadata: dict[str, Any], file: Path | None = None) -> SourceItem:
    """`path` as the table shows it (relative to ROOT), `file` what the worker opens (default: `path`)."""
    return SourceItem(path=display_path(path, root), metadata=metadata, file=str(file or path))


def missing_reason(name: str) -> str:
    """Why a row's file was not found: a name that was not UTF-8 in the index is told apart from a missing file."""
    return NOT_UTF8 if "\ufffd" in name else MISSING_FILE


def first_sighting(key: Any, seen: set, source: Source) -> bool:
    """False, counted as DUPLICATE, for an id listed before; else remembers it. A missing id (None) is no duplicate."""
    if key is not None and key in seen:
        source.notes[DUPLICATE] += 1
        return False
    seen.add(key)
    return True


def indexed_file(root: Path, name: str, options: SourceOptions, where: str, source: Source) -> Path | None:
    """The file an index row names below ROOT (checked as in `resolve_inside`), or None, counted, if it is missing."""
    file = resolve_inside(root, name, options.allow_outside, where)
    if not file.is_file():
        source.notes[missing_reason(name)] += 1
        return None
    return file


# ------------------------------------------------------------------------------------------- index tables


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


def read_index_csv(path: Path, what: str) -> pd.DataFrame:
    """A dataset's index file, every cell as text (no type inference) and column names stripped.

    Bytes that are not UTF-8 become U+FFFD: such a row's file is then not found and counted, never a crash.
    """
    if not path.is_file():
        raise BuildError(f"{what}: {path} does not exist")
    try:
        frame = pd.read_csv(path, encoding_errors="replace", dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        raise BuildError(f"{what}: cannot read {path.name}: {exc}".splitlines()[0]) from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def require_columns(frame: pd.DataFrame, required: Iterable[str], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BuildError(f"{what} lacks the column(s) {', '.join(missing)} (has: {', '.join(map(str, frame.columns))})")


# ------------------------------------------------------------------------------------------- cell values


def as_integer(value: Any) -> int | None:
    try:
        return None if pd.isna(value) else int(float(value))
    except (TypeError, ValueError, OverflowError):
        return None


def as_text(value: Any) -> str | None:
    """Stripped text, or None for a missing or blank cell."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # not a scalar
        pass
    text = str(value).strip()
    return text or None


def _parse_timestamp(value: Any) -> pd.Timestamp | None:
    try:
        parsed = pd.to_datetime(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return None if pd.isna(parsed) else parsed.tz_localize(None) if parsed.tzinfo else parsed


def parse_timestamps(values: Iterable[Any]) -> list[pd.Timestamp | None]:
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
    return [r if r is not None or t is None else _parse_timestamp(t) for r, t in zip(result, texts)]
