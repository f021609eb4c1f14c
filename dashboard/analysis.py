"""The data behind the charts: tidy DataFrames a page hands straight to plotly express.

Every function accepts list columns (an image with several diagnoses counts once for each value, and an
empty list counts for none) and NULLs (shown as "(missing)"), and returns an empty frame with the right columns
when there is nothing to count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dashboard.export import is_list_value

MISSING = "(missing)"
NONE = "(none)"  # an empty list: the image is known to have no value, unlike a NULL
OTHER = "(other)"


def _values(cell: Any) -> list[str]:
    """The values one image contributes to a column's counts: each distinct value of a list, or the one scalar."""
    if is_list_value(cell):
        return sorted({str(v) for v in cell})
    if pd.isna(cell):
        return [MISSING]
    return [str(cell)]


def _images_per_value(column: pd.Series) -> pd.Series:
    exploded = column.map(_values).explode()
    return exploded.value_counts()


def value_counts(table: pd.DataFrame, column: str, limit: int = 30) -> pd.DataFrame:
    """Images per value (the most frequent `limit`), for the dataset page's bar charts."""
    counts = _images_per_value(table[column]) if len(table) else pd.Series(dtype=int)
    frame = counts.rename_axis("value").reset_index(name="count")
    return frame.sort_values(["count", "value"], ascending=[False, True]).head(limit).reset_index(drop=True)


def composition(hits: pd.DataFrame, searched: pd.DataFrame, column: str) -> pd.DataFrame:
    """Share of each value among the hits next to its share in the searched set: is the top-k unusual?

    Every value of either set is listed, so a value the hits lack shows up with lift 0. Shares are fractions of
    images: for a scalar column each set's shares sum to 1, for a list column they may sum to more or less.
    """
    columns = ["value", "hits", "hits_share", "searched", "searched_share", "lift"]
    if hits.empty or searched.empty:
        return pd.DataFrame(columns=columns)
    in_hits = _images_per_value(hits[column])
    in_searched = _images_per_value(searched[column])
    frame = pd.DataFrame({"hits": in_hits, "searched": in_searched}).fillna(0).astype(int)
    frame = frame.rename_axis("value").reset_index()
    frame["hits_share"] = frame["hits"] / len(hits)
    frame["searched_share"] = frame["searched"] / len(searched)
    frame["lift"] = frame["hits_share"] / frame["searched_share"].where(frame["searched_share"] > 0)
    return frame.sort_values(["hits", "value"], ascending=[False, True])[columns].reset_index(drop=True)


def score_distribution(scores: pd.DataFrame, searched: pd.DataFrame, column: str,
                       max_groups: int = 12) -> pd.DataFrame:
    """Every searched image's score labelled with its group, to see whether the region favours a group.

    `searched` needs `id` and `column`. An image appears once per value of a list column ("(none)" for an empty
    list). Beyond `max_groups` groups the most frequent `max_groups - 1` stay (ties by name) and the rest are
    pooled as "(other)", so the legend stays legible.
    """
    if scores.empty:
        return pd.DataFrame(columns=["id", "score", "group"])
    groups = searched[["id", column]].copy()
    groups["group"] = groups[column].map(lambda cell: _values(cell) or [NONE])
    frame = scores.merge(groups[["id", "group"]], on="id", how="left").explode("group")
    frame["group"] = frame["group"].fillna(MISSING)  # an id absent from `searched` has no metadata
    counts = frame["group"].value_counts()
    if len(counts) > max_groups:
        keep = sorted(counts.index, key=lambda group: (-counts[group], group))[: max_groups - 1]
        frame.loc[~frame["group"].isin(keep), "group"] = OTHER
    return frame[["id", "score", "group"]].reset_index(drop=True)


def label_agreement(hits: pd.DataFrame, query_label: Any, label_column: str,
                    domain_column: str | None = "domain") -> pd.DataFrame:
    """Share of hits that carry the query's label (for lists: share at least one value), per hit domain and
    "all": does the top-k find the same kind of thing, and does that hold in every domain?

    A NULL query label agrees with nothing; hits with a NULL domain form the "(missing)" domain.
    """
    columns = ["domain", "hits", "agreeing", "share"]
    if hits.empty:
        return pd.DataFrame(columns=columns)
    wanted = set(_values(query_label)) - {MISSING}
    agrees = hits[label_column].map(lambda cell: bool(wanted & set(_values(cell))))
    rows = []
    if domain_column and domain_column in hits.columns:
        domains = hits[domain_column].map(lambda v: _values(v)[0])
        for domain in sorted(domains.unique()):
            selected = agrees[domains == domain]
            rows.append((domain, len(selected), int(selected.sum())))
    rows.append(("all", len(agrees), int(agrees.sum())))
    frame = pd.DataFrame(rows, columns=columns[:3])
    frame["share"] = frame["agreeing"] / frame["hits"]
    return frame


