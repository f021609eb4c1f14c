"""Plotly figures for the pages, built from the tidy frames of `dashboard.analysis`.

Axes and legends say what they show in words (not the frames' column names), long values (source folders,
hospital names) are shortened on axes and in legends with the full text in the hover, and the groups of the
score histogram get a palette whose colours stay apart when their bars overlap.
"""

from __future__ import annotations

import pandas as pd
import plotly.express as px
from plotly.graph_objects import Figure

MAX_LABEL = 24  # characters of a value shown on an axis or in a legend
PALETTE = px.colors.qualitative.Set1  # saturated and far apart (blue and red first), legible overlaid


def short_label(value: object, limit: int = MAX_LABEL) -> str:
    """`value` as text, its middle elided past `limit` characters (paths differ at their ends)."""
    text = str(value)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head):]}"


def _shorten_categories(figure: Figure, values) -> Figure:
    values = [str(v) for v in values]
    if any(len(v) > MAX_LABEL for v in values):
        figure.update_xaxes(tickmode="array", tickvals=values, ticktext=[short_label(v) for v in values])
    return figure


def paired_bars(frame: pd.DataFrame, pair: tuple[str, str], names: tuple[str, str], value_label: str,
                column: str, title: str, height: int | None = None) -> Figure:
    """Two measures side by side per value, e.g. the share among hits next to the share in the searched set;
    `names` are the two measures as the legend says them."""
    long = frame.melt(id_vars="value", value_vars=list(pair), var_name="set", value_name="measure")
    long["set"] = long["set"].map(dict(zip(pair, names)))
    long["value"] = long["value"].astype(str)
    figure = px.bar(long, x="value", y="measure", color="set", barmode="group", title=title,
                    color_discrete_sequence=PALETTE, labels={"value": column, "measure": value_label, "set": ""},
                    height=height)
    return _shorten_categories(figure, long["value"].unique())


def composition_bars(shares: pd.DataFrame, column: str, title: str, height: int | None = None) -> Figure:
    """`analysis.composition`: each value's share among the top hits beside its share of the searched images."""
    return paired_bars(shares, ("hits_share", "searched_share"), ("top hits", "searched images"), "share of images",
                       column, title, height)


def score_histogram(distribution: pd.DataFrame, column: str, title: str) -> Figure:
    figure = px.histogram(distribution, x="score", color="group", barmode="overlay", histnorm="probability",
                          nbins=40, title=title, opacity=0.65, color_discrete_sequence=PALETTE,
                          labels={"score": "score", "group": column})
    figure.update_yaxes(title_text="share of the group's images")
    figure.for_each_trace(lambda trace: trace.update(name=short_label(trace.name)))
    return figure


def agreement_bars(agreement: pd.DataFrame, title: str) -> Figure:
    figure = px.bar(agreement, x="domain", y="share", text="agreeing", title=title, range_y=[0, 1],
                    color_discrete_sequence=PALETTE,
                    labels={"domain": "hits' domain", "share": "share of the hits that agree"})
    return _shorten_categories(figure, agreement["domain"])


def count_bars(counts: pd.DataFrame, column: str, title: str) -> Figure:
    """Images per value (`analysis.value_counts`), most frequent first."""
    counts = counts.assign(value=counts["value"].astype(str))
    figure = px.bar(counts, x="value", y="count", title=title, color_discrete_sequence=PALETTE,
                    labels={"value": column, "count": "hits"})
    return _shorten_categories(figure, counts["value"])
