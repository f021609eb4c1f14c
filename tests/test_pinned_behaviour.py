"""Searches whose CSV output and URLs were recorded before the layering refactor (issue 10) and must not change.

The golden files in `tests/golden/` were written by the code as it stood before the refactor (run this file with
`VFS_WRITE_GOLDEN=1` to record them again, only after a deliberate change of behaviour). A search is run the way
a user runs it: the `python -m dashboard search` entry point, and the Search page through AppTest.

Everything must match to the character except the scores' last printed digit: the kernel path is chosen per
CPU (AVX512-BF16, AVX2, portable), and each sums the same float32 products in its own order, so a score printed
to 6 decimals may differ by one unit in the last place on another machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cache_builder.synthetic import write_array_cache

GOLDEN = Path(__file__).with_name("golden")
ROOT = Path(__file__).resolve().parents[1]
WRITE = os.environ.get("VFS_WRITE_GOLDEN") == "1"

SEARCHES = {
    "box": ["--image-id", "3", "--box", "8,16,40,40", "-k", "10"],
    "soft-mask-filtered": ["--image-id", "5", "--mask", "{mask}", "-k", "8", "--filter", "domain=out",
                           "--exclude-query"],
    "whole-grid-per-location": ["--image-id", "0", "--box", "0,0,48,56", "-k", "5", "--per", "location"],
    "list-filter": ["--image-id", "7", "--box", "16,8,32,24", "-k", "6", "--filter", "tags=b",
                    "--filter", "tags=c"],
    "json": ["--image-id", "11", "--box", "0,24,24,48", "-k", "3", "--format", "json"],
}


@pytest.fixture(scope="module")
def pinned_cache(tmp_path_factory) -> Path:
    """A 7x6 grid (rectangular on purpose), 24 channels, 60 images, every metadata kind."""
    rng = np.random.default_rng(2024)
    n = 60
    features = np.maximum(rng.normal(size=(n, 6, 7, 24)), 0).astype(np.float32)
    features[9] = 0  # an all-zero image scores 0 everywhere
    metadata = pd.DataFrame({
        "label": [["fox", "hare", "owl", "deer"][i % 4] for i in range(n)],
        "domain": ["in" if i % 3 else "out" for i in range(n)],
        "location": [f"loc{i % 6}" for i in range(n)],
        "age": [float(i % 17) for i in range(n)],
        "tags": [["a", "b"] if i % 5 == 0 else (["c"] if i % 5 == 1 else []) for i in range(n)],
    })
    images = rng.integers(0, 255, size=(n, 48, 56, 3), dtype=np.uint8)
    out = tmp_path_factory.mktemp("pinned") / "pinned"
    write_array_cache(out, features, metadata=metadata, input_size=48, images=images)
    return out


def _soft_mask(folder: Path) -> Path:
    weights = np.zeros((48, 48), dtype=np.uint8)
    weights[8:30, 10:40] = 255
    weights[30:40, 20:30] = 128  # soft weights: a bfloat16 remainder term
    path = folder / "mask.png"
    Image.fromarray(weights, mode="L").save(path)
    return path


SCORE_TOLERANCE = 2e-6  # one unit in the 6th decimal, plus float32 noise


@pytest.fixture(autouse=True)
def compiled_kernel(monkeypatch):
    """The outputs were recorded with the compiled kernel (whichever path this CPU has): the torch fallback's
    bfloat16 products (2^-8) may reorder near ties, a precision documented and tested in tests/test_scoring.py."""
    from dashboard.scoring import SCORERS

    reason = SCORERS["native"].unavailable_reason()
    if reason:
        pytest.skip(f"the pinned outputs need the compiled kernel: {reason}")
    monkeypatch.setenv("VFS_SEARCH_BACKEND", "native")


def _scores_apart(text: str) -> tuple[str, list[float]]:
    """The text with every score replaced by a marker, and the scores (CSV column `score`, JSON key "score")."""
    scores: list[float] = []

    def take(match: re.Match) -> str:
        scores.append(float(match.group(2)))
        return match.group(1) + "<score>"

    text = re.sub(r'("score":\s*)(-?[0-9.e-]+)', take, text)
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith("rank,id,path,score,"):
        for i, line in enumerate(lines[1:], start=1):
            cells = line.split(",", 4)
            scores.append(float(cells[3]))
            lines[i] = ",".join(cells[:3] + ["<score>"] + cells[4:])
    return "".join(lines), scores


def _check(name: str, text: str) -> None:
    golden = GOLDEN / name
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    _check_text(name, text, golden.read_text(encoding="utf-8"))


def _check_text(name: str, text: str, expected: str) -> None:
    got_text, got_scores = _scores_apart(text)
    want_text, want_scores = _scores_apart(expected)
    assert got_text == want_text, f"{name} differs from the output recorded before"
    np.testing.assert_allclose(got_scores, want_scores, atol=SCORE_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_cli_output_is_unchanged(name, pinned_cache, tmp_path):
    from dashboard.cli import main

    args = [a.replace("{mask}", str(_soft_mask(tmp_path))) for a in SEARCHES[name]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", str(pinned_cache), *args]) == 0
    suffix = "json" if "json" in args else "csv"
    _check(f"{name}.{suffix}", out.getvalue())


def test_page_url_and_table_are_unchanged(pinned_cache, tmp_path, monkeypatch):
    """The Search page with a link's state: the address bar it writes and the hit table it shows."""
    from streamlit.testing.v1 import AppTest

    shutil.copytree(pinned_cache, tmp_path / "pinned")
    monkeypatch.setenv("VFS_CACHES_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)
    region = "6x7:" + "".join("ff" if 1 <= r <= 2 and 2 <= c <= 4 else ("80" if (r, c) == (3, 3) else "00")
                              for r in range(6) for c in range(7))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("pages/search.py")
    for key, value in {"cache": "pinned", "image": "4", "region": region, "k": "7", "per": "label",
                       "filters": '{"equals":{"domain":["in"]},"ranges":{"age":[2,15]}}'}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    params = {k: at.query_params[k] for k in sorted(at.query_params)}
    table = at.dataframe[0].value
    golden = GOLDEN / "page.json"
    if WRITE:
        golden.write_text(json.dumps({"url": params, "hits": table.to_csv(index=False)}, indent=1, sort_keys=True)
                          + "\n", encoding="utf-8")
    recorded = json.loads(golden.read_text(encoding="utf-8"))
    assert params == recorded["url"]
    _check_text("page hits", table.to_csv(index=False), recorded["hits"])
