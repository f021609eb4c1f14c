"""Both command lines, run as a user runs them: a subprocess, its exit status, its output."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cache_builder.cli import make_parser as builder_parser
from dashboard.cli import make_parser as search_parser

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["cache_builder", "--help"], ["cache_builder", "build", "--help"],
                                  ["cache_builder", "layers", "--help"], ["cache_builder", "info", "--help"],
                                  ["dashboard", "search", "--help"]])
def test_every_command_has_help(args):
    result = run(*args)
    assert result.returncode == 0 and "usage:" in result.stdout


def _options(parser) -> set[str]:
    found = set()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for sub in action.choices.values():
                found |= _options(sub)
        found |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return found


def test_readme_documents_every_option():
    readme = (ROOT / "README.md").read_text()
    missing = sorted(o for o in _options(builder_parser()) | _options(search_parser()) if o not in readme)
    assert not missing, f"README.md does not mention {missing}"


def test_layers_lists_shapes_and_marks_the_default():
    result = run("cache_builder", "layers", "--model", "efficientnet_lite0")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\* blocks\.6\s+\S+\s+320x7x7$", result.stdout, re.M)
    assert re.search(r"^  conv_stem\s+\S+\s+32x112x112$", result.stdout, re.M)


@pytest.mark.parametrize("args, message", [
    (["layers", "--model", "efficientnet_lite1x"], "efficientnet_lite0"),
    (["build", "--source", "demo", "--layer", "blocks.66", "--out", "/tmp/vfs-never"], "blocks.6"),
    (["build", "--source", "demo", "--layer", "blocks.6", "--layer", "blocks.6", "--out", "/tmp/vfs-never"],
     "distinct layers"),
    (["build", "--source", "folder:/definitely/missing", "--out", "/tmp/vfs-never"], "not a folder"),
    (["info", "/definitely/missing"], "not a feature cache"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = run("cache_builder", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_info_prints_manifest_and_counts(small_cache):
    result = run("cache_builder", "info", str(small_cache.path))
    assert result.returncode == 0, result.stderr
    assert "40 cached, 0 skipped" in result.stdout and "label" in result.stdout


def test_search_cli_box_filter_and_csv(small_cache):
    result = run("dashboard", "search", str(small_cache.path), "--image-id", "4", "--box", "0,0,20,20",
                 "-k", "3", "--filter", "domain=in", "--filter", "diagnoses=b", "--exclude-query")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table.columns[:4]) == ["rank", "id", "path", "score"]
    assert len(table) == 3 and set(table["domain"]) == {"in"} and 4 not in set(table["id"])
    assert all("b" in str(v).split("|") for v in table["diagnoses"])


def test_search_cli_mask_png_and_json(small_cache, tmp_path):
    mask = np.zeros((48, 48, 4), dtype=np.uint8)
    mask[10:30, 10:30, 3] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = run("dashboard", "search", str(small_cache.path), "--image-id", "9", "--mask",
                 str(tmp_path / "mask.png"), "-k", "2", "--per", "location", "--format", "json")
    assert result.returncode == 0, result.stderr
    hits = pd.read_json(io.StringIO(result.stdout))
    assert list(hits["id"])[0] == 9 and hits["score"].iloc[0] == pytest.approx(1, abs=2**-8)


@pytest.mark.parametrize("extra, message", [
    (["--box", "100,100,200,200"], "outside"),
    (["--box", "1,2,3"], "X0,Y0,X1,Y1"),
    (["--box", "0,0,10,10", "-k", "0"], "k must be"),
    (["--box", "0,0,10,10", "--filter", "nosuch=1"], "no column 'nosuch'"),
    (["--box", "0,0,10,10", "--filter", "domain"], "COLUMN=VALUE"),
    (["--mask", "/etc/hostname"], "not a readable image"),
    (["--box", "0,0,10,10", "--per", "nosuch"], "no metadata column 'nosuch'"),
    (["--box", "0,0,10,10", "--image-id", "40"], "not in this cache"),
    (["--box", "0,0,10,10", "--layer", "blocks.9"], "no layer 'blocks.9'; it holds synthetic"),
])
def test_search_cli_bad_input(small_cache, extra, message):
    result = run("dashboard", "search", str(small_cache.path), "--image-id", "1", *extra)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("query, message", [
    ("/etc/passwd", "not an image Pillow can read"),
    ("/definitely/missing.jpg", "No such file or directory"),
])
def test_search_cli_query_file_that_is_not_an_image_is_one_line(small_cache, query, message):
    result = run("dashboard", "search", str(small_cache.path), "--image", query, "--box", "0,0,10,10")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_build_says_when_a_tag_overrides_a_manifests_domain(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,domain\na.png,in\n")
    result = run("cache_builder", "build", "--source", f"csv:{tmp_path / 'm.csv'}@out", "--out",
                 str(tmp_path / "cache"), "--image-size", "64", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "note: csv:" in result.stderr and "@out overrides the manifest's own domain column" in result.stderr


@pytest.mark.parametrize("command", [["cache_builder", "info", "{cache}"],
                                     ["cache_builder", "layers", "--model", "efficientnet_lite0"],
                                     ["dashboard", "search", "{cache}", "--image-id", "1", "--box", "0,0,48,48",
                                      "-k", "40"]])
def test_read_only_commands_end_quietly_when_the_reader_goes_away(small_cache, command):
    """`... | head -0`: the reader closes the pipe before the first line; no error, no resume advice."""
    args = [sys.executable, "-m", *(a.replace("{cache}", str(small_cache.path)) for a in command)]
    writer = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer.stdout.close()  # every write the command makes now fails with EPIPE
    _, stderr = writer.communicate(timeout=300)
    assert writer.returncode == 0 and stderr.decode().strip() == "", stderr.decode()
