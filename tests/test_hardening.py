"""Failures of the system under a build: a write that fails (here a simulated full disk, everywhere) never leaves
a cache that looks complete, the rerun resumes to the clean build's arrays, and the command line reports the
system error in one line. `tests/test_disk_full.py` meets a real full disk where user namespaces are allowed;
shared use by concurrent sessions is tested in `tests/test_concurrency.py`."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cache_builder import build as build_module
from cache_builder.build import BuildOptions, build_cache
from cache_builder.sources import SourceOptions, parse_source
from cache_builder import cache_format as fmt
from dashboard.feature_cache import FeatureCache

SMALL = dict(model="efficientnet_lite0", image_size=96, batch_size=4, workers=0)


def test_disk_full_during_build_leaves_no_complete_cache_and_resumes(tmp_path, monkeypatch):
    sources = [parse_source("demo", SourceOptions(demo_size=24))]
    clean = tmp_path / "clean"
    build_cache(sources, clean, BuildOptions(**SMALL))

    real_write = Path.write_bytes
    writes = {"count": 0}

    def failing_write(self, data):
        writes["count"] += 1
        if writes["count"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    target = tmp_path / "full"
    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="No space left"):
        build_cache(sources, target, BuildOptions(**SMALL))
    monkeypatch.setattr(Path, "write_bytes", real_write)
    with pytest.raises(fmt.CacheError, match="not complete"):
        FeatureCache.open(target)

    build_cache(sources, target, BuildOptions(**SMALL))
    for name in (fmt.FEATURES_FILE, fmt.SQNORMS_FILE):
        assert (clean / name).read_bytes() == (target / name).read_bytes()
    assert FeatureCache.open(target).size == 24
    assert not (target / build_module.STATE_FILE).exists()


def test_cli_reports_a_system_error_in_one_line(monkeypatch, capsys):
    from cache_builder import cli

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/caches/x/features.partial.npy")

    monkeypatch.setattr("cache_builder.build.build_cache", no_space)
    status = cli.main(["build", "--source", "demo", "--demo-size", "4", "--out", "/tmp/vfs-never", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert err[0].startswith("error: No space left on device (/caches/x/features.partial.npy)")
