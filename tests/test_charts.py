"""The figures (dashboard/charts.py): words on axes and legends, long values shortened, colours apart."""

from __future__ import annotations

import pandas as pd

from dashboard import analysis, charts


def test_long_values_are_elided_in_the_middle():
    path = "/data/camera-traps/season-2019/site-114/cam-03"
    short = charts.short_label(path)
    assert len(short) == charts.MAX_LABEL and short.startswith("/data/camer…") and short.endswith("cam-03")
    assert charts.short_label("in") == "in"


def test_composition_bars_say_what_they_show_and_shorten_long_values_on_the_axis():
    long_value = "/data/camera-traps/season-2019/site-114/cam-03"
    hits = pd.DataFrame({"source": [long_value, long_value, "b"]})
    searched = pd.DataFrame({"source": [long_value, "b", "b", "b"]})
    shares = analysis.composition(hits, searched, "source")
    figure = charts.paired_bars(shares, ("hits_share", "searched_share"), ("top hits", "searched images"),
                                "share of images", "source", "composition")
    assert {trace.name for trace in figure.data} == {"top hits", "searched images"}
    assert figure.layout.xaxis.title.text == "source" and figure.layout.yaxis.title.text == "share of images"
    assert list(figure.layout.xaxis.ticktext) == [charts.short_label(long_value), "b"]
    assert long_value in set(figure.data[0].x)  # the hover keeps the whole value
    assert figure.data[0].marker.color != figure.data[1].marker.color


def test_the_score_histogram_names_its_groups_in_colours_far_apart():
    distribution = pd.DataFrame({"id": range(6), "score": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                 "group": ["in", "out", "in", "out", "in", "out"]})
    figure = charts.score_histogram(distribution, "domain", "scores")
    assert [trace.name for trace in figure.data] == ["in", "out"]
    assert figure.layout.legend.title.text == "domain"
    colours = [trace.marker.color for trace in figure.data]
    assert colours == charts.PALETTE[:2] and colours[0] != colours[1]