def value_enrichment(hits: pd.DataFrame, searched: pd.DataFrame, column: str) -> pd.DataFrame:
    """Each value's rate among the hits against its prevalence: which diagnoses does the region pull in?

    Rates are fractions of images (an image with a value twice counts once). A scalar column works too.
    """
    columns = ["value", "hit_rate", "prevalence", "hits_with", "searched_with", "enrichment"]
    if hits.empty or searched.empty:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({
        "hits_with": _images_per_value(hits[column]),
        "searched_with": _images_per_value(searched[column]),
    }).fillna(0).astype(int).rename_axis("value").reset_index()
    frame["hit_rate"] = frame["hits_with"] / len(hits)
    frame["prevalence"] = frame["searched_with"] / len(searched)
    frame["enrichment"] = frame["hit_rate"] / frame["prevalence"].where(frame["prevalence"] > 0)
    return frame.sort_values(["enrichment", "value"], ascending=[False, True])[columns].reset_index(drop=True)


def overlap(a_ids: Iterable[int], b_ids: Iterable[int]) -> dict[str, Any]:
    """How much two top-k lists agree (two models or two layers on the same query); two empty lists agree."""
    a, b = {int(i) for i in a_ids}, {int(i) for i in b_ids}
    union = a | b
    return {
        "common": sorted(a & b),
        "only_a": sorted(a - b),
        "only_b": sorted(b - a),
        "jaccard": len(a & b) / len(union) if union else 1.0,
    }


def dataset_mismatch(paths_a: Sequence[str], paths_b: Sequence[str]) -> str | None:
    """Why two caches do not hold the same images in the same order (None when they do): ids must line up."""
    if len(paths_a) != len(paths_b):
        return f"they hold {len(paths_a):,} and {len(paths_b):,} images"
    differing = [i for i, (a, b) in enumerate(zip(paths_a, paths_b)) if a != b]
    if differing:
        return f"image {differing[0]} is {paths_a[differing[0]]!r} in one and {paths_b[differing[0]]!r} in the other"
    return None


def framing_mismatch(frame_a: str, size_a: tuple[int, int], frame_b: str, size_b: tuple[int, int]) -> str | None:
    """Why a region drawn on one cache's images is not the same pixels on the other's (None when it is)."""
    if (frame_a, tuple(size_a)) == (frame_b, tuple(size_b)):
        return None
    return (f"they frame the images differently ({frame_a} {size_a[1]}x{size_a[0]} and {frame_b} "
            f"{size_b[1]}x{size_b[0]}), so a region drawn on one is not the same pixels on the other")


MAX_GROUPS = 60


def chartable_columns(column_types: dict[str, str], distinct: dict[str, int] | None = None,
                      exclude: Sequence[str] = ("id", "path")) -> list[str]:
    """Columns worth grouping by: text, booleans and lists of text with at most MAX_GROUPS values (when
    `distinct` counts are given). Numbers and dates are ranges, not groups; ids and JSON are not groups either."""
    return [c for c, kind in column_types.items()
            if c not in exclude and kind in ("VARCHAR", "BOOLEAN", "VARCHAR[]")
            and (distinct is None or 1 <= distinct.get(c, 0) <= MAX_GROUPS)]


def group_columns(chartable: Sequence[str], distinct: dict[str, int]) -> list[str]:
    """The chartable columns with at least two values: a one-value column (every image from one `source`
    folder, say) draws a single full bar that says nothing."""
    return [c for c in chartable if distinct.get(c, 0) >= 2]


def default_group_column(columns: Sequence[str], label_column: str | None) -> str | None:
    """What "Group by" opens on: `domain`, else the manifest's label column, else the first column (all from
    `group_columns`, so each has 2 to MAX_GROUPS values); None when no column has anything to show."""
    for preferred in ("domain", label_column):
        if preferred in columns:
            return preferred
    return columns[0] if columns else None


def label_summary(hits: pd.DataFrame, query_label: Any, label_column: str) -> str | None:
    """One line for the query's label among the hits ("12 of 20 hits (60%) share the query's label 'cat'"), or
    None when the query has no label to compare."""
    wanted = set(_values(query_label)) - {MISSING}
    if not wanted or hits.empty:
        return None
    agreeing = int(hits[label_column].map(lambda cell: bool(wanted & set(_values(cell)))).sum())
    shown = ", ".join(sorted(wanted))
    return (f"{agreeing} of {len(hits)} hits ({agreeing / len(hits):.0%}) share the query's {label_column} "
            f"'{shown}'")


@dataclass(frozen=True)
class LabelView:
    """What the Search page says about the query's label among the hits."""

    summary: str | None  # `label_summary`; None when the query has no label to compare
    by_domain: bool  # a bar per domain: the hits come from 2+ domains and the label is a chartable column
    one_domain: bool  # the hits come from one domain (or the cache has none)
    counts: bool  # the top hits' label counts: too many classes to chart the label as groups


def label_view(hits: pd.DataFrame, query_label: Any, label_column: str, label_chartable: bool) -> LabelView:
    summary = label_summary(hits, query_label, label_column)
    domains = hits["domain"].map(lambda cell: _values(cell)[0]).nunique() if "domain" in hits else 0
    by_domain = summary is not None and label_chartable and domains >= 2
    return LabelView(summary, by_domain, domains < 2,
                     counts=summary is not None and not by_domain and not label_chartable)
