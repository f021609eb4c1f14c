"""Plotly figures for the pages, built from the tidy frames of `dashboard.analysis`."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
from plotly.graph_objects import Figure


def paired_bars(frame: pd.DataFrame, pair: tuple[str, str], value_name: str, title: str) -> Figure:
    """Two measures side by side per value, e.g. the share among hits next to the share in the searched set."""
    long = frame.melt(id_vars="value", value_vars=list(pair), var_name="set", value_name=value_name)
    return px.bar(long, x="value", y=value_name, color="set", barmode="group", title=title)


def score_histogram(distribution: pd.DataFrame, title: str) -> Figure:
    return px.histogram(distribution, x="score", color="group", barmode="overlay", histnorm="probability",
                        nbins=40, title=title)


def agreement_bars(agreement: pd.DataFrame, title: str) -> Figure:
    return px.bar(agreement, x="domain", y="share", text="agreeing", title=title, range_y=[0, 1])
