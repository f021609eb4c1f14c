"""A build on a disk that really fills up: one clear line, never a crash or a cache that looks complete; freeing
space and rerunning the same command resumes and produces a cache identical to a clean build.

The disk is a small tmpfs mounted in a private user + mount namespace (`unshare`), grown step by step with
`mount -o remount,size=...` by a driver running `cache_builder.cli.main` inside it, so every write path meets a
real ENOSPC: memory-mapped feature rows (a sparse file's page faults on a full disk are a SIGBUS, not an
OSError), image files, DuckDB's metadata file and the JSON files. Skipped where user namespaces are not allowed
(`tests/test_hardening.py` simulates the same failure with a monkeypatched write everywhere).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cache_builder.build import STATE_FILE
from cache_builder import cache_format as fmt
from dashboard.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
IMAGES, SIZE = 24, 160  # grid 5x5x320: 376 KB of features; the images take ~340 KB, the metadata ~530 KB
# Disk sizes for successive runs of the same command: too small for the feature arrays; room for the arrays and
# some images; room for every image but not the metadata; room for everything.
DISK_STEPS = ["160k", "600k", "1000k", "8m"]
OPTIONS = ["--source", "demo", "--demo-size", str(IMAGES), "--image-size", str(SIZE), "--batch-size", "4",
           "--workers", "0", "--quiet"]

DRIVER = """
import contextlib, io, json, os, shutil, subprocess, sys, traceback
sys.path.insert(0, sys.argv[1])
from cache_builder.cli import main
mount, keep, options, sizes = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
cache = os.path.join(mount, "cache")
for step, size in enumerate(sizes):
    subprocess.run(["mount", "-o", "remount,size=" + size, mount], check=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(["build", *options, "--out", cache])
        except BaseException:  # what the real command would print: a traceback
            traceback.print_exc(file=err)
            status = "traceback"
    if os.path.isdir(cache):
        shutil.copytree(cache, os.path.join(keep, "step%d" % step))
    print(json.dumps({"size": size, "status": status, "stderr": err.getvalue()}), flush=True)
with contextlib.redirect_stdout(io.StringIO()):  # the reference: a clean build, same options, same process
    main(["build", *options, "--out", os.path.join(mount, "clean")])
shutil.copytree(os.path.join(mount, "clean"), os.path.join(keep, "clean"))
"""


def namespace_command(mount: Path, *command: str) -> list[str]:
    script = 'mount -t tmpfs -o size=64k tmpfs "$0" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(mount), *command]


@pytest.fixture
def full_disk_steps(tmp_path) -> tuple[list[dict], Path]:
    mount, keep = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    keep.mkdir()
    if shutil.which("unshare") is None or subprocess.run(namespace_command(mount, "true"),
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --user --mount` (Linux user namespaces) to mount a small tmpfs")
    run = subprocess.run(
        namespace_command(mount, sys.executable, "-c", DRIVER, str(ROOT), str(mount), str(keep), json.dumps(OPTIONS),
                          *DISK_STEPS),
        capture_output=True, text=True, timeout=240,
    )
    steps = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0, (
        f"the build process died (status {run.returncode}; -7 is SIGBUS) after {len(steps)} of "
        f"{len(DISK_STEPS)} runs: {steps}\n{run.stderr[-3000:]}"
    )
    return steps, keep


def test_a_full_disk_is_one_line_and_the_rerun_completes_identically(full_disk_steps):
    steps, keep = full_disk_steps
    *failures, last = steps
    for step, failure in enumerate(failures):
        lines = failure["stderr"].strip().splitlines()
        assert failure["status"] in (1, 2) and "Traceback" not in failure["stderr"], failure
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], failure
        assert "No space left on device" in lines[-1] and "rerun the same command" in lines[-1], failure
        with pytest.raises(fmt.CacheError, match="not complete"):
            FeatureCache.open(keep / f"step{step}")
    # the runs met the full disk at different stages: before any feature row, mid-extraction, after it
    done = [json.loads((keep / f"step{i}" / STATE_FILE).read_text())["done"] for i in range(len(failures))]
    assert done[0] == 0 and 0 < done[1] < IMAGES and done[2] == IMAGES, done
    assert last["status"] == 0, last

    clean = keep / "clean"
    resumed = keep / f"step{len(failures)}"
    for name in (fmt.FEATURES_FILE, fmt.SQNORMS_FILE):
        assert (resumed / name).read_bytes() == (clean / name).read_bytes(), name
    images = sorted(p.relative_to(clean) for p in (clean / fmt.IMAGES_DIR).rglob("*") if p.is_file())
    assert images == sorted(p.relative_to(resumed) for p in (resumed / fmt.IMAGES_DIR).rglob("*") if p.is_file())
    assert all((resumed / p).read_bytes() == (clean / p).read_bytes() for p in images)
    cache, reference = FeatureCache.open(resumed), FeatureCache.open(clean)
    assert cache.size == IMAGES and cache.metadata.rows().equals(reference.metadata.rows())
    assert not (resumed / STATE_FILE).exists()


METADATA_DRIVER = """
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import duckdb, pandas as pd
from cache_builder.errors import BuildError
from cache_builder.metadata_table import write_metadata_frame
mount = sys.argv[2]
n = 3000
frame = pd.DataFrame({"id": range(n), "path": ["img/%07d.jpg" % i for i in range(n)],
                      "label": [["cat", "dog", "owl"][i % 3] for i in range(n)],
                      "tags": [["rain", "night"] if i % 2 else [] for i in range(n)]})
frame.attrs["list_columns"] = ["tags"]
target = os.path.join(mount, "metadata.duckdb")
for size_kb in range(64, 1600, 32):
    for name in os.listdir(mount):
        os.unlink(os.path.join(mount, name))
    subprocess.run(["mount", "-o", "remount,size=%dk" % size_kb, mount], check=True)
    try:
        write_metadata_frame(target, frame)
        outcome = "written"
    except BuildError as exc:
        outcome = "error: " + str(exc)
    except Exception as exc:
        outcome = "unexpected %s: %s" % (type(exc).__name__, str(exc).splitlines()[0])
    rows = None
    if os.path.exists(target):
        try:
            with duckdb.connect(target, read_only=True) as con:
                rows = con.execute("SELECT count(*) FROM images").fetchone()[0]
        except duckdb.Error as exc:
            rows = "unreadable: " + str(exc).splitlines()[0]
    print(json.dumps({"disk_kb": size_kb, "outcome": outcome, "rows": rows, "files": sorted(os.listdir(mount))}))
"""


def test_metadata_is_written_whole_or_not_at_all_on_a_full_disk(tmp_path):
    """At every amount of free space: a complete table and nothing else, or a BuildError and nothing at all.

    DuckDB checkpoints the table from its write-ahead log into the file when the connection closes; when that
    fails for lack of space it says nothing, and the renamed file had no table (its .wal left behind).
    """
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("unshare") is None or subprocess.run(namespace_command(mount, "true"),
                                                         capture_output=True).returncode != 0:
        pytest.skip("needs `unshare --user --mount` (Linux user namespaces) to mount a small tmpfs")
    run = subprocess.run(namespace_command(mount, sys.executable, "-c", METADATA_DRIVER, str(ROOT), str(mount)),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    attempts = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for attempt in attempts:
        if attempt["outcome"] == "written":
            assert attempt["rows"] == 3000 and attempt["files"] == ["metadata.duckdb"], attempt
        else:
            assert attempt["outcome"].startswith("error: could not write"), attempt
            assert "No space left on device" in attempt["outcome"] and attempt["files"] == [], attempt
    outcomes = [a["outcome"] == "written" for a in attempts]
    assert not outcomes[0] and outcomes[-1] and outcomes == sorted(outcomes), attempts  # fails, then fits
